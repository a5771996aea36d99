"""model.peer.topk_kernel=triton in training (tests/test_product_topk.py).

Run with TRITON_INTERPRET=1 on a CPU (the Triton interpreter), or on a GPU. Prints one
JSON line: the tiny MLA+PEER's per-step losses with the torch top-k and with the kernel,
eager and compiled (argv[1]: eager,default), and how many kernel launches ran.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.compile_check import losses  # noqa: E402
from bench.train_throughput import TINY, TINY_PEER  # noqa: E402
from megapeer.ops import product_topk as pt  # noqa: E402


def main():
    from megapeer.parallel import init_distributed
    init_distributed()
    launches = []
    real = pt._kernel_config

    def spy(*a):   # product_topk's choice: the kernel's block sizes, or None (reference)
        cfg = real(*a)
        launches.append(cfg is not None)
        return cfg

    pt._kernel_config = spy
    out = {}
    for mode in sys.argv[1].split(","):
        for kern in ("torch", "triton"):
            n0 = len(launches)
            ls = losses(TINY + TINY_PEER + [f"model.peer.topk_kernel={kern}"], mode, 3)
            out[f"{mode}_{kern}"] = {"losses": ls, "kernel": sum(launches[n0:])}
    print(json.dumps(out))


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
