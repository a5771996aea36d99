#!/usr/bin/env python3
"""One expert-parallel rank's PEER step: other ranks' pairs skipped or clamped.

Under expert parallelism (models/peer.py) every rank runs the expert step over all ranks'
tokens on its 1/E of the table, with the gates of the pairs other ranks own zeroed.
ops/dispatch.py: foreign_pairs_to_rows hands those pairs to the kernels as id -1 (fused
CUDA kernels) or as the sentinel id N/E (grouped Triton kernels), which skip them; before,
their ids were clamped into range and computed with gate 0.

    python3 bench/peer_ep_pairs.py [--kernel fused] [--size small] [--ep 2] [--json out.json]
    python3 bench/peer_ep_pairs.py --kernel grouped --size wider_mb2

Rank 0 of E: E*T tokens (the all-gathered micro-batch), N/E experts, bf16; forward +
backward (x, scores, U, V), CUDA-event medians. The whole table on one GPU for T tokens
is timed in the same run for scale. Sizes: bench/peer_kernel.py's SIZES.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.peer_kernel import SIZES, timeit  # noqa: E402
from megapeer.ops import dispatch, peer_cuda, peer_grouped  # noqa: E402


def case(T, d, N, h, k, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, N, (T, h, k), device="cuda", generator=g)
    leaf = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype).requires_grad_()
    return dict(idx=idx, x=leaf(T, d), scores=leaf(T, h, k), go=torch.randn(T, d, device="cuda", generator=g).to(dtype),
                U=leaf(N * m, d, scale=d ** -0.5), V=leaf(N * m, d, scale=d ** -0.5))


def step(kernel, m, c, idx, own):
    mod = peer_cuda if kernel == "fused" else peer_grouped
    out = mod.peer_experts(c["x"], idx, c["scores"].softmax(-1) * own, c["U"], c["V"], F.gelu, m)
    out.backward(c["go"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="fused", choices=["fused", "grouped"])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    T, d, N, h, k = SIZES[a.size][:5]
    m = SIZES[a.size][5] if len(SIZES[a.size]) > 5 else 1
    if a.ep < 2 or N % a.ep:
        ap.error(f"--ep must be at least 2 and divide the {a.size} size's {N} experts, got {a.ep}")
    ok, why = (peer_cuda if a.kernel == "fused" else peer_grouped).available()
    if not ok or not torch.cuda.is_available():
        sys.exit(f"{a.kernel} PEER kernels unavailable: {why if not ok else 'no CUDA GPU'}")
    E, n_local = a.ep, N // a.ep
    dt = torch.bfloat16
    one = case(T, d, N, h, k, m, dt)
    rank = case(E * T, d, n_local, h, k, m, dt, seed=1)
    glob = torch.randint(0, N, rank["idx"].shape, device="cuda")   # ids over all ranks' experts
    own = glob < n_local                                           # rank 0 holds [0, N/E)
    skipped = dispatch.foreign_pairs_to_rows(a.kernel, glob, own, n_local, m, rank["x"], rank["U"])
    how = "id -1" if a.kernel == "fused" else "sentinel id"   # what models/peer.py passes now
    variants = {"one GPU, whole table": (one, one["idx"], torch.ones_like(one["idx"], dtype=dt)),
                f"EP{E} rank, others' pairs clamped": (rank, glob.clamp(0, n_local - 1), own.to(dt)),
                f"EP{E} rank, others' pairs {how}": (rank, skipped, own.to(dt))}

    def clear(c):
        for key in ("x", "scores", "U", "V"):
            c[key].grad = None

    res, grads = {}, {}
    for name, (c, idx, g) in variants.items():
        ms, lo, hi = timeit(lambda: step(a.kernel, m, c, idx, g), a.warmup, a.reps,
                            setup=lambda: clear(c))
        clear(c)
        out = step(a.kernel, m, c, idx, g)
        grads[name] = [out] + [c[key].grad.clone() for key in ("x", "scores", "U", "V")]
        res[name] = {"fwdbwd_ms": ms, "min_ms": lo, "max_ms": hi}
        print(f"{name:40s} fwd+bwd {ms:7.3f} ms (min {lo:.3f}, max {hi:.3f})", flush=True)
    a_, b_ = (grads[n] for n in list(variants)[1:])
    diff = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a_, b_))
    names = list(variants)
    print(f"{a.kernel}, {a.size}: clamped / {how}: {res[names[1]]['fwdbwd_ms'] / res[names[2]]['fwdbwd_ms']:.2f}x; "
          f"largest difference of out and gradients, relative to the tensor's largest entry: {diff:.1e}")
    if a.json:
        json.dump({"card": torch.cuda.get_device_name(), "kernel": a.kernel, "size": a.size,
                   "ep": E, "results": res,
                   "max_rel_diff": diff}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
