"""ops/grad_add.py against torch's add, op and trainer level (tests/test_grad_add.py).

Run with TRITON_INTERPRET=1 on a CPU (the Triton interpreter), or on a GPU. Prints one
JSON line: per op case whether the kernel's sum equals torch's bitwise; the tiny MLA+PEER
model's per-step losses (bf16 parameters) with the kernel in DDP's hook and with torch's
add, and how many adds the kernel made.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.compile_check import losses  # noqa: E402
from bench.train_throughput import TINY, TINY_PEER  # noqa: E402
from megapeer.ops import grad_add  # noqa: E402


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ops = {"small_taken": grad_add.takes(torch.zeros(grad_add.MIN_NUMEL - 1, device=dev),
                                         torch.zeros(grad_add.MIN_NUMEL - 1, device=dev,
                                                     dtype=torch.bfloat16))}
    grad_add.MIN_NUMEL = 0   # every size here (the tiny model's parameters included)
    for dt in (torch.bfloat16, torch.float16):
        for n in (1, 1000, grad_add.BLOCK, 3 * grad_add.BLOCK + 5):
            acc = torch.randn(n, generator=g).to(dev)
            grad = (torch.randn(n, generator=g) * 100).to(dt).to(dev)
            want = acc.clone().add_(grad)
            got = acc.clone()
            taken = grad_add.takes(got, grad)
            grad_add.add_(got, grad)
            ops[f"{str(dt)[6:]}_{n}"] = {"taken": taken, "equal": bool(torch.equal(got, want))}
    ops["fp32_grad_taken"] = grad_add.takes(torch.zeros(4, device=dev), torch.zeros(4, device=dev))
    ops["strided_taken"] = grad_add.takes(torch.zeros(8, device=dev),
                                          torch.zeros(16, device=dev, dtype=torch.bfloat16)[::2])

    from megapeer.parallel import init_distributed
    init_distributed()
    calls = []
    real = grad_add.add_

    def spy(acc, grad):
        calls.append(acc.numel())
        return real(acc, grad)

    ov = TINY + TINY_PEER + ["training.precision=bf16", "training.deterministic=true",
                             "training.global_batch_size=4"]
    grad_add.add_ = spy
    fast = losses(ov + ["training.triton_grad_add=true"], "eager", 3)
    n_fast = len(calls)
    plain = losses(ov + ["training.triton_grad_add=false"], "eager", 3)
    print(json.dumps({"ops": ops, "fast": fast, "plain": plain, "kernel_adds": n_fast,
                      "plain_adds": len(calls) - n_fast}))


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
