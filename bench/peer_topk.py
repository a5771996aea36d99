"""PEER retrieval's top-k: torch.topk against sort-then-slice on the shapes PEER uses.

Product-key retrieval calls top-k on many short rows (tokens x heads rows of sub-key
scores, then of the combined candidates). Prints median ms per call (CUDA events).

  python bench/peer_topk.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.sdpa_mla import timed as median_ms  # noqa: E402  (median ms, CUDA events)

SHAPES = [  # (label, rows, width, k)
    ("100M sub-keys: 16384 tok x 8 heads, 256 keys", 131072, 256, 16),
    ("100M candidates: 16x16", 131072, 256, 16),
    ("1B sub-keys: 4096 tok x 16 heads, 64 keys", 65536, 64, 32),
    ("1B candidates: 32x32", 65536, 1024, 32),
]


def main():
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'shape':48s} {'topk ms':>8s} {'sort ms':>8s} {'same':>5s}")
    for label, rows, width, k in SHAPES:
        x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
        a = x.topk(k, dim=-1)
        b = x.sort(dim=-1, descending=True)
        same = torch.equal(a.values, b.values[:, :k])
        t1 = median_ms(lambda: x.topk(k, dim=-1))
        t2 = median_ms(lambda: x.sort(dim=-1, descending=True))
        print(f"{label:48s} {t1:8.3f} {t2:8.3f} {str(same):>5s}")


if __name__ == "__main__":
    main()
