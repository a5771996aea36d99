"""Deferred table gradients: one gradient per N micro-batches for PEER's grouped tables.

With gradient accumulation, every micro-batch's backward scatters a full gradient for each
expert table (all rows: at equal active FLOPs every expert is chosen), and DDP then adds it
into the fp32 main_grad. With `model.peer.defer_table_grads=N` a table's backward copies
the scatter's inputs instead (the coefficients [pairs, m] in token order and the token
rows [T, d], each micro-batch into its slot of one buffer per pass) and runs the scatter
over the N micro-batches as one (`peer_grouped.scatter_merged`: their layouts merged, one
loop per expert over all its pairs): one table gradient, one write and one add per N
micro-batches instead of N. The sum is in fp32 over every pair of the N micro-batches, one
rounding: no less accurate than N bf16 gradients added in fp32.

Cost: memory. A pass's buffers hold, per PEER layer and micro-batch, two [pairs, m]
coefficient tensors and two [T, d] row tensors (the 1.3B benchmark model at micro-batch 2:
~320 MiB per layer), for N micro-batches; and the copies (H200: 0.39 ms per table and 4
micro-batches at that shape, docs/benchmarks.md).

Where: the grouped kernels' expert-ordered form (wide bf16 experts on a GPU, what `auto`
picks at equal active FLOPs; models/peer.py), inside a training step with more than one
micro-batch (training/step.py wraps the schedule in `step(num_microbatches)`). A table's
last backward of the step always scatters, so every gradient is complete before the
gradient reduction and the optimizer; a step that ends with inputs still kept raises.
Outside a step (evaluation, a bare backward) nothing is deferred.

How, without splitting compiled graphs: the expert ops get the table detached and
`defer=N` (peer_grouped.gather_dot / gather_axpy). Their backward computes the input's
gradient in one opaque op (`megapeer::table_grad_keep`) that also calls `keep` here: it
copies the micro-batch's inputs (inside a compiled graph their buffers may be reused once
the op returns) or, when it is time, scatters all of them and adds the gradient to the
table's own: `main_grad` under Megatron's DDP (the scatter writes its fp32 sums there
itself: stored after DDP's zero_grad_buffer, see `zeroed`, else added; then it is marked
ready for an overlapped reduction), else `.grad`. Where a step's first write stored a
table's whole main_grad, the next zero_grad_buffer leaves it (training/step.py; the store
overwrites it again): a step saves an fp32 fill of every such table. The op finds the
table's parameter by its address, among the tables given to `track` (models/peer.py
tracks U and V).
Tests: tests/test_table_grads.py.
"""
import contextlib
import functools
import weakref

import torch

_active = False   # inside a step with > 1 micro-batch (read by traced code: a bool guard)
_step = None      # the open step: {"n": micro-batches, "seen": {id: backward passes},
#                   "kept": {id: its open _Pass}, "by_ptr": {address: table}, built once}
_tables = weakref.WeakValueDictionary()   # id -> table that may defer (track)


def track(*tables: torch.Tensor):
    """Tables (leaf tensors, parameters) whose gradients the expert ops may defer."""
    for t in tables:
        _tables[id(t)] = t
        if t.requires_grad:   # an ordinary gradient reaches main_grad too (DDP's hook)
            t.register_post_accumulate_grad_hook(_written)


def zeroed(tables, stale=()):
    """These tables' main_grads were just zeroed by DDP's zero_grad_buffer (training/step.py
    wraps it), or, those in stale, left as they were: the last step's first write stored
    their whole gradient (see stored_whole). Either way their next deferred gradient is
    stored there, not added; an ordinary gradient first zeroes a stale main_grad, and
    `settle` zeroes those that no gradient reached."""
    stale = {id(t) for t in stale}
    for t in tables:
        t._main_grad_zero = True
        t._main_grad_stale = id(t) in stale
        t._stored_whole = False   # set by a deferred pass that stores (only a first write can)


def stored_whole(t) -> bool:
    """Whether the step's first write to t's main_grad (since `zeroed`) stored all of it:
    a deferred pass writing its fp32 sums there, every row (the next step's zeroing of
    that main_grad may then be skipped)."""
    return getattr(t, "_stored_whole", False)


def _unstale(t):
    if getattr(t, "_main_grad_stale", False):
        t.main_grad.zero_()
        t._main_grad_stale = False


def _written(t):
    """An ordinary gradient reached t (a hook that runs before DDP's, which adds it to
    main_grad): a stale main_grad is zeroed first."""
    _unstale(t)
    t._main_grad_zero = False


def settle():
    """Zero the stale main_grads (`zeroed`) that no gradient reached this step: before the
    gradient reduction (training/step.py: _finalize_grads)."""
    for t in list(_tables.values()):
        _unstale(t)


def tracked(t: torch.Tensor) -> bool:
    """Whether t was given to track."""
    return _tables.get(id(t)) is t


@contextlib.contextmanager
def step(num_microbatches: int):
    """One training step of num_microbatches forward + backward passes. On leaving it every
    table's deferred gradient has been produced; inputs still kept mean the schedule ran
    fewer backward passes than announced, and raise."""
    global _active, _step
    if _step is not None:
        raise RuntimeError("table_grads.step: a step is already open")
    _step = {"n": int(num_microbatches), "seen": {}, "kept": {}, "by_ptr": None}
    _active = num_microbatches > 1
    try:
        yield
        left = {k: len(v) for k, v in _step["kept"].items() if len(v)}
        if left:
            raise RuntimeError(
                f"deferred PEER table gradients (model.peer.defer_table_grads): {len(left)} "
                f"table(s) still hold {max(left.values())} micro-batch(es) of scatter inputs "
                f"at the end of a step announced with {num_microbatches} micro-batches; "
                f"their backward ran fewer times than that")
    finally:
        _step, _active = None, False


def deferring(tab: torch.Tensor, every: int, a: torch.Tensor) -> bool:
    """Whether a forward now defers tab's gradient: every > 1, inside a step of several
    micro-batches, with autograd on for tab and for the op's input a (whose backward
    carries the table's)."""
    return (every > 1 and _active and tab.requires_grad and a.requires_grad
            and torch.is_grad_enabled())


def _table(tab: torch.Tensor, st) -> torch.Tensor:
    """The tracked parameter whose memory tab (a detached alias) is."""
    by_ptr = None if st is None else st["by_ptr"]
    if by_ptr is None:
        by_ptr = {t.data_ptr(): t for t in list(_tables.values())}
        if st is not None:
            st["by_ptr"] = by_ptr
    p = by_ptr.get(tab.data_ptr())
    if p is None or p.shape != tab.shape:
        raise RuntimeError(
            f"deferred PEER table gradients: a table of shape {tuple(tab.shape)} is not "
            f"tracked (table_grads.track); its gradient would be lost")
    return p


def keep(tab, coef, src, lay, hk: int, m: int, every: int):
    """One micro-batch's scatter inputs for tab (detached): coef [P, m] in the expert order
    of lay (order, expert_off, counts, inv), src [T, d]. Copied into the pass's buffers
    (a pass of one micro-batch scatters at once), and
    every `every` micro-batches and at the table's last backward of the step scattered all
    at once (peer_grouped.scatter_merged) and added to the table's gradient."""
    st = _step
    p = _table(tab, st)
    order, expert_off, counts, inv = lay
    one = functools.partial(_scatter_one, p, coef, src, order, expert_off, counts, hk, m)
    if st is None:        # a backward outside a step: nothing to wait for
        return _deliver(p, one)
    key = id(p)
    seen = st["seen"][key] = st["seen"].get(key, 0) + 1
    pas = st["kept"].get(key)
    if pas is None:
        n_src = min(every, st["n"] - seen + 1)   # this pass's micro-batches
        if n_src == 1:
            return _deliver(p, one)
        pas = st["kept"][key] = _Pass(n_src, coef, src)
    pas.add(coef, src, order, expert_off, counts, inv)
    if len(pas) == pas.n_src:
        del st["kept"][key]
        _deliver(p, functools.partial(pas.scatter, p, hk, m))


class _Pass:
    """The micro-batches of one table-gradient pass: their coefficients in token order and
    their token rows, each in its slot of one buffer (copies: inside a compiled backward the
    op's inputs may be reused once it returns), and their layouts."""

    def __init__(self, n_src, coef, src):
        self.n_src, self.P, self.T = n_src, coef.shape[0], src.shape[0]
        self.coef = coef.new_empty((n_src * self.P, coef.shape[1]))
        self.src = src.new_empty((n_src * self.T, src.shape[1]))
        self.layouts = []

    def __len__(self):
        return len(self.layouts)

    def add(self, coef, src, order, expert_off, counts, inv):
        i = len(self.layouts)
        if coef.shape[0] != self.P or src.shape[0] != self.T:
            raise RuntimeError(
                f"deferred PEER table gradients (model.peer.defer_table_grads): micro-batch of "
                f"{src.shape[0]} tokens after ones of {self.T}; deferral needs equal micro-batches")
        from . import peer_grouped
        peer_grouped.gather_rows(coef, inv, self.coef[i * self.P:(i + 1) * self.P])   # token order
        self.src[i * self.T:(i + 1) * self.T].copy_(src)
        self.layouts.append((order.clone(), expert_off.clone(), counts.clone()))

    def scatter(self, p, hk, m, out=None, accumulate=False):
        from . import peer_grouped
        return peer_grouped.scatter_merged(self.coef, self.src, self.layouts, hk, p.shape[0],
                                           m, out=out, accumulate=accumulate)


def _scatter_one(p, coef, src, order, expert_off, counts, hk, m, out=None, accumulate=False):
    from . import peer_grouped
    return peer_grouped._scatter(coef, src, order, expert_off, counts, hk, p.shape[0], m,
                                 True, out=out, accumulate=accumulate)


def _deliver(p, scatter):
    """p's gradient from scatter(out=None, accumulate=False) (-> tensor). Under Megatron's
    DDP into main_grad (fp32): the scatter writes its fp32 sums there itself, stored when
    the buffer was just zeroed or left stale (`zeroed`), else added (one pass, no bf16
    gradient, no separate add); then its bucket is told (overlapped reduction:
    `p._defer_ready`, set by training/step.py: wrap_ddp). Else into .grad."""
    main = getattr(p, "main_grad", None)
    if main is None:
        grad = scatter().to(p.dtype)
        p.grad = grad if p.grad is None else p.grad + grad
        return
    from . import grad_accum
    usable = grad_accum.usable_main_grad(p)
    store = usable and getattr(p, "_main_grad_zero", False)
    if usable:
        scatter(out=main.view(p.shape[0], -1), accumulate=not store)
    else:
        from . import grad_add
        _unstale(p)
        grad_add.add_(main, scatter())
    if store:   # _main_grad_zero: nothing was written since `zeroed`
        p._stored_whole = True
    p._main_grad_zero = p._main_grad_stale = False
    ready = getattr(p, "_defer_ready", None)
    if ready is not None:
        ready()
