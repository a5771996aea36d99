"""PEER's expert step as grouped matmuls on tensor cores (Triton), for many tokens per expert.

The same two functions as ops/peer_ref.py:

    s   = gather_dot(x, idx, U, m)     s[t,h,k,j] = U[idx[t,h,k]*m + j] . x[t]
    out = gather_axpy(w, idx, V, m)    out[t] = sum_{h,k,j} w[t,h,k,j] * V[idx[t,h,k]*m + j]

When each expert is chosen by many tokens in a call (PEER at equal active FLOPs: a few
thousand experts of width m >= 16, hundreds of pairs per expert), every pass is a grouped
GEMM: the (token, expert) pairs are sorted by expert and cut into blocks of BM pairs of
one expert, and each block multiplies its gathered token rows [BM, d] with the expert's
m table rows on tensor cores (`tl.dot`):

  dot      s[pairs]  = X[tokens] . U_e^T            per block, [BM, d] x [d, m]
  axpy     out[tok] += w[pairs] . V_e               per block, fp32 atomics into [T, d]
                                                    (wide experts: one row per pair, summed)
  scatter  grad_e    = coef[pairs]^T . S[tokens]    per expert, all its blocks, no atomics

Backward: gather_dot -> grad_x = axpy(grad_s, U), grad_U = scatter(grad_s, x);
gather_axpy -> grad_V = scatter(w, grad_out), grad_w = dot(grad_out, V).
For experts narrower than 128 the axpy sums with atomics, so its result is not bitwise
repeatable; the others are. In deterministic mode (peer_cuda.set_deterministic or
torch.use_deterministic_algorithms) that axpy writes one fp32 row per pair instead and
torch sums them per token: repeatable, at the cost of a [pairs, DET_COLS] fp32 buffer and
17-47% more time per layer (H200, docs/kernels.md). Experts of width >= 128 always take
the row form, with rows in the input dtype (one rounding per pair, summed in fp32): there
it beat the atomics (1.33 against 1.53 ms per call, H200) and repeats bitwise; its buffer
is cut into column passes of at most ROWS_BYTES.

Expert-ordered form (wide bf16 experts, takes_expert_order; models/peer.py uses it): the
dot writes s as [P, m] in expert order, the caller permutes the gates the same way
(to_expert_order), and the axpy on those coefficients is torch's grouped GEMM (CUTLASS on
sm90: one row per pair, in expert order) followed by a per-token gather-sum through the
layout's inverse permutation; the scatter reads coefficients by position. -7% per
`mla_peer_wider` layer fwd+bwd at micro-batch 2 (H200, docs/benchmarks.md).
m is padded to 16 inside the kernels (tensor-core tiles) and cut into chunks of MC columns;
fp32 inputs use IEEE fp32 dots. Blocks hold BM = 64 pairs, 128 for experts >= 128 wide.

Expert parallelism: other ranks' pairs come as the sentinel id n_exp (SKIPS_SENTINEL;
dispatch.foreign_pairs_to_rows), sorted last as a group of their own that no kernel reads
a table row for: zero dot products, nothing added, no scatter work.
Select it with model.peer.kernel=grouped. It runs wherever Triton runs: CUDA GPUs, and
the CPU under TRITON_INTERPRET=1 (how the tests check it against the reference).
One sort of the pairs (the layout op) serves a layer's forward dot and axpy and, saved by
autograd, their four backward kernels. `scatter_merged` runs the scatter over several
micro-batches as one (deferred table gradients, ops/table_grads.py). Tests:
tests/test_peer_grouped.py (Triton interpreter on CPU; bf16 on a GPU). Timings:
docs/benchmarks.md ("Grouped Triton kernels").
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from . import peer_ref

# Launch settings per kernel: BM the pairs per block (the layout's unit for the dot and
# axpy, the scatter's step), BK the dot's d-chunk, BN the d-tile of axpy and scatter, MC
# the expert columns per chunk (wider experts are cut into chunks of MC). Chosen with
# bench/grouped_tune.py on an H200 (docs/kernels.md): experts up to 64 wide, then >= 128.
# LOCAL: the 1-D grid order of axpy and scatter; PREFETCH: the scatter loads its pair ids
# a step ahead (peer_grouped_kernels.py; H200, docs/benchmarks.md calls 34 and 40);
# INV_STORE: the expert-ordered dot reads its output rows from the layout's inv;
# SKIP_IF: the axpy's sentinel blocks skip their loop by a branch (False: by masked loads;
# the branch cost the narrow atomic axpy 28%, H200, docs/benchmarks.md call 104);
# I32: the scatter's gathers use 32-bit offsets where every offset fits (_offsets_fit).
TILES = {"dot": dict(BM=64, BK=64, MC=64, num_warps=4, num_stages=3, INV_STORE=True),
         "axpy": dict(BM=64, BN=64, MC=64, num_warps=4, num_stages=3, LOCAL=True,
                      SKIP_IF=False),
         "scatter": dict(BM=64, BN=64, MC=64, num_warps=4, num_stages=3, LOCAL=True,
                         PREFETCH=False, I32=True)}
TILES_WIDE = {"dot": dict(BM=128, BK=64, MC=256, num_warps=8, num_stages=3, INV_STORE=True),
              "axpy": dict(BM=128, BN=256, MC=64, num_warps=8, num_stages=3, LOCAL=True,
                           SKIP_IF=True),
              "scatter": dict(BM=64, BN=128, MC=128, num_warps=8, num_stages=3, LOCAL=True,
                             PREFETCH=True, I32=True)}
# ids equal to the expert count (the sentinel) are other expert-parallel ranks' pairs:
# sorted last, no table read, zero dot products, nothing added (dispatch.foreign_pairs_to_rows)
SKIPS_SENTINEL = True
ROWS_BYTES = 1 << 30   # the wide axpy's per-pair rows: column passes of at most this
WIDE_ROWS = True         # False: wide experts' axpy with atomics too (bench/peer_kernel.py A/B)
assert all(t["dot"]["BM"] == t["axpy"]["BM"] for t in (TILES, TILES_WIDE))   # one layout


@contextlib.contextmanager
def tiles_changed(**changes):
    """TILES and TILES_WIDE with some keys changed, where a kernel has them (e.g.
    LOCAL=False), until the block ends: the benchmarks' same-run comparisons and tests."""
    global TILES, TILES_WIDE
    saved = TILES, TILES_WIDE
    known = {c for t in saved for v in t.values() for c in v}
    if set(changes) - known:
        raise ValueError(f"tiles_changed: unknown {sorted(set(changes) - known)}; "
                         f"the kernels take {sorted(known)}")
    TILES, TILES_WIDE = ({k: {**v, **{c: x for c, x in changes.items() if c in v}}
                          for k, v in t.items()} for t in saved)
    try:
        yield
    finally:
        TILES, TILES_WIDE = saved


_kernels = None


def _k():
    """The Triton kernels (ops/peer_grouped_kernels.py, imported on first use)."""
    global _kernels
    if _kernels is None:
        import triton

        from . import peer_grouped_kernels as pk
        _kernels = (triton, pk.peer_grouped_dot, pk.peer_grouped_axpy, pk.peer_grouped_scatter,
                    pk.peer_gather_sum)
    return _kernels


@torch.library.custom_op("megapeer::grouped_layout", mutates_args=())
def _layout_op(idx: Tensor, n_exp: int, bm: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                          Tensor]:
    """(token, expert) pairs sorted by expert and cut into blocks of bm pairs of one expert:
    order [P] (pair ids by expert), block_expert [n_blocks] (-1 past the last block),
    block_start, expert_off, counts [n_exp + 1], inv [P] (each pair's place in the expert
    order: the expert-ordered form's way back). Id n_exp is the sentinel (SKIPS_SENTINEL): other
    expert-parallel ranks' pairs, sorted last as group n_exp, whose blocks the kernels only
    fill with zeros. On the device, sized by upper bounds (no host sync: torch.bincount
    would read the largest id back to the host; the GPU test runs this under
    torch.cuda.set_sync_debug_mode("error")): torch's sort, then two Triton kernels
    (_layout_kernels) where LAYOUT_KERNELS allows, else torch ops (layout_torch)."""
    if not _layout_kernels(idx, n_exp):
        return layout_torch(idx, n_exp, bm)
    triton, *_ = _k()
    from . import peer_grouped_kernels as pk
    flat = idx.reshape(-1)
    P, dev = flat.numel(), idx.device
    keys, order = torch.sort(flat.to(peer_ref.key_dtype(n_exp + 1)), stable=True)
    i32 = dict(dtype=torch.int32, device=dev)
    order32, inv = torch.empty(P, **i32), torch.empty(P, **i32)
    bounds = torch.empty(n_exp + 2, **i32)
    pk.peer_layout_pairs[(triton.cdiv(P + 1, 1024),)](keys, order, order32, inv, bounds, P,
                                                       n_exp, BP=1024)
    expert_off, counts, block_start = (torch.empty(n_exp + 1, **i32) for _ in range(3))
    block_expert = torch.empty(_n_blocks(P, n_exp, bm), **i32)
    pk.peer_layout_blocks[(1,)](bounds, expert_off, counts, block_start, block_expert, n_exp,
                                bm, block_expert.numel(), GB=1024, BB=1024)
    return order32, block_expert, block_start, expert_off, counts, inv


# The layout's two Triton kernels (_layout_op) instead of layout_torch's 20 torch launches
# after the sort: the op's host time 470 -> 259 us per call at the 1.3B `mla_peer_wider`
# layer (H200, bench/peer_host.py; docs/benchmarks.md, call 111). The per-group kernel is
# one program over chunks of groups: up to LAYOUT_KERNEL_GROUPS groups, layout_torch beyond.
LAYOUT_KERNELS = True
LAYOUT_KERNEL_GROUPS = 1 << 16


def _layout_kernels(idx: Tensor, n_exp: int) -> bool:
    from .triton_util import interpret
    return (LAYOUT_KERNELS and n_exp + 1 <= LAYOUT_KERNEL_GROUPS
            and idx.numel() < 2 ** 31 and (idx.is_cuda or interpret()))


def layout_torch(idx: Tensor, n_exp: int, bm: int) -> tuple:
    """_layout_op's result from torch ops (any device; the Triton kernels' reference)."""
    keys, order, inv = peer_ref.sort_by_expert(idx.reshape(-1), n_exp + 1)
    order = order.to(torch.int32)
    # each group's first place, and P after the sentinel's (ids are at most n_exp)
    bounds = torch.searchsorted(keys, torch.arange(n_exp + 2, device=idx.device, dtype=keys.dtype))
    counts = (bounds[1:] - bounds[:-1]).to(torch.int32)
    expert_off = bounds[:-1].to(torch.int32)
    blocks = (counts + bm - 1) // bm
    block_end = torch.cumsum(blocks, 0)
    block_start = (block_end - blocks).to(torch.int32)
    b = torch.arange(_n_blocks(idx.numel(), n_exp, bm), device=idx.device)
    e = torch.searchsorted(block_end, b, right=True)
    block_expert = torch.where(e <= n_exp, e, -1).to(torch.int32)
    return order, block_expert, block_start, expert_off, counts, inv.to(torch.int32)


@_layout_op.register_fake
def _(idx, n_exp, bm):
    i32 = dict(dtype=torch.int32, device=idx.device)
    return (idx.new_empty(idx.numel(), **i32),
            idx.new_empty(_n_blocks(idx.numel(), n_exp, bm), **i32),
            *(idx.new_empty(n_exp + 1, **i32) for _ in range(3)),
            idx.new_empty(idx.numel(), **i32))


def _n_blocks(P: int, n_exp: int, bm: int) -> int:
    return (P + bm - 1) // bm + n_exp + 1    # upper bound: each group's last block may be short


def _layout_of(idx: Tensor, key: tuple) -> tuple:
    n_exp, bm = key
    return tuple(torch.ops.megapeer.grouped_layout(idx, n_exp, bm))


_cache = peer_ref.LayoutCache(_layout_of)   # one sort per layer step (eager and compiled)


def _layout(idx: Tensor, n_exp: int, m: int) -> tuple:
    return _cache(idx, (n_exp, _tiles("dot", m)["BM"]))


def _mb(m: int) -> int:
    return max(16, 1 << (int(m) - 1).bit_length())


def _tiles(kind: str, m: int) -> dict:
    """Launch settings of one kernel for experts of width m (MC capped at the padded width)."""
    t = dict((TILES_WIDE if _mb(m) >= 128 else TILES)[kind])
    t["MC"] = min(t["MC"], _mb(m))
    return t


def _offsets_fit(*ts: Tensor) -> bool:
    """Whether every element offset of these tensors (row-major, rows strided) is below
    2**31: then a kernel may compute them in 32 bits."""
    return all(t.shape[0] * t.stride(0) < 2 ** 31 for t in ts)


def _rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _hk(idx: Tensor) -> int:
    return idx.numel() // idx.shape[0]   # pairs per token


def _dot(x, idx, tab, m, lay, shape, in_expert_order):
    triton, dot_kernel, *_ = _k()
    x, tab = _rows(x), _rows(tab)
    s = torch.empty(shape, dtype=x.dtype, device=x.device)
    order, block_expert, block_start, expert_off, counts, inv = lay
    t = _tiles("dot", m)
    dot_kernel[(block_expert.numel(), _mb(m) // t["MC"])](
        x, x.stride(0), tab, tab.stride(0), s, order, block_expert, block_start, expert_off,
        counts, inv, _hk(idx), m, x.shape[1], tab.shape[0] // m, MB=_mb(m),
        IEEE=x.dtype == torch.float32,
        SORTED=in_expert_order, **t)
    return s


@torch.library.custom_op("megapeer::grouped_dot", mutates_args=())
def _dot_op(x: Tensor, idx: Tensor, tab: Tensor, m: int, order: Tensor, block_expert: Tensor,
            block_start: Tensor, expert_off: Tensor, counts: Tensor, inv: Tensor) -> Tensor:
    lay = (order, block_expert, block_start, expert_off, counts, inv)
    return _dot(x, idx, tab, m, lay, (*idx.shape, m), False)


@_dot_op.register_fake
def _(x, idx, tab, m, *lay):
    return x.new_empty((*idx.shape, m))


@torch.library.custom_op("megapeer::grouped_dot_sorted", mutates_args=())
def _dot_sorted_op(x: Tensor, idx: Tensor, tab: Tensor, m: int, order: Tensor,
                   block_expert: Tensor, block_start: Tensor, expert_off: Tensor,
                   counts: Tensor, inv: Tensor, defer: int = 1) -> Tensor:
    """grouped_dot with s [P, m] in expert order (row i: the pair order[i]). defer > 1:
    tab (detached) gets its gradient through ops/table_grads.py (table_grad_keep)."""
    lay = (order, block_expert, block_start, expert_off, counts, inv)
    return _dot(x, idx, tab, m, lay, (idx.numel(), m), True)


@_dot_sorted_op.register_fake
def _(x, idx, tab, m, *lay, defer=1):
    return x.new_empty((idx.numel(), m))


DET_COLS = 256   # d columns per pass of the deterministic axpy (its buffer: [pairs, 256] fp32)


@torch.library.custom_op("megapeer::grouped_axpy", mutates_args=())
def _axpy_op(w: Tensor, idx: Tensor, tab: Tensor, m: int, order: Tensor, block_expert: Tensor,
             block_start: Tensor, expert_off: Tensor, counts: Tensor, inv: Tensor) -> Tensor:
    triton, _, axpy_kernel, *_ = _k()
    tab = _rows(tab)
    w = w.contiguous()
    T, d, hk = idx.shape[0], tab.shape[1], _hk(idx)
    lay = (order, block_expert, block_start, expert_off, counts)
    kw = dict(MB=_mb(m), IEEE=tab.dtype == torch.float32, **_tiles("axpy", m))
    if _mb(m) >= 128 and WIDE_ROWS:   # rows in the input dtype, passes of <= ROWS_BYTES
        cols = ROWS_BYTES // max(1, T * hk * tab.element_size()) // kw["BN"] * kw["BN"]
        return _axpy_rows(w, tab, lay, T, hk, m, d, kw, tab.dtype, max(kw["BN"], cols))
    if _deterministic():
        return _axpy_rows(w, tab, lay, T, hk, m, d, kw, torch.float32, DET_COLS)
    out = torch.zeros(T, d, dtype=torch.float32, device=tab.device)   # atomics sum into it
    nb = block_expert.numel()
    axpy_kernel[(nb * triton.cdiv(d, kw["BN"]),)](
        w, tab, tab.stride(0), out, *lay, hk, m, d, nb, tab.shape[0] // m, STORE=False, **kw)
    return out.to(tab.dtype)


def _axpy_rows(w, tab, lay, T, hk, m, d, kw, row_dtype, cols):
    """The axpy without atomics: each pair's row is written by one program, then torch sums
    them per token (in fp32, one rounding) in a fixed order; `cols` columns per pass."""
    triton, _, axpy_kernel, *_ = _k()
    cols = min(d, cols)
    buf = torch.empty(T * hk * cols, dtype=row_dtype, device=tab.device)
    out = None if cols == d and row_dtype == tab.dtype else tab.new_empty((T, d))
    for c0 in range(0, d, cols):
        wc = min(cols, d - c0)
        rows = buf[:T * hk * wc].view(T * hk, wc)
        nb = lay[1].numel()
        axpy_kernel[(nb * triton.cdiv(wc, kw["BN"]),)](
            w, tab[:, c0:c0 + wc], tab.stride(0), rows, *lay, hk, m, wc, nb, tab.shape[0] // m,
            STORE=True, **kw)
        part = rows.view(T, hk, wc).sum(1)   # bf16 rows: summed in fp32, one rounding
        if out is None:
            return part
        out[:, c0:c0 + wc] = part
    return out


def _deterministic() -> bool:
    """peer_cuda.set_deterministic(True) or torch.use_deterministic_algorithms(True)."""
    from . import peer_cuda
    return peer_cuda.is_deterministic()


@_axpy_op.register_fake
def _(w, idx, tab, m, *lay):
    return tab.new_empty((idx.shape[0], tab.shape[1]))


@torch.library.custom_op("megapeer::grouped_scatter", mutates_args=())
def _scatter_op(coef: Tensor, idx: Tensor, src: Tensor, n_rows: int, m: int, order: Tensor,
                block_expert: Tensor, block_start: Tensor, expert_off: Tensor,
                counts: Tensor, inv: Tensor, coef_sorted: bool = False) -> Tensor:
    """coef_sorted: coef is [P, m] in expert order (the sorted form's s and w)."""
    return _scatter(coef, src, order, expert_off, counts, _hk(idx), n_rows, m, coef_sorted)


@_scatter_op.register_fake
def _(coef, idx, src, n_rows, m, *lay, coef_sorted=False):
    return src.new_empty((n_rows, src.shape[1]))


def _scatter(coef, src, order, expert_off, counts, hk, n_rows, m, coef_sorted, out=None,
             accumulate=False, **tiles):
    """The scatter kernel: grad [n_rows, d], expert e's rows the sum over its pairs
    order[expert_off[e]:][:counts[e]] of coef[pair]^T . src[pair // hk] (coef_sorted: the
    coefficient row is the pair's place in order). out: write it there instead (a
    contiguous [n_rows, d] tensor of any float dtype, e.g. an fp32 main_grad: each fp32 sum
    stored without a bf16 rounding); accumulate: add to out's values."""
    triton, _, _, scatter_kernel, _ = _k()
    src = _rows(src)
    coef = coef.contiguous()
    n_exp = n_rows // m
    d = src.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("_scatter: accumulate needs out")
        out = torch.empty(n_rows, d, dtype=src.dtype, device=src.device)
    elif tuple(out.shape) != (n_rows, d) or not out.is_contiguous():
        raise ValueError(f"_scatter: out must be a contiguous [{n_rows}, {d}] tensor, got "
                         f"{tuple(out.shape)} (contiguous: {out.is_contiguous()})")
    t = {**_tiles("scatter", m), **tiles}
    t["MC"] = min(t["MC"], _mb(m))
    t["I32"] = t["I32"] and _offsets_fit(src, coef)
    scatter_kernel[(n_exp * triton.cdiv(d, t["BN"]) * (_mb(m) // t["MC"]),)](
        coef, src, src.stride(0), out, order, expert_off, counts, hk, m, d, n_exp,
        MB=_mb(m), IEEE=src.dtype == torch.float32, SORTED=coef_sorted, ACC=accumulate, **t)
    return out


# the scatter over several micro-batches at once: its own column chunk (H200, 1.3B layer
# shape, 4 micro-batches: 2.98 / 3.19 ms against 3.15 / 3.37 with the single scatter's
# MC = 128; docs/benchmarks.md, calls 63 and 67)
MERGED_TILES = dict(MC=256)


def scatter_merged(coef: Tensor, src: Tensor, layouts, hk: int, n_rows: int, m: int,
                   out=None, accumulate=False) -> Tensor:
    """The grouped scatter over several micro-batches as one (deferred table gradients,
    ops/table_grads.py): coef [sum P_i, m] the micro-batches' coefficients in token order
    one after another, src [sum T_i, d] their token rows likewise; layouts: each one's
    (order, expert_off, counts). One loop per expert over all its pairs, one rounding.
    out / accumulate: as _scatter's."""
    order, expert_off, counts = merge_layouts(layouts)
    return _scatter(coef, src, order, expert_off, counts, hk, n_rows, m, False, out=out,
                    accumulate=accumulate, **MERGED_TILES)


def merge_layouts(layouts):
    """Several micro-batches' expert orders (order, expert_off, counts; int32, order as pair
    ids within each) as one over their pairs numbered one micro-batch after another: group
    g's pairs of micro-batch 0, then of 1, ... -> (merged order, start, total), start and
    total per group. On the device, no sort, no host sync: two Triton kernels
    (peer_merge_prefix, peer_merge_orders) where the layout's kernels run
    (_layout_kernels), else torch ops (merge_layouts_torch, their reference: ~55 launches
    at 4 micro-batches)."""
    orders = torch.cat([o for o, _, _ in layouts])
    G = layouts[0][2].numel()
    if not _layout_kernels(orders, G - 1):
        return merge_layouts_torch(layouts)
    triton, *_ = _k()
    from . import peer_grouped_kernels as pk
    offs = torch.stack([o for _, o, _ in layouts])
    counts = torch.stack([c for _, _, c in layouts])
    S = counts.shape[0]
    i32 = dict(dtype=torch.int32, device=orders.device)
    start, total, bases = torch.empty(G, **i32), torch.empty(G, **i32), torch.empty(S, **i32)
    pk.peer_merge_prefix[(1,)](counts, S, G, start, total, bases, GB=1024)
    merged = torch.empty(orders.numel(), **i32)
    pk.peer_merge_orders[(G,)](orders, offs, counts, G, S, start, bases, merged, BLOCK=1024)
    return merged, start, total


def merge_layouts_torch(layouts):
    """merge_layouts from torch ops (any device; the Triton kernels' reference)."""
    counts = torch.stack([c for _, _, c in layouts]).long()          # [S, E]
    total = counts.sum(0)
    start = torch.cumsum(total, 0) - total                           # e's first merged place
    before = torch.cumsum(counts, 0) - counts                        # e's pairs in earlier ones
    n_exp, dev = counts.shape[1], counts.device
    sizes = [o.numel() for o, _, _ in layouts]
    merged = torch.empty(sum(sizes), dtype=torch.int32, device=dev)
    base = 0
    for i, ((order, off, cnt), size) in enumerate(zip(layouts, sizes)):
        e = torch.repeat_interleave(torch.arange(n_exp, device=dev), cnt.long(),
                                    output_size=size)               # expert of each place
        shift = start + before[i] - off.long()                       # [E]
        merged[torch.arange(size, device=dev) + shift[e]] = order + base
        base += size
    return merged, start.int(), total.int()


GATHER_SUM = dict(BT=32, BN=256, num_warps=4)   # the sorted axpy's per-token sum


def gather_rows(rows: Tensor, inv: Tensor, out: Tensor) -> Tensor:
    """out[p] = rows[inv[p]] (out contiguous, rows' width): the gather-sum kernel with one
    row per output. H200, the deferral's copies at the 1.3B layer shape: 0.39 against 0.77
    ms with torch's index_select (docs/benchmarks.md, call 67)."""
    triton, *_, gather_sum = _k()
    rows = rows.contiguous()
    n, c = out.shape
    gs = GATHER_SUM
    gather_sum[(triton.cdiv(n, gs["BT"]), triton.cdiv(c, gs["BN"]))](
        rows, inv, out, out.stride(0), n, 1, c, inv, **gs)
    return out


@torch.library.custom_op("megapeer::grouped_axpy_sorted", mutates_args=())
def _axpy_sorted_op(w: Tensor, idx: Tensor, tab: Tensor, m: int, order: Tensor,
                    block_expert: Tensor, block_start: Tensor, expert_off: Tensor,
                    counts: Tensor, inv: Tensor, defer: int = 1) -> Tensor:
    """grouped_axpy on w [P, m] in expert order: torch's grouped GEMM (CUTLASS on sm90)
    writes each pair's row [P, c] in expert order, and a Triton kernel sums each token's
    rows in fp32 (column passes of at most ROWS_BYTES of rows). defer: as grouped_dot_sorted."""
    triton, *_, gather_sum = _k()
    T, d, hk = idx.shape[0], tab.shape[1], _hk(idx)
    n_exp = tab.shape[0] // m
    b = _rows(tab).view(n_exp, m, d)
    w = w.contiguous()
    ends = (expert_off + counts)[:n_exp]   # the sentinel's rows (past the last end): unwritten
    out = tab.new_empty((T, d))
    cols = max(64, ROWS_BYTES // max(1, w.shape[0] * tab.element_size()) // 64 * 64)
    gs = GATHER_SUM
    for c0 in range(0, d, cols):
        wc = min(cols, d - c0)
        rows = torch._grouped_mm(w, b if wc == d else b[:, :, c0:c0 + wc], offs=ends)
        gather_sum[(triton.cdiv(T, gs["BT"]), triton.cdiv(wc, gs["BN"]))](
            rows, inv, out[:, c0:], out.stride(0), T, hk, wc, expert_off[n_exp:], LIMIT=True,
            **gs)
    return out


@_axpy_sorted_op.register_fake
def _(w, idx, tab, m, *lay, defer=1):
    return tab.new_empty((idx.shape[0], tab.shape[1]))


@torch.library.custom_op("megapeer::table_grad_keep", mutates_args=())
def _keep_op(g: Tensor, a: Tensor, idx: Tensor, tab: Tensor, m: int, order: Tensor,
             block_expert: Tensor, block_start: Tensor, expert_off: Tensor, counts: Tensor,
             inv: Tensor, defer: int, coef_is_grad: bool) -> Tensor:
    """Backward of an expert-ordered dot (coef_is_grad: a = x) or axpy (a = w) with a
    deferred table gradient: a's gradient, and the table's scatter inputs handed to
    ops/table_grads.py (kept, or scattered into the table's gradient). One opaque op, so
    that a compiled backward keeps it (its output is used) and does not split."""
    from . import table_grads
    lay = (order, block_expert, block_start, expert_off, counts, inv)
    if coef_is_grad:
        ga = torch.ops.megapeer.grouped_axpy_sorted(g, idx, tab, m, *lay)
    else:
        ga = torch.ops.megapeer.grouped_dot_sorted(g, idx, tab, m, *lay)
    coef, src = (g, a) if coef_is_grad else (a, g)
    table_grads.keep(tab, coef, src, (order, expert_off, counts, inv), _hk(idx), m, defer)
    return ga


@_keep_op.register_fake
def _(g, a, idx, tab, m, *lay_defer_coef):
    return a.new_empty(a.shape)


def _setup(ctx, inputs, output):
    a, idx, tab, m, *lay = inputs      # (x or w), idx, table, m, layout (6), defer (sorted ops)
    ctx.defer = lay.pop() if len(lay) == 7 else 1
    ctx.save_for_backward(a, idx, tab, *lay)
    ctx.m = m


def _backward(ctx, g, other, coef_is_grad, in_expert_order):
    """Gradients of a dot (s = dot(x)) or an axpy (out = axpy(w)) from its output's g: the
    input's through the other op, the table's through the scatter (the dot's coefficients
    are g, over the saved x; the axpy's the saved w, over g). defer > 1: both from
    table_grad_keep (the table's deferred, ops/table_grads.py)."""
    a, idx, tab, *lay = ctx.saved_tensors
    if ctx.defer > 1:
        if ctx.needs_input_grad[2] or not ctx.needs_input_grad[0]:
            raise RuntimeError("a deferred table gradient needs the table detached and the "
                               "input requiring grad (ops/table_grads.py)")
        ga = torch.ops.megapeer.table_grad_keep(g, a, idx, tab, ctx.m, *lay, ctx.defer,
                                                coef_is_grad)
        return (ga,) + (None,) * 10
    ga = gt = None
    if ctx.needs_input_grad[0]:
        ga = other(g, idx, tab, ctx.m, *lay)
    if ctx.needs_input_grad[2]:
        coef, src = (g, a) if coef_is_grad else (a, g)
        gt = torch.ops.megapeer.grouped_scatter(coef, idx, src, tab.shape[0], ctx.m, *lay,
                                                coef_sorted=in_expert_order)
    return (ga, None, gt, None) + (None,) * (6 + in_expert_order)


for _sfx, _srt in (("", False), ("_sorted", True)):   # token order; [P, m] in expert order
    _d, _a = (getattr(torch.ops.megapeer, n + _sfx) for n in ("grouped_dot", "grouped_axpy"))
    torch.library.register_autograd(
        "megapeer::grouped_dot" + _sfx, functools.partial(
            _backward, other=_a, coef_is_grad=True, in_expert_order=_srt), setup_context=_setup)
    torch.library.register_autograd(
        "megapeer::grouped_axpy" + _sfx, functools.partial(
            _backward, other=_d, coef_is_grad=False, in_expert_order=_srt), setup_context=_setup)


def available():
    """(ok, reason): whether the grouped Triton path can run here."""
    import os
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"Triton is not installed ({e})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, "grouped Triton kernels"
    return False, "needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"


def gather_dot(x: Tensor, idx: Tensor, U: Tensor, m: int = 1,
               in_expert_order=False, lay=None, defer: int = 1) -> Tensor:
    """s [T, h, k, m]; in_expert_order: s [P, m] with the pairs sorted by expert.
    lay: layout(idx, ...) when the caller has it (one sort per layer step).
    defer > 1 (expert order; where table_grads.deferring says so): U's gradient deferred
    (ops/table_grads.py)."""
    idx = idx if idx.dtype == torch.long else idx.long()
    lay = lay if lay is not None else layout(idx, U.shape[0] // m, m)
    if in_expert_order:
        return _sorted_op(torch.ops.megapeer.grouped_dot_sorted, x, idx, U, m, lay, defer)
    return torch.ops.megapeer.grouped_dot(x, idx, U, int(m), *lay)


def gather_axpy(w: Tensor, idx: Tensor, V: Tensor, m: int = 1, in_expert_order=False,
                lay=None, defer: int = 1) -> Tensor:
    """in_expert_order: w [P, m] with the pairs sorted by expert (what gather_dot gave).
    defer: as gather_dot."""
    idx = idx if idx.dtype == torch.long else idx.long()
    lay = lay if lay is not None else layout(idx, V.shape[0] // m, m)
    if in_expert_order:
        return _sorted_op(torch.ops.megapeer.grouped_axpy_sorted, w, idx, V, m, lay, defer)
    return torch.ops.megapeer.grouped_axpy(w, idx, V, int(m), *lay)


def _sorted_op(op, a, idx, tab, m, lay, defer):
    if defer > 1:   # the table detached: its gradient comes from table_grad_keep
        return op(a, idx, tab.detach(), int(m), *lay, int(defer))
    return op(a, idx, tab, int(m), *lay)


SORTED_FORM = True   # False: wide experts keep the token-ordered form (bench A/B)


def takes_expert_order(a: Tensor, tab: Tensor, m: int) -> bool:
    """Whether a layer step with activations `a` and table `tab` takes the expert-ordered
    form: experts >= 128 wide (where the axpy writes a row per pair) whose rows
    torch._grouped_mm takes (bf16 on a GPU; any dtype elsewhere, for the tests)."""
    from . import peer_gmm
    if not SORTED_FORM or _mb(m) < 128 or not hasattr(torch, "_grouped_mm"):
        return False
    if tab.is_cuda and not (tab.dtype == a.dtype == torch.bfloat16):
        return False
    return peer_gmm.supports(m, tab.shape[1], tab.dtype, tab.shape[0] // m, cuda=tab.is_cuda)


def layout(idx: Tensor, n_exp: int, m: int) -> tuple:
    """The pairs of idx sorted by expert and cut into the kernels' blocks (one sort per
    layer step: cached for eager calls)."""
    return _layout(idx if idx.dtype == torch.long else idx.long(), n_exp, m)


def to_expert_order(t: Tensor, idx: Tensor, n_exp: int, m: int, lay=None) -> Tensor:
    """Per-pair values t [T, h, k] (the gates) in the expert order of gather_dot's s."""
    lay = lay if lay is not None else layout(idx, n_exp, m)
    return peer_ref.Permute.apply(t.reshape(-1), lay[0], lay[5])


def peer_experts(x, idx, gates, U, V, act, m: int = 1, defer: int = 1):
    """Single-process expert step on the grouped ops (as peer_ref.peer_experts), in the
    expert-ordered form where takes_expert_order says so (as models/peer.py runs it)."""
    if not takes_expert_order(x, U, m):
        return peer_ref.expert_step(gather_dot, gather_axpy, x, idx, gates, U, V, act, m)
    from . import table_grads
    lay = layout(idx, U.shape[0] // m, m)
    # deferred table gradients, as models/peer.py runs them (ops/table_grads.py)
    s = gather_dot(x, idx, U, m, True, lay, defer if table_grads.deferring(U, defer, x) else 1)
    w = act(s) * to_expert_order(gates, idx, U.shape[0] // m, m, lay).unsqueeze(-1)
    return gather_axpy(w, idx, V, m, True, lay,
                       defer if table_grads.deferring(V, defer, w) else 1)


__all__ = ["available", "gather_dot", "gather_axpy", "peer_experts", "peer_ref"]
