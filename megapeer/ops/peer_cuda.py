"""Fused CUDA path for PEER's expert step, registered as torch.library custom ops.

The same two functions as ops/peer_ref.py (read that first):

    s   = gather_dot(x, idx, U, m)     s[t,h,k,j] = U[idx[t,h,k]*m + j] . x[t]
    out = gather_axpy(w, idx, V, m)    out[t] = sum_{h,k,j} w[t,h,k,j] * V[idx[t,h,k]*m + j]

computed by the kernels in csrc/peer (extension ``megapeer._C``, imported lazily on
the first CUDA call, never at import time). Each op works on whatever d-slice of
the tables it is given, so under tensor parallelism gather_dot returns the partial
dot products to be all-reduced and gather_axpy the local output slice.

Ops (namespace ``megapeer``), each with a fake (meta) implementation for
torch.compile and a CPU implementation (the reference math) so that the
registration and the autograd formulas can be checked without a GPU:

    gather_dot(x, idx, U, m, algo, chunk) -> s            autograd: x, U
    gather_axpy(w, idx, V, m) -> out                      autograd: w, V
    expert_scatter(coef, idx, src, tab, n_rows, m, algo, chunk) -> (grad, dot)
        grad[r]   = sum over (p, j) with idx[p]*m + j = r of coef[p, j] * src[t(p)]
        dot[p, j] = tab[idx[p]*m + j] . src[t(p)]        (when tab is given)

Backward: gather_dot -> grad_x = gather_axpy(grad_s, idx, U), grad_U = scatter of
grad_s * x; gather_axpy -> grad_V = scatter of w * grad_out and grad_w =
V[rows] . grad_out, both in one expert-major pass over V.

Algorithms (docs/kernels.md has the H200 measurements behind the defaults):
  dot:     'token'  - one warp per token, table rows gathered (T*h*k*m row reads);
                      at least as fast as 'expert' including its sort when each
                      expert is chosen a few times per call (random routing,
                      many experts)
           'expert' - pairs sorted by expert and walked in blocks, each used row
                      read about once, x re-read from L2 per pair
           'auto'   - 'expert' when the pairs per expert in a call (T*h*k / N)
                      reach AUTO_EXPERT_REUSE, else 'token'. Not the default: with
                      512 pairs per 16-row expert (the 1B PEER benchmark) the walk
                      took 22.1 ms a call against 21.0 ms for 'token' (H200)
  scatter: 'sorted' - pairs sorted by expert, each gradient row written once, no
                      atomics, fixed summation order: bitwise deterministic; the
                      default (3.3x faster than the fastest atomics on an H200)
           'atomic' - one warp per token, vector atomics into a zeroed fp32
                      gradient (cast to bf16 after)
           'atomic_native' - the same with atomics in the table dtype (bf16 atomics
                      round at every addition: less memory, less accurate)
Deterministic mode (``set_deterministic(True)`` or
``torch.use_deterministic_algorithms(True)``) forces scatter='sorted'; every other
kernel is deterministic in both modes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import peer_ref

_DOT = {"token": 0, "expert": 1}
AUTO_EXPERT_REUSE = 32  # pairs per expert from which dot='auto' walks experts
_SCATTER = {"sorted": 0, "atomic": 1, "atomic_native": 2}


class _Settings:
    # Defaults chosen from bench/peer_kernel.py on an H200 (docs/kernels.md).
    dot = "token"
    scatter = "sorted"
    chunk = 256            # most pairs one warp handles for one expert row
    deterministic = False


_settings = _Settings()
_ext_module = None


def _ext():
    """Import megapeer._C on first use (ImportError if it was not built)."""
    global _ext_module
    if _ext_module is None:
        from megapeer import _C  # noqa: PLC0415  (lazy by design)
        _ext_module = _C
    return _ext_module


_available_cache: dict = {}


def available():
    """(ok, reason): whether the fused kernels can run on the current CUDA device."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    dev = torch.cuda.current_device()
    if dev not in _available_cache:
        _available_cache[dev] = _check_available()
    return _available_cache[dev]


def _check_available():
    try:
        ext = _ext()
    except ImportError as e:
        return False, (f"extension megapeer._C is not built ({e}); build it on a CUDA machine with "
                       "MEGAPEER_BUILD_EXT=1 pip install --no-build-isolation -e .")
    name = torch.cuda.get_device_name()
    archs = ",".join(f"sm_{a}" for a in str(ext.ARCHS).split("_"))
    major, minor = torch.cuda.get_device_capability()
    version, err = ext.binary_version()
    if version < 0:
        return False, (f"megapeer._C was built for {archs} and has no kernel for {name} "
                       f"(sm_{major}{minor}): {err}; rebuild with MEGAPEER_CUDA_ARCHS")
    return True, f"fused CUDA kernels (megapeer._C, {archs}) on {name}"


def supports(*tensors: Tensor) -> bool:
    """True when the fused kernels take these operands (CUDA, all bf16 or all fp32)."""
    dt = tensors[0].dtype
    return dt in (torch.bfloat16, torch.float32) and all(t.is_cuda and t.dtype == dt for t in tensors)


def set_deterministic(flag: bool = True) -> None:
    """Force the bitwise-repeatable algorithms (scatter='sorted')."""
    _settings.deterministic = bool(flag)


def is_deterministic() -> bool:
    return _settings.deterministic or torch.are_deterministic_algorithms_enabled()


def set_algorithms(dot: Optional[str] = None, scatter: Optional[str] = None, chunk: Optional[int] = None) -> None:
    """Choose the kernels (see the module docstring); None keeps the current choice."""
    if dot is not None:
        if dot not in _DOT and dot != "auto":
            raise ValueError(f"dot must be one of {sorted(_DOT) + ['auto']}, got {dot!r}")
        _settings.dot = dot
    if scatter is not None:
        if scatter not in _SCATTER:
            raise ValueError(f"scatter must be one of {sorted(_SCATTER)}, got {scatter!r}")
        _settings.scatter = scatter
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError("chunk must be >= 1")
        _settings.chunk = int(chunk)


def get_algorithms() -> dict:
    return {"dot": _settings.dot, "scatter": _scatter_name(), "chunk": _settings.chunk,
            "deterministic": is_deterministic()}


def _scatter_name() -> str:
    return "sorted" if is_deterministic() else _settings.scatter


# ---------------------------------------------------------------------------
# CPU implementations (the reference math), used by opcheck and CPU tests.

def _pair_tokens(idx: Tensor) -> Tensor:
    t = torch.arange(idx.shape[0], device=idx.device)
    return t.view(-1, *([1] * (idx.dim() - 1))).expand(idx.shape)


def _scatter_ref(coef, idx, src, tab, n_rows, m, into=None):
    acc = torch.promote_types(src.dtype, torch.float32)            # fp32 accumulation, fp64 kept
    rows = peer_ref._rows(idx, m)                                   # [T, ..., m]
    d = src.shape[1]
    s32 = src.to(acc)[_pair_tokens(idx)].unsqueeze(-2)              # [T, ..., 1, d]
    contrib = coef.to(acc).unsqueeze(-1) * s32                      # [T, ..., m, d]
    grad = torch.zeros(n_rows, d, dtype=acc, device=src.device)
    grad.index_add_(0, rows.reshape(-1), contrib.reshape(-1, d))
    if tab is None:
        dot = src.new_empty(0)
    else:
        dot = (tab.to(acc)[rows] * s32).sum(-1).to(src.dtype)
    if into is not None:              # gradient-accumulation fusion: added in fp32, not rounded first
        into.add_(grad.to(into.dtype))
        return src.new_empty(0), dot
    return grad.to(src.dtype), dot


# ---------------------------------------------------------------------------
# Custom ops.

# acc (optional, the forward ops): an fp32 tensor of the table's shape (Megatron's
# main_grad) that the table gradient is added to in the backward, instead of being returned
# (the table gets none: gradient-accumulation fusion, ops/grad_accum.py).

@torch.library.custom_op("megapeer::gather_dot", mutates_args=())
def _gather_dot_op(x: Tensor, idx: Tensor, U: Tensor, m: int, algo: int, chunk: int,
                   acc: Optional[Tensor] = None) -> Tensor:
    if x.is_cuda:
        return _ext().gather_dot(x, idx, U, m, algo, chunk)
    return peer_ref.gather_dot(x, idx, U, m).clone()


@_gather_dot_op.register_fake
def _(x, idx, U, m, algo, chunk, acc=None):
    return x.new_empty((*idx.shape, m))


@torch.library.custom_op("megapeer::gather_axpy", mutates_args=())
def _gather_axpy_op(w: Tensor, idx: Tensor, V: Tensor, m: int, acc: Optional[Tensor] = None) -> Tensor:
    if V.is_cuda:
        return _ext().gather_axpy(w, idx, V, m)
    return peer_ref.gather_axpy(w, idx, V, m).clone()


@_gather_axpy_op.register_fake
def _(w, idx, V, m, acc=None):
    return V.new_empty((idx.shape[0], V.shape[1]))


@torch.library.custom_op("megapeer::expert_scatter", mutates_args=())
def _expert_scatter_op(coef: Tensor, idx: Tensor, src: Tensor, tab: Optional[Tensor], n_rows: int, m: int,
                       algo: int, chunk: int) -> tuple[Tensor, Tensor]:
    if src.is_cuda:
        return _ext().expert_scatter(coef, idx, src, tab, n_rows, m, algo, chunk)
    return _scatter_ref(coef, idx, src, tab, n_rows, m)


@_expert_scatter_op.register_fake
def _(coef, idx, src, tab, n_rows, m, algo, chunk):
    dot = src.new_empty(coef.shape) if tab is not None else src.new_empty(0)
    return src.new_empty((n_rows, src.shape[1])), dot


@torch.library.custom_op("megapeer::expert_scatter_acc", mutates_args=("acc",))
def _expert_scatter_acc_op(coef: Tensor, idx: Tensor, src: Tensor, tab: Optional[Tensor], acc: Tensor, m: int,
                           algo: int, chunk: int) -> Tensor:
    """expert_scatter with the table gradient added to acc (fp32); returns the dot."""
    if src.is_cuda:
        return _ext().expert_scatter(coef, idx, src, tab, acc.shape[0], m, algo, chunk, acc)[1]
    return _scatter_ref(coef, idx, src, tab, acc.shape[0], m, into=acc)[1]


@_expert_scatter_acc_op.register_fake
def _(coef, idx, src, tab, acc, m, algo, chunk):
    return src.new_empty(coef.shape) if tab is not None else src.new_empty(0)


def _table_grad(coef, idx, src, tab, tab_rows, acc, m, algo, chunk):
    """(table gradient, dot): returned, or added to acc (then None)."""
    if acc is None:
        return torch.ops.megapeer.expert_scatter(coef, idx, src, tab, tab_rows.shape[0], m, algo, chunk)
    return None, torch.ops.megapeer.expert_scatter_acc(coef, idx, src, tab, acc, m, algo, chunk)


def _dot_setup(ctx, inputs, output):
    x, idx, U, m, algo, chunk, acc = inputs
    ctx.save_for_backward(x, idx, U, acc)
    ctx.m, ctx.chunk, ctx.scatter = m, chunk, _SCATTER[_scatter_name()]


def _dot_backward(ctx, grad_s):
    x, idx, U, acc = ctx.saved_tensors
    grad_x = grad_U = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.megapeer.gather_axpy(grad_s, idx, U, ctx.m)
    if ctx.needs_input_grad[2]:
        grad_U, _ = _table_grad(grad_s, idx, x, None, U, acc, ctx.m, ctx.scatter, ctx.chunk)
    return grad_x, None, grad_U, None, None, None, None


def _axpy_setup(ctx, inputs, output):
    w, idx, V, m, acc = inputs
    ctx.save_for_backward(w, idx, V, acc)
    ctx.m, ctx.chunk = m, _settings.chunk
    ctx.scatter, ctx.dot = _SCATTER[_scatter_name()], _dot_algo(idx, V.shape[0], m)


def _axpy_backward(ctx, grad_out):
    w, idx, V, acc = ctx.saved_tensors
    need_w, need_V = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_w = grad_V = None
    if need_V:   # one pass over V gives both: grad_V rows and grad_w = V[rows] . grad_out
        grad_V, dot = _table_grad(w, idx, grad_out, V if need_w else None, V, acc, ctx.m, ctx.scatter,
                                  ctx.chunk)
        if need_w:
            grad_w = dot
    elif need_w:
        grad_w = torch.ops.megapeer.gather_dot(grad_out, idx, V, ctx.m, ctx.dot, ctx.chunk)
    return grad_w, None, grad_V, None, None


torch.library.register_autograd("megapeer::gather_dot", _dot_backward, setup_context=_dot_setup)
torch.library.register_autograd("megapeer::gather_axpy", _axpy_backward, setup_context=_axpy_setup)


# ---------------------------------------------------------------------------
# Public API (what ops/dispatch.py calls).

FUSED_ACCUMULATION = True   # gather_dot / gather_axpy take acc (ops/grad_accum.py)
SKIPS_ID_MINUS_ONE = True   # a pair with id -1 reads and adds nothing (its s, grad_w: 0)


def gather_dot(x: Tensor, idx: Tensor, U: Tensor, m: int = 1, acc: Optional[Tensor] = None) -> Tensor:
    """s[t,h,k,j] = U[idx*m+j] . x[t] with the fused kernels (autograd to x and U; U's
    gradient added to acc instead when given)."""
    return torch.ops.megapeer.gather_dot(x, idx.long(), U, int(m), _dot_algo(idx, U.shape[0], m),
                                         _settings.chunk, acc)


def _dot_algo(idx: Tensor, n_rows: int, m: int) -> int:
    if _settings.dot != "auto":
        return _DOT[_settings.dot]
    pairs_per_expert = idx.numel() / max(n_rows // max(int(m), 1), 1)
    return _DOT["expert" if pairs_per_expert >= AUTO_EXPERT_REUSE else "token"]


def gather_axpy(w: Tensor, idx: Tensor, V: Tensor, m: int = 1, acc: Optional[Tensor] = None) -> Tensor:
    """out[t] = sum w[t,h,k,j] V[idx*m+j] with the fused kernels (autograd to w and V; V's
    gradient added to acc instead when given)."""
    return torch.ops.megapeer.gather_axpy(w, idx.long(), V, int(m), acc)


def peer_experts(x, idx, gates, U, V, act, m: int = 1):
    """Single-process expert step on the fused ops: sum of gate * act(u.x) * v."""
    return peer_ref.expert_step(gather_dot, gather_axpy, x, idx, gates, U, V, act, m)
