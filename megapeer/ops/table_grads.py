"""Deferred table gradients: one gradient per N micro-batches for PEER's grouped tables.

With gradient accumulation, every micro-batch's backward scatters a full gradient for each
expert table (all rows: at equal active FLOPs every expert is chosen), and DDP then adds it
into the fp32 main_grad. With `model.peer.defer_table_grads=N` a table's backward keeps the
scatter's inputs instead (the coefficients [pairs, m] and token rows [T, d], with the pairs'
expert order) and scatters the sum over N micro-batches in one pass
(`peer_grouped.scatter_many`): one table gradient, one write and one add per N
micro-batches instead of N. The sum is in fp32 over every pair of the N micro-batches, one
rounding: no less accurate than N bf16 gradients added in fp32.

Cost: memory. Each kept micro-batch holds, per PEER layer, two [pairs, m] coefficient
tensors and two [T, d] row tensors (the 1.3B benchmark model at micro-batch 2: ~320 MiB per
layer), up to N micro-batches of them.

Where: the grouped kernels' expert-ordered form (wide bf16 experts on a GPU, what `auto`
picks at equal active FLOPs; models/peer.py), inside a training step with more than one
micro-batch (training/step.py wraps the schedule in `step(num_microbatches)`). A table's
last backward of the step always scatters, so every gradient is complete before the
gradient reduction and the optimizer; a step that ends with inputs still kept raises.
Outside a step (evaluation, a bare backward) nothing is deferred.

The table enters the expert op detached (its gradient is not computed in there) and its
gradient comes from `tap`, an eager identity on the op's output: under torch.compile the
tap splits the layer's graph (the kept tensors must be ones no compiled graph reuses).
Tests: tests/test_table_grads.py.
"""
import contextlib

import torch

_active = False   # inside a step with > 1 micro-batch (read by traced code: a bool guard)
_step = None      # the open step: {"n": micro-batches, "seen": {id: backward passes}, "kept": {}}


@contextlib.contextmanager
def step(num_microbatches: int):
    """One training step of num_microbatches forward + backward passes. On leaving it every
    table's deferred gradient has been produced; inputs still kept mean the schedule ran
    fewer backward passes than announced, and raise."""
    global _active, _step
    if _step is not None:
        raise RuntimeError("table_grads.step: a step is already open")
    _step = {"n": int(num_microbatches), "seen": {}, "kept": {}}
    _active = num_microbatches > 1
    try:
        yield
        left = {k: len(v) for k, v in _step["kept"].items() if v}
        if left:
            raise RuntimeError(
                f"deferred PEER table gradients (model.peer.defer_table_grads): {len(left)} "
                f"table(s) still hold {max(left.values())} micro-batch(es) of scatter inputs "
                f"at the end of a step announced with {num_microbatches} micro-batches; "
                f"their backward ran fewer times than that")
    finally:
        _step, _active = None, False


def deferring(tab: torch.Tensor, every: int) -> bool:
    """Whether a forward now defers tab's gradient (every > 1, inside a step of several
    micro-batches, with autograd on for tab)."""
    return every > 1 and _active and tab.requires_grad and torch.is_grad_enabled()


@torch.compiler.disable
def tap(y, a, tab, layout, hk: int, m: int, every: int, coef_is_grad: bool):
    """y (the output of a grouped op run on tab.detach()) unchanged; its backward keeps
    the op's table-gradient inputs and gives tab its gradient every `every` micro-batches.
    a: the op's input (x for the dot: coefficients are y's gradient; w for the axpy: rows
    are y's gradient). layout: the grouped layout (order, ..., expert_off, counts, ...)."""
    order, _, _, expert_off, counts, _ = layout
    return _Tap.apply(y, a, tab, order, expert_off, counts, hk, m, every, coef_is_grad)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, a, tab, order, expert_off, counts, hk, m, every, coef_is_grad):
        ctx.save_for_backward(a, order, expert_off, counts)
        ctx.tab, ctx.hk, ctx.m, ctx.every, ctx.coef_is_grad = tab, hk, m, every, coef_is_grad
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        a, order, expert_off, counts = ctx.saved_tensors
        coef, src = (g, a) if ctx.coef_is_grad else (a, g)
        gt = _keep(ctx.tab, (coef.contiguous(), src, order, expert_off, counts), ctx.hk,
                   ctx.m, ctx.every)
        return g, None, gt, None, None, None, None, None, None, None


def _keep(tab, entry, hk, m, every):
    """Keep one micro-batch's scatter inputs for tab; the table gradient when it is time."""
    st = _step
    if st is None:        # a backward outside a step: nothing to wait for
        return _scatter(tab, [entry], hk, m)
    key = id(tab)
    st["seen"][key] = st["seen"].get(key, 0) + 1
    kept = st["kept"].setdefault(key, [])
    kept.append(entry)
    if len(kept) < every and st["seen"][key] < st["n"]:
        return None
    grad = _scatter(tab, kept, hk, m)
    kept.clear()
    return grad


def _scatter(tab, entries, hk, m):
    from . import peer_grouped
    coefs, srcs, orders, offs, counts = zip(*entries)
    return peer_grouped.scatter_many(list(coefs), list(srcs), list(orders), offs, counts, hk,
                                     tab.shape[0], m).to(tab.dtype)
