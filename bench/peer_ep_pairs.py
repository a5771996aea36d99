#!/usr/bin/env python3
"""One expert-parallel rank's PEER step: other ranks' pairs skipped (id -1) or clamped.

Under expert parallelism (models/peer.py) every rank runs the expert step over all ranks'
tokens on its 1/E of the table, with the gates of the pairs other ranks own zeroed. The
fused CUDA kernels now get those pairs as id -1 and skip them
(ops/dispatch.py: foreign_pairs_to_rows); before, their ids were clamped into range.

    python3 bench/peer_ep_pairs.py [--size small] [--ep 2] [--json out.json]

Rank 0 of E: E*T tokens (the all-gathered micro-batch), N/E table rows, bf16, fused
kernels; forward + backward (x, scores, U, V), CUDA-event medians. The whole table on one
GPU for T tokens is timed in the same run for scale.
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
from megapeer.ops import dispatch, peer_cuda  # noqa: E402


def case(T, d, N, h, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, N, (T, h, k), device="cuda", generator=g)
    leaf = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype).requires_grad_()
    return dict(idx=idx, x=leaf(T, d), scores=leaf(T, h, k), go=torch.randn(T, d, device="cuda", generator=g).to(dtype),
                U=leaf(N, d, scale=d ** -0.5), V=leaf(N, d, scale=d ** -0.5))


def step(c, idx, own):
    out = peer_cuda.peer_experts(c["x"], idx, c["scores"].softmax(-1) * own, c["U"], c["V"], F.gelu)
    out.backward(c["go"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=["small", "large", "tiny"])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    T, d, N, h, k = SIZES[a.size][:5]
    if a.ep < 2 or N % a.ep:
        ap.error(f"--ep must be at least 2 and divide the {a.size} size's {N} experts, got {a.ep}")
    ok, why = peer_cuda.available()
    if not ok:
        sys.exit(f"fused PEER kernels unavailable: {why}")
    E, n_local = a.ep, N // a.ep
    dt = torch.bfloat16
    one = case(T, d, N, h, k, dt)
    rank = case(E * T, d, n_local, h, k, dt, seed=1)
    glob = torch.randint(0, N, rank["idx"].shape, device="cuda")   # ids over all ranks' experts
    own = glob < n_local                                           # rank 0 holds [0, N/E)
    variants = {"one GPU, whole table": (one, one["idx"], torch.ones_like(one["idx"], dtype=dt)),
                f"EP{E} rank, others' pairs clamped": (rank, glob.clamp(0, n_local - 1), own.to(dt)),
                f"EP{E} rank, others' pairs id -1":   # what models/peer.py passes now
                    (rank, dispatch.foreign_pairs_to_rows("fused", glob, own, n_local, 1, rank["x"], rank["U"]),
                     own.to(dt))}

    def clear(c):
        for key in ("x", "scores", "U", "V"):
            c[key].grad = None

    res, grads = {}, {}
    for name, (c, idx, g) in variants.items():
        ms, lo, hi = timeit(lambda: step(c, idx, g), a.warmup, a.reps, setup=lambda: clear(c))
        clear(c)
        out = step(c, idx, g)
        grads[name] = [out] + [c[key].grad.clone() for key in ("x", "scores", "U", "V")]
        res[name] = {"fwdbwd_ms": ms, "min_ms": lo, "max_ms": hi}
        print(f"{name:36s} fwd+bwd {ms:7.3f} ms (min {lo:.3f}, max {hi:.3f})", flush=True)
    a_, b_ = (grads[n] for n in list(variants)[1:])
    diff = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a_, b_))
    names = list(variants)
    print(f"clamped / id -1: {res[names[1]]['fwdbwd_ms'] / res[names[2]]['fwdbwd_ms']:.2f}x; "
          f"largest difference of out and gradients, relative to the tensor's largest entry: {diff:.1e}")
    if a.json:
        json.dump({"card": torch.cuda.get_device_name(), "size": a.size, "ep": E, "results": res,
                   "max_rel_diff": diff}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
