"""What the Triton kernels of ops/ share (grad_add, adam, product_topk): whether Triton can
run here, and building a kernel on first use (Triton is imported only when a kernel runs)."""
import os

import torch


def interpret() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter (the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """Triton imports, and there is a GPU (or the interpreter) to run it on."""
    return importable() and (torch.cuda.is_available() or interpret())


def lazy_kernel(build):
    """A function returning (triton, build(triton, tl)), built on its first call."""
    cache = []

    def get():
        if not cache:
            import triton
            import triton.language as tl
            cache.append((triton, build(triton, tl)))
        return cache[0]
    return get
