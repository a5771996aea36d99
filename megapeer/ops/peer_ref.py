"""Plain-PyTorch reference for PEER's expert step.

The expert step is two gather ops over the expert tables, split so that the
tensor-parallel all-reduce of the partial dot products fits between them:

    s  = gather_dot(x, idx, U, m)      s[t,h,k,j] = U[idx[t,h,k]*m + j] . x[t]
    (all-reduce s over tensor parallel; w = gate * act(s), computed by the caller)
    out = gather_axpy(w, idx, V, m)    out[t] = sum_{h,k,j} w[t,h,k,j] * V[idx[t,h,k]*m + j]

Shapes: x [T, d]; idx [T, h, k] int64 in [0, N); U, V [N*m, d] (m = expert hidden
size, 1 for single-neuron experts); s and w [T, h, k, m]; out [T, d].
Autograd flows to x, U, w and V. The fused CUDA kernels (ops/peer_cuda.py) compute
the same two functions; this file is their reference. LayoutCache and Permute (below)
serve the two grouped paths (peer_grouped.py, peer_gmm.py), which sort the pairs by expert
(sort_by_expert).
"""
import weakref

import torch


def _rows(idx: torch.Tensor, m: int) -> torch.Tensor:
    if m == 1:
        return idx.unsqueeze(-1)
    return idx.unsqueeze(-1) * m + torch.arange(m, device=idx.device)


def gather_dot(x: torch.Tensor, idx: torch.Tensor, U: torch.Tensor, m: int = 1) -> torch.Tensor:
    rows = _rows(idx, m)                        # [T, h, k, m]
    u = U[rows]                                 # [T, h, k, m, d]
    return torch.einsum("thkmd,td->thkm", u, x)


def gather_axpy(w: torch.Tensor, idx: torch.Tensor, V: torch.Tensor, m: int = 1) -> torch.Tensor:
    rows = _rows(idx, m)
    v = V[rows]                                 # [T, h, k, m, d]
    return torch.einsum("thkmd,thkm->td", v, w)


def expert_step(dot, axpy, x, idx, gates, U, V, act, m: int = 1):
    """Sum over heads/experts of gate * act(u.x) * v, on the given gather_dot / gather_axpy."""
    s = dot(x, idx, U, m)
    w = act(s) * gates.unsqueeze(-1)
    return axpy(w, idx, V, m)


def peer_experts(x, idx, gates, U, V, act, m: int = 1):
    """Single-process expert step on the reference ops."""
    return expert_step(gather_dot, gather_axpy, x, idx, gates, U, V, act, m)


def sort_by_expert(flat: torch.Tensor, n_exp: int):
    """Expert ids flat [P] (in [0, n_exp)) sorted, stably: (sorted ids, order, inv), order
    and inv int64 with flat[order] sorted and order[inv] = arange(P). The sort runs on the
    narrowest integer type that holds n_exp (a GPU radix sort makes one pass per key byte:
    2 for <= 32767 experts against 8 for int64), and inv is a scatter, not a second sort.
    The sorted ids come back in that narrow type."""
    keys, order = torch.sort(flat.to(key_dtype(n_exp)), stable=True)
    inv = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device))
    return keys, order, inv


def key_dtype(n_exp: int) -> torch.dtype:
    """The narrowest integer type that holds ids below n_exp (sort_by_expert's keys)."""
    return (torch.int16 if n_exp <= torch.iinfo(torch.int16).max else
            torch.int32 if n_exp <= torch.iinfo(torch.int32).max else torch.int64)


class Permute(torch.autograd.Function):
    """rows[perm] for a permutation (the pairs into or out of expert order, on the grouped
    paths); backward: grad[inverse]."""

    @staticmethod
    def forward(ctx, rows, perm, inv):
        ctx.save_for_backward(inv)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return g.index_select(0, inv), None, None


class LayoutCache:
    """compute(idx, key) -> a layout (the pairs sorted by expert), kept for the latest
    eager call: a PEER layer's forward dot and axpy get the same idx tensor and share one
    sort (the backward ops reuse what autograd saved). Under torch.compile it computes
    afresh and the graph's common-subexpression pass does the sharing."""

    def __init__(self, compute):
        self.compute = compute
        self.last = None   # (weakref to idx, its version, key, layout)

    def __call__(self, idx: torch.Tensor, key):
        if torch.compiler.is_compiling():
            return self.compute(idx, key)
        c = self.last
        if c is not None and c[0]() is idx and c[1] == idx._version and c[2] == key:
            return c[3]
        lay = self.compute(idx, key)
        self.last = (weakref.ref(idx), idx._version, key, lay)
        return lay

