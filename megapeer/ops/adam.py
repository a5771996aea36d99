"""AdamW on an fp32 main parameter that also writes its bf16 / fp16 model copy: one Triton
pass instead of torch's fused Adam followed by Megatron's main -> model copy.

Without Transformer Engine or apex, Megatron steps torch's Adam on fp32 main parameters
and then copies each into the bf16 model parameter (a second pass that reads the fp32
parameter again). Per element this kernel reads p, g, m, v (16 B) and writes p, m, v and
the model copy (14 B), against 28 + 6 B for the two passes.
(training.triton_adam; training/optimizer.py runs it for tensors of at least MIN_NUMEL
elements, torch's fused Adam for the rest; H200 figures in docs/benchmarks.md.)

The update is torch's AdamW (amsgrad off, not maximising), in fp32:
  g = g * gmul (the clip factor, 1 when not clipping); p = p - lr * wd * p
  m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g * g
  p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps);  out = p (rounded)
with t the step count read from the device (torch's fused layout: an fp32 scalar tensor,
incremented by the caller), so no host synchronisation. Bias corrections are fp32 here
(torch's fused kernel: double), so results agree to ~1e-7 relative, not bitwise.
Tests: tests/test_adam.py (CPU under TRITON_INTERPRET=1, or a GPU).
"""
import math

import torch

from .triton_util import available, interpret, lazy_kernel  # noqa: F401  (available)

BLOCK = 4096      # elements per program
NUM_WARPS = 8
# Smaller tensors stay on torch's fused Adam (one multi-tensor launch for all of them):
# a Triton launch per tensor costs host time, and the bytes are in the large tensors.
MIN_NUMEL = 1 << 22


def _build(triton, tl):
    @triton.jit
    def adamw_copy(p, g, m, v, out, step, n, lr, b1, b2, log2_b1, log2_b2, eps, wd,
                   gmul, BLOCK: tl.constexpr, BF16: tl.constexpr):   # name in profiles
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(step)
        bc1 = 1.0 - tl.exp2(t * log2_b1)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_b2))
        x = tl.load(p + offs, mask=mask)
        gr = tl.load(g + offs, mask=mask) * gmul
        ma = tl.load(m + offs, mask=mask)
        va = tl.load(v + offs, mask=mask)
        x = x - lr * wd * x
        ma = b1 * ma + (1.0 - b1) * gr
        va = b2 * va + (1.0 - b2) * gr * gr
        x = x - (lr / bc1) * ma / (tl.sqrt(va) / bc2_sqrt + eps)
        tl.store(p + offs, x, mask=mask)
        tl.store(m + offs, ma, mask=mask)
        tl.store(v + offs, va, mask=mask)
        if BF16:   # round to nearest even by hand: the interpreter's cast truncates
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            b = tl.where(x != x, 0x7FC0, b).to(tl.uint16)   # NaN stays NaN
            tl.store(out + offs, b.to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out + offs, x.to(out.dtype.element_ty), mask=mask)
    return adamw_copy


_k = lazy_kernel(_build)


def takes(main: torch.Tensor, model: torch.Tensor) -> bool:
    """Whether the kernel serves this (fp32 main, model) parameter pair."""
    return (main.dtype == torch.float32 and model.dtype in (torch.bfloat16, torch.float16)
            and main.numel() == model.numel() >= max(MIN_NUMEL, 1)
            and main.device == model.device and (main.is_cuda or interpret())
            and main.is_contiguous() and model.is_contiguous())


def adamw_copy_(p, g, m, v, out, step, lr, beta1, beta2, eps, weight_decay, gmul=1.0):
    """One AdamW step on p (fp32) with gradient g * gmul, moments m and v (fp32), step
    count `step` (an fp32 scalar tensor on p's device, already incremented), writing the
    rounded result into out (the model parameter). All tensors contiguous, p's size."""
    for name, t in (("g", g), ("m", m), ("v", v), ("out", out)):
        if t.numel() != p.numel() or not t.is_contiguous() or t.device != p.device:
            raise ValueError(f"adamw_copy_: {name} must be contiguous, on {p.device}, with "
                             f"{p.numel()} elements; got {tuple(t.shape)} on {t.device}")
    if step.numel() != 1 or step.dtype != torch.float32 or step.device != p.device:
        raise ValueError(f"adamw_copy_: step must be one fp32 element on {p.device}, got "
                         f"{step.dtype} {tuple(step.shape)} on {step.device}")
    if not 0.0 < beta1 < 1.0 or not 0.0 < beta2 < 1.0:
        raise ValueError(f"adamw_copy_: betas must lie in (0, 1), got {beta1}, {beta2}")
    n = p.numel()
    if n == 0:
        return
    triton, kernel = _k()
    kernel[(triton.cdiv(n, BLOCK),)](p, g, m, v, out, step, n, float(lr), float(beta1),
                                     float(beta2), math.log2(beta1), math.log2(beta2),
                                     float(eps), float(weight_decay), float(gmul),
                                     BLOCK=BLOCK, BF16=out.dtype == torch.bfloat16,
                                     num_warps=NUM_WARPS)
