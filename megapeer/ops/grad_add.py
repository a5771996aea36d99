"""main_grad += grad for Megatron's DDP hook, as one vectorised Triton kernel on GPUs.

After each micro-batch's backward Megatron's DDP adds every parameter's bf16 gradient to
its fp32 `main_grad` with `main_grad.add_(grad)`. Torch runs that mixed-dtype add through
its casting elementwise loop; this kernel loads both operands in 16-byte vectors and adds
in fp32, the same single rounding per element, so the result is bitwise torch's.
(training.triton_grad_add; megapeer/training/step.py installs it; H200 figures in
docs/benchmarks.md, "DDP's gradient add": 1.46x on a PEER table.)

Used for fp32 accumulators with bf16 / fp16 gradients, both contiguous, of one size and of
at least MIN_NUMEL elements, on CUDA (or the CPU under TRITON_INTERPRET=1, which the tests
use); torch's add_ otherwise (fp32 gradients already take torch's vectorised path).
Tests: tests/test_grad_add.py.
"""
import torch

from .triton_util import available, interpret, lazy_kernel  # noqa: F401  (available)

BLOCK = 8192      # elements per program
NUM_WARPS = 8
# Smaller tensors keep torch's add: the kernel saves ~13 us of GPU time at 11.5M elements
# (H200) but a Triton launch costs more host time than torch's, and DDP's hooks run on the
# host between backward kernels (a 1.3B dense MLA step, where the GPU waits for the host
# part of the time, got no faster with every parameter on the kernel).
MIN_NUMEL = 1 << 22

def _build(triton, tl):
    @triton.jit
    def main_grad_add(acc, g, n, BLOCK: tl.constexpr):   # its name in profiles
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(acc + offs, mask=mask)
        b = tl.load(g + offs, mask=mask)
        tl.store(acc + offs, a + b.to(tl.float32), mask=mask)
    return main_grad_add


_k = lazy_kernel(_build)


def takes(acc: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the kernel serves this pair (else torch's add_)."""
    return (acc.dtype == torch.float32 and grad.dtype in (torch.bfloat16, torch.float16)
            and acc.numel() == grad.numel() >= MIN_NUMEL and acc.device == grad.device
            and (acc.is_cuda or interpret())
            and acc.is_contiguous() and grad.is_contiguous())


def add_(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """acc += grad, in place; returns acc."""
    if not takes(acc, grad) or acc.numel() == 0:
        return acc.add_(grad)
    triton, kernel = _k()
    n = acc.numel()
    kernel[(triton.cdiv(n, BLOCK),)](acc, grad, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return acc
