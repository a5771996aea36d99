"""Host time against GPU time of the grouped PEER forward's ops, on a GPU.

A compiled PEER layer's forward can wait on its host: the custom ops run Python and launch
their kernels one by one (docs/profile.md). For one layer shape (bench/grouped_tune.py's
SHAPES, bf16) this times each op of the expert-ordered forward, called as the compiled
graph calls it (torch.ops.megapeer.*):
  host  us per call spent by the CPU issuing it: N calls back to back while the GPU works
        through them (N small enough that the launch queue never fills), then one sync
  gpu   us per call from triton.testing.do_bench: the GPU's time, or the host's where the
        host is the slower (then the call waits on the host, as the layer's forward did)
for the layout (the sort and its blocks: Triton kernels, then torch ops, LAYOUT_KERNELS),
retrieval's product-key top-k, the dot and the axpy, and the four together.

  python3 bench/peer_host.py [--shapes wider_mb2] [--calls 20] [--json out.json]
"""
import argparse
import json
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grouped_tune import SHAPES, header, shapes_arg  # noqa: E402


def host_us(fn, calls, reps=5):
    """Median over reps of the host's us per call for `calls` calls issued back to back."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="wider_mb2")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    shapes = shapes_arg(ap, args.shapes)
    if args.calls < 1:
        ap.error(f"--calls must be at least 1, got {args.calls}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (host time is what the GPU waits for)")
    import triton.testing

    from megapeer.ops import peer_grouped as pg
    from megapeer.ops import product_topk  # noqa: F401  (registers megapeer::product_topk)
    ops = torch.ops.megapeer
    out = header("rows")
    for shape in shapes:
        T, d, E, h, k, m = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(T, d, generator=g, **bf)
        U = torch.randn(E * m, d, generator=g, **bf) * 0.02
        idx = torch.randint(0, E, (T, h, k), generator=g, device="cuda")
        n0 = int(round(E ** 0.5))   # two sub-key sets of n0 (product keys)
        s0, s1 = (torch.randn(T * h, n0, generator=g, **bf) for _ in range(2))
        bm = pg._tiles("dot", m)["BM"]
        lay = ops.grouped_layout(idx, E, bm)
        w = torch.randn(T * h * k, m, generator=g, **bf)

        def layout():
            return ops.grouped_layout(idx, E, bm)

        def forward():
            lay = ops.grouped_layout(idx, E, bm)
            ops.product_topk(s0, s1, min(n0, k), k)
            ops.grouped_dot_sorted(x, idx, U, m, *lay)
            return ops.grouped_axpy_sorted(w, idx, U, m, *lay)

        cases = [("layout (Triton kernels)", layout, True),
                 ("layout (torch ops)", layout, False),
                 ("product_topk", lambda: ops.product_topk(s0, s1, min(n0, k), k), True),
                 ("grouped_dot_sorted", lambda: ops.grouped_dot_sorted(x, idx, U, m, *lay), True),
                 ("grouped_axpy_sorted", lambda: ops.grouped_axpy_sorted(w, idx, U, m, *lay),
                  True),
                 ("all four (Triton layout)", forward, True),
                 ("all four (torch layout)", forward, False)]
        print(f"{shape}: T={T} d={d} experts={E} h={h} k={k} m={m}; us per call")
        print(f"{'op':28s} {'host':>8s} {'gpu':>8s}")
        with torch.no_grad():
            for name, fn, kernels in cases:
                with mock.patch.object(pg, "LAYOUT_KERNELS", kernels):
                    hu = host_us(fn, args.calls)
                    gu = triton.testing.do_bench(fn, warmup=5, rep=50) * 1e3
                print(f"{name:28s} {hu:8.1f} {gu:8.1f}", flush=True)
                out["rows"].append({"shape": shape, "op": name, "host_us": hu, "gpu_us": gu})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
