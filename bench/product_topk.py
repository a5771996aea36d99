"""PEER's product-key top-k: torch's topk calls against the fused Triton kernel (GPU).

For each shape (rows = tokens x heads, n sub-keys per product dim, ck sub-key top-k, k
experts) times, on bf16 scores s0, s1 [rows, n]:
  torch  retrieval's torch path (models/peer.py, `retrieve`, two product dims): topk(ck)
         of each side, the ck*ck sums in fp32, topk(k) of those, and the gather of the ids;
  fused  ops/product_topk.product_topk, then the two gathers and the fp32 add that
         recompute the selected scores, and the ids i0 * n + i1.
Median ms over CUDA-event-timed calls; `same ids` is the fraction of rows where both give
the same ids in the same order (they differ only where fp32 sums tie: torch.topk's tie
order is unspecified), `= ref` whether the kernel equals product_topk_ref exactly.

  python bench/product_topk.py [--json out.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.sdpa_mla import timed as median_ms  # noqa: E402  (CUDA-event median)
from megapeer.ops import product_topk as pt  # noqa: E402

SHAPES = [  # (rows, n, ck, k)
    (32768, 16, 8, 8),
    (65536, 64, 32, 32),
    (131072, 256, 16, 16),
    (16384, 1024, 16, 16),
]


def torch_topk(s0, s1, ck, k):
    v0, i0 = s0.topk(ck, dim=-1)
    v1, i1 = s1.topk(ck, dim=-1)
    comb_s = (v0.float().unsqueeze(-1) + v1.float().unsqueeze(-2)).flatten(-2)
    comb_i = (i0.unsqueeze(-1) * s1.shape[-1] + i1.unsqueeze(-2)).flatten(-2)
    cand_s, pos = comb_s.topk(k, dim=-1)
    return comb_i.gather(-1, pos), cand_s


def fused_topk(s0, s1, ck, k):
    i0, i1 = pt.product_topk(s0, s1, ck, k)
    return i0 * s1.shape[-1] + i1, s0.gather(-1, i0).float() + s1.gather(-1, i1).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not pt.available():
        ap.error("needs Triton")
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, bf16 scores")
    print(f"{'rows':>7s} {'n':>5s} {'ck':>3s} {'k':>3s} {'torch ms':>9s} {'fused ms':>9s} "
          f"{'speedup':>7s} {'same ids':>8s} {'= ref':>5s}")
    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, n, ck, k in SHAPES:
        s0 = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)
        s1 = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)
        assert pt.uses_kernel(s0, s1, ck, k)
        same = (torch_topk(s0, s1, ck, k)[0] == fused_topk(s0, s1, ck, k)[0]).all(-1)
        ref = pt.product_topk_ref(s0, s1, ck, k)
        got = pt.product_topk(s0, s1, ck, k)
        exact = torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        t_torch = median_ms(lambda: torch_topk(s0, s1, ck, k), args.reps)
        t_fused = median_ms(lambda: fused_topk(s0, s1, ck, k), args.reps)
        r = dict(rows=rows, n=n, ck=ck, k=k, torch_ms=t_torch, fused_ms=t_fused,
                 same_ids=same.float().mean().item(), equals_ref=exact)
        out.append(r)
        print(f"{rows:7d} {n:5d} {ck:3d} {k:3d} {t_torch:9.3f} {t_fused:9.3f} "
              f"{t_torch / t_fused:6.2f}x {r['same_ids']:8.4f} {str(exact):>5s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "dtype": "bfloat16",
                       "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
