"""Choose the reference or fused implementation of PEER's expert step.

mode: 'reference' always uses ops/peer_ref.py; 'fused' requires the compiled
extension and CUDA tensors (error otherwise); 'grouped' uses the Triton
grouped-matmul kernels of ops/peer_grouped.py (error when Triton cannot run); 'gmm'
uses torch's grouped GEMM (ops/peer_gmm.py: CUTLASS on sm90, any device);
'auto', on CUDA tensors: for experts of width >= GROUPED_MIN_WIDTH chosen by
>= GROUPED_MIN_PAIRS (token, head) pairs each on average in the call (read from the
shapes, no host sync) the grouped Triton kernels, fused otherwise; the reference where
neither can run. 'auto' never picks gmm: the grouped Triton kernels were faster at every
expert width measured, in both modes (H200, docs/kernels.md).
"""

import torch

from . import peer_ref

# Measured crossover (H200, docs/kernels.md): at width 16 the grouped kernels are 3x to
# 6x faster than the fused ones with 32 to 512 pairs per expert; with single-neuron
# experts and ~4 pairs per expert they are 27x slower.
GROUPED_MIN_WIDTH = 16
GROUPED_MIN_PAIRS = 16


def prefers_grouped(idx_numel: int, table_rows: int, m: int) -> bool:
    """Whether 'auto' picks the grouped kernels for this shape (when they can run)."""
    return m >= GROUPED_MIN_WIDTH and idx_numel >= GROUPED_MIN_PAIRS * (table_rows // m)


def kernel_status():
    """(available: bool, reason: str) for the fused CUDA path."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        from . import peer_cuda
    except ImportError as e:  # module not written yet, or extension missing
        return False, f"fused PEER ops unavailable: {e}"
    return peer_cuda.available()


_MODES = ("auto", "fused", "reference", "grouped", "gmm")


def _use_fused(mode: str, *tensors: torch.Tensor) -> bool:
    if mode not in _MODES:
        raise ValueError(f"model.peer.kernel must be one of {_MODES}, got {mode!r}")
    if mode == "reference":
        return False
    if mode == "auto" and not all(t.is_cuda for t in tensors):
        return False      # CPU tensors: the reference, without touching CUDA
    ok, why = kernel_status()
    if mode == "fused":
        if not ok:
            raise RuntimeError(f"model.peer.kernel=fused but {why}")
        from . import peer_cuda
        if not peer_cuda.supports(*tensors):
            raise RuntimeError("model.peer.kernel=fused needs CUDA tensors, all bfloat16 or all float32; got "
                               + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
        return True
    if not ok:
        return False
    from . import peer_cuda
    return peer_cuda.supports(*tensors)


def _path(mode, idx, m, *tensors):
    """The module (peer_grouped, peer_gmm, peer_cuda or peer_ref) that serves `mode` here."""
    if mode == "gmm":
        from . import peer_gmm
        ok, why = peer_gmm.available()
        if not ok:
            raise RuntimeError(f"model.peer.kernel=gmm but {why}")
        return peer_gmm
    if mode == "grouped":
        from . import peer_grouped
        ok, why = peer_grouped.available()
        if not ok:
            raise RuntimeError(f"model.peer.kernel=grouped but {why}")
        return peer_grouped
    if (mode == "auto" and all(t.is_cuda for t in tensors)
            and prefers_grouped(idx.numel(), tensors[-1].shape[0], m)):
        from . import peer_grouped
        if peer_grouped.available()[0]:
            return peer_grouped
    if _use_fused(mode, *tensors):
        from . import peer_cuda
        return peer_cuda
    return peer_ref


def _call(op, path, a, idx, tab, m, acc):
    """acc (gradient-accumulation fusion, ops/grad_accum.py): the fused CUDA ops add the
    table gradient to it natively; the reference routes it there (the same semantics, for
    tests and the CPU); the grouped and gmm paths return plain table gradients (fusing
    their all-rows scatters measured no faster: docs/kernels.md)."""
    if acc is not None and getattr(path, "FUSED_ACCUMULATION", False):
        return getattr(path, op)(a, idx, tab, m, acc=acc)
    if acc is not None and path is peer_ref:
        from .grad_accum import RouteGrad
        tab = RouteGrad.apply(tab, acc)
    return getattr(path, op)(a, idx, tab, m)


def gather_dot(x, idx, U, m: int = 1, mode: str = "auto", acc=None, in_expert_order=False,
               lay=None, defer: int = 1):
    """acc: U's fp32 main_grad for gradient-accumulation fusion (ops/grad_accum.py).
    in_expert_order (where expert_order said so): s [P, m] with the pairs sorted by expert;
    there, lay: the layout from expert_layout, and defer: U's gradient once per `defer`
    micro-batches (ops/table_grads.py; where table_grads.deferring says so)."""
    path = _path(mode, idx, m, x, U)
    if in_expert_order:
        return path.gather_dot(x, idx, U, m, in_expert_order=True, lay=lay, defer=defer)
    return _call("gather_dot", path, x, idx, U, m, acc)


def gather_axpy(w, idx, V, m: int = 1, mode: str = "auto", acc=None, in_expert_order=False,
                lay=None, defer: int = 1):
    """acc: V's fp32 main_grad for gradient-accumulation fusion (ops/grad_accum.py).
    in_expert_order: w [P, m] in the expert order of gather_dot's s (lay, defer as there)."""
    path = _path(mode, idx, m, w, V)
    if in_expert_order:
        return path.gather_axpy(w, idx, V, m, in_expert_order=True, lay=lay, defer=defer)
    return _call("gather_axpy", path, w, idx, V, m, acc)


def foreign_pairs_to_rows(mode, idx, own, n_local: int, m: int, x, U):
    """idx (this expert-parallel rank's local ids) with the pairs of other ranks (own
    False; their gates are zero) made harmless for the path that will run:
    - fused CUDA kernels: id -1, which they skip (no table read, nothing added, zero dot
      products and gate gradients), so each rank does only its own experts' work;
    - grouped Triton kernels: id n_local, their sentinel expert, sorted last and left out
      of the tiles' work (zero dot products, nothing added);
    - gmm: clamped into range, onto two rows that stay in L2 (computed with gate 0);
    - reference: spread over the rows. Its index backward (index_put_ with accumulate, on
      the GPU) works through the repeats of one row one by one; clamped, a 2-GPU EP step
      ran ~26x slower than one GPU (H200, docs/benchmarks.md)."""
    path = _path(mode, idx, m, x, U)
    if path is peer_ref:
        return torch.where(own, idx, idx.remainder(n_local))
    if getattr(path, "SKIPS_ID_MINUS_ONE", False):
        return torch.where(own, idx, -1)
    if getattr(path, "SKIPS_SENTINEL", False):
        return torch.where(own, idx, n_local)
    return idx.clamp(0, n_local - 1)


def expert_order(mode, idx, m, x, U) -> bool:
    """Whether a layer step takes the grouped kernels' expert-ordered form: s and w as
    [P, m] with the (token, expert) pairs sorted by expert, so that the axpy runs as
    torch's grouped GEMM on them (ops/peer_grouped.py, takes_expert_order). Its table
    gradients are plain (no accumulator), as on the grouped path."""
    from . import peer_grouped
    return (_path(mode, idx, m, x, U) is peer_grouped
            and peer_grouped.takes_expert_order(x, U, m))


def to_expert_order(gates, idx, n_exp: int, m: int, lay=None):
    """Per-pair gates [T, h, k] -> [P] in the expert order of the expert-ordered form."""
    from . import peer_grouped
    return peer_grouped.to_expert_order(gates, idx, n_exp, m, lay)


def expert_layout(idx, n_exp: int, m: int):
    """The expert-ordered form's layout of idx, computed once per layer step and passed to
    gather_dot, to_expert_order and gather_axpy."""
    from . import peer_grouped
    return peer_grouped.layout(idx, n_exp, m)
