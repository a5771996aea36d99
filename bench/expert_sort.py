"""Sorting a PEER layer's (token, head, slot) pairs by expert, on a GPU.

The grouped paths' layouts (ops/peer_grouped.py, ops/peer_gmm.py) need the stable order of
the pairs by expert id and its inverse. Times (triton.testing.do_bench, ms) of:
  int64    torch.sort of the int64 ids (stable), then torch.argsort of the order (the
           layouts before this script)
  narrow   ops/peer_ref.sort_by_expert: the sort on the narrowest integer type that holds
           the expert count, the inverse by a scatter (the layouts now)
and checks that both give the same order and inverse.

  python3 bench/expert_sort.py [--json out.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [  # (name, pairs per call, experts)
    ("1.3B mla_peer_wider, micro-batch 2 (8192 tokens x 4 heads x 8)", 8192 * 32, 16 * 16),
    ("~100M mla_peer (16384 tokens x 8 heads x 16; 256^2 experts)", 16384 * 128, 256 * 256),
    ("large single neurons (16384 tokens x 8 x 16; 1024^2 experts)", 16384 * 128, 1024 * 1024),
]


def int64_form(flat):
    keys, order = torch.sort(flat, stable=True)
    return keys, order, torch.argsort(order)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the sorts are timed there)")
    import triton.testing
    from megapeer.ops import peer_ref
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'pairs':>9} {'experts':>9} {'int64 ms':>9} {'narrow ms':>10} {'speed-up':>8}  same")
    for name, P, n in SHAPES:
        flat = torch.randint(0, n, (P,), device="cuda", generator=g)
        k0, o0, i0 = int64_form(flat)
        k1, o1, i1 = peer_ref.sort_by_expert(flat, n)
        same = bool(torch.equal(k0, k1.long()) and torch.equal(o0, o1) and torch.equal(i0, i1))
        t0 = triton.testing.do_bench(lambda: int64_form(flat), return_mode="median")
        t1 = triton.testing.do_bench(lambda: peer_ref.sort_by_expert(flat, n),
                                     return_mode="median")
        rows.append(dict(shape=name, pairs=P, experts=n, int64_ms=round(t0, 4),
                         narrow_ms=round(t1, 4), same=same))
        print(f"{P:>9} {n:>9} {t0:>9.4f} {t1:>10.4f} {t0 / t1:>7.2f}x  {same}   {name}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
