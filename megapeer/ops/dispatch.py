"""Choose the reference or fused implementation of PEER's expert step.

mode: 'reference' always uses ops/peer_ref.py; 'fused' requires the compiled
extension and CUDA tensors (error otherwise); 'auto' uses fused when both are
available and falls back to the reference otherwise; 'grouped' uses the Triton
grouped-matmul kernels of ops/peer_grouped.py (many tokens per expert; error when
Triton cannot run).
"""
import torch

from . import peer_ref


def kernel_status():
    """(available: bool, reason: str) for the fused CUDA path."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        from . import peer_cuda
    except ImportError as e:  # module not written yet, or extension missing
        return False, f"fused PEER ops unavailable: {e}"
    return peer_cuda.available()


_MODES = ("auto", "fused", "reference", "grouped")


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


def _path(mode, *tensors):
    """The module (peer_grouped, peer_cuda or peer_ref) that serves `mode` for these operands."""
    if mode == "grouped":
        from . import peer_grouped
        ok, why = peer_grouped.available()
        if not ok:
            raise RuntimeError(f"model.peer.kernel=grouped but {why}")
        return peer_grouped
    if _use_fused(mode, *tensors):
        from . import peer_cuda
        return peer_cuda
    return peer_ref


def gather_dot(x, idx, U, m: int = 1, mode: str = "auto"):
    return _path(mode, x, U).gather_dot(x, idx, U, m)


def gather_axpy(w, idx, V, m: int = 1, mode: str = "auto"):
    return _path(mode, w, V).gather_axpy(w, idx, V, m)
