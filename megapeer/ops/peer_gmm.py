"""PEER's expert step as torch's grouped GEMM (`torch._grouped_mm`), for wide experts.

The same two functions as ops/peer_ref.py:

    s   = gather_dot(x, idx, U, m)     s[t,h,k,j] = U[idx[t,h,k]*m + j] . x[t]
    out = gather_axpy(w, idx, V, m)    out[t] = sum_{h,k,j} w[t,h,k,j] * V[idx[t,h,k]*m + j]

Computed the way MoE layers route tokens: the P = T*h*k (token, expert) pairs are sorted
by expert, each pair's token row is copied into that order ([P, d]), and one grouped GEMM
multiplies every expert's rows by its m table rows (CUTLASS on sm90; a loop of matmuls
elsewhere, the CPU included). The axpy's per-pair rows ([P, d]) are put back in pair
order and summed per token. Backward: two more grouped GEMMs per op (the activation
gradient, and the table gradient with the groups along the reduced dimension); the row
copies are autograd functions whose backward is the matching gather or per-token sum,
so nothing is summed with atomics and the path is deterministic.

Cost: [P, d] buffers per layer (the sorted token rows, saved for grad U), so it suits
wide experts with few pairs per token (PEER at equal active FLOPs with m >= 64: P = T*32
at m=256). Needs 16-byte rows (m and d multiples of 8 in bf16, of 4 in fp32) and, on a
GPU, at most MAX_GROUPS = 1023 experts per table (per expert-parallel rank).
Select it with model.peer.kernel=gmm. Tests: tests/test_peer_gmm.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import peer_ref


def _layout_of(idx: Tensor, n_exp: int):
    """(tok, order, inv, offs): pairs sorted by expert (stable), the token of each sorted
    pair, the inverse permutation, and int32 group ends per expert."""
    srt, order, inv = peer_ref.sort_by_expert(idx.reshape(-1), n_exp)
    hk = idx.numel() // idx.shape[0]
    tok = torch.div(order, hk, rounding_mode="floor")
    offs = torch.searchsorted(srt, torch.arange(n_exp, device=idx.device, dtype=srt.dtype),
                              right=True).to(torch.int32)
    return tok, order, inv, offs


_layout = peer_ref.LayoutCache(_layout_of)


def _spread(x: Tensor, tok: Tensor) -> Tensor:
    return x.index_select(0, tok)


def _collect(rows: Tensor, inv: Tensor, T: int) -> Tensor:
    """Per-token sum of sorted pair rows: back to pair order, then [T, hk, c].sum(1)."""
    return rows.index_select(0, inv).view(T, -1, rows.shape[-1]).sum(1)


class _Spread(torch.autograd.Function):
    """x [T, c] -> its rows in sorted pair order [P, c]; backward: the per-token sum."""

    @staticmethod
    def forward(ctx, x, tok, inv):
        ctx.save_for_backward(inv)
        ctx.T = x.shape[0]
        return _spread(x, tok)

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return _collect(g, inv, ctx.T), None, None


class _Collect(torch.autograd.Function):
    """Sorted pair rows [P, c] -> per-token sums [T, c]; backward: spread to the pairs."""

    @staticmethod
    def forward(ctx, rows, tok, inv, T: int):
        ctx.save_for_backward(tok)
        return _collect(rows, inv, T)

    @staticmethod
    def backward(ctx, g):
        tok, = ctx.saved_tensors
        return _spread(g, tok), None, None, None


# torch._grouped_mm behind custom ops: its fake (meta) function accepts bf16 only, while
# the eager op also runs fp32 (loop of matmuls), which the CPU tests and fp32 runs use.
@torch.library.custom_op("megapeer::gmm", mutates_args=())
def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [P, k] x b [E, k, n] -> [P, n]: rows offs[e-1]:offs[e] of a times b[e]."""
    return torch._grouped_mm(a, b, offs=offs)


@_gmm.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("megapeer::gmm_wgrad", mutates_args=())
def _gmm_wgrad(a: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    """[E, k, n]: a_e^T g_e per group of rows (the weight gradient of megapeer::gmm)."""
    return torch._grouped_mm(a.t(), g, offs=offs)


@_gmm_wgrad.register_fake
def _(a, g, offs):
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1])


def _gmm_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _gmm_backward(ctx, g):
    a, b, offs = ctx.saved_tensors
    g = g.contiguous()
    ga = torch.ops.megapeer.gmm(g, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gb = torch.ops.megapeer.gmm_wgrad(a, g, offs) if ctx.needs_input_grad[1] else None
    return ga, gb, None


torch.library.register_autograd("megapeer::gmm", _gmm_backward, setup_context=_gmm_setup)


MAX_GROUPS = 1023   # torch._grouped_mm's CUDA kernels take at most this many groups


def supports(m: int, d: int, dtype: torch.dtype, n_exp: int = 1, cuda: bool = False) -> bool:
    """Whether rows of m and of d elements are 16-byte aligned (torch._grouped_mm's rule)
    and, on a GPU, the table has at most MAX_GROUPS experts."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    return m % per == 0 and d % per == 0 and (not cuda or n_exp <= MAX_GROUPS)


def _check(a: Tensor, tab: Tensor, m: int):
    if tab.shape[0] % m:
        raise ValueError(f"expert table has {tab.shape[0]} rows, not a multiple of m={m}")
    if a.dtype != tab.dtype:
        raise TypeError(f"gmm PEER path: activations {a.dtype} and table {tab.dtype} differ")
    if not supports(m, tab.shape[1], tab.dtype):
        per = 16 // tab.element_size()
        raise ValueError(f"model.peer.kernel=gmm needs model.peer.expert_hidden ({m}) and the "
                         f"table width ({tab.shape[1]}) to be multiples of {per} for {tab.dtype} "
                         f"(16-byte rows for torch._grouped_mm)")
    n_exp = tab.shape[0] // m
    if tab.is_cuda and n_exp > MAX_GROUPS:
        raise ValueError(f"model.peer.kernel=gmm: torch._grouped_mm takes at most {MAX_GROUPS} "
                         f"experts per call on a GPU and this table holds {n_exp} (per "
                         f"expert-parallel rank); use model.peer.kernel=grouped, or more "
                         f"expert parallelism")


def gather_dot(x: Tensor, idx: Tensor, U: Tensor, m: int = 1) -> Tensor:
    _check(x, U, m)
    n_exp, d = U.shape[0] // m, U.shape[1]
    tok, order, inv, offs = _layout(idx, n_exp)
    xp = _Spread.apply(x, tok, inv)                                       # [P, d]
    sp = torch.ops.megapeer.gmm(xp, U.view(n_exp, m, d).transpose(1, 2), offs)   # [P, m]
    return peer_ref.Permute.apply(sp, inv, order).view(*idx.shape, m)


def gather_axpy(w: Tensor, idx: Tensor, V: Tensor, m: int = 1) -> Tensor:
    _check(w, V, m)
    n_exp, d = V.shape[0] // m, V.shape[1]
    tok, order, inv, offs = _layout(idx, n_exp)
    wp = peer_ref.Permute.apply(w.reshape(-1, m), order, inv)           # [P, m]
    yp = torch.ops.megapeer.gmm(wp, V.view(n_exp, m, d), offs)           # [P, d]
    return _Collect.apply(yp, tok, inv, idx.shape[0])


def available():
    """(ok, reason): whether torch has the grouped GEMM op."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    return True, "torch._grouped_mm"


def peer_experts(x, idx, gates, U, V, act, m: int = 1):
    """Single-process expert step on the gmm ops (as peer_ref.peer_experts)."""
    return peer_ref.expert_step(gather_dot, gather_axpy, x, idx, gates, U, V, act, m)


__all__ = ["available", "gather_dot", "gather_axpy", "peer_experts"]
