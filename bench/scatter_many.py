"""The table-gradient scatter over several micro-batches (deferred table gradients) on a GPU.

For one layer shape and n micro-batches (fresh random indices each), times with
triton.testing.do_bench (ms):
  single   n calls of the grouped scatter, one per micro-batch (what a step runs without
           model.peer.defer_table_grads), plus DDP's fp32 add of each bf16 result into a
           main_grad (ops/grad_add.py)
  merged   what a deferred pass runs at its end: peer_grouped.scatter_merged over the n
           micro-batches (coefficients in token order, one buffer; their layouts merged),
           plus one add; also with the n copies into the pass's buffers that the backward
           makes (ops/table_grads.py), and with other scatter tiles (--tiles); the copies
           alone, with peer_grouped.gather_rows and with torch's index_select; the layouts'
           merge alone, with its Triton kernels and with torch ops (the latter also inside
           `merged + 1 add`); the merged pass writing its fp32 sums into an fp32 main_grad
           itself (stored, or added: what a pass runs under Megatron's DDP since
           2026-11-29, no add)
Each merged form is checked against the sum of the single results in fp32 (max error over
max magnitude; bf16 roundings differ).

  python3 bench/scatter_many.py [--shape wider_mb2] [--n 4] [--json out.json]
"""
import argparse
import contextlib
import json
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grouped_tune import SHAPES, header  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="wider_mb2", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=4, help="micro-batches")
    ap.add_argument("--json")
    ap.add_argument("--tiles", nargs="*", default=["MC=128", "BN=64", "num_stages=4"],
                    help="scatter tile changes to time `merged` with, KEY=VALUE[,KEY=VALUE] each")
    args = ap.parse_args()
    try:
        tiles = [(t, _kv(t)) for t in args.tiles]
    except ValueError:
        ap.error(f"--tiles: each item KEY=INT[,KEY=INT], got {args.tiles}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernels are timed there)")
    import triton.testing

    from megapeer.ops import grad_add, table_grads
    from megapeer.ops import peer_grouped as pg
    T, d, E, h, k, m = SHAPES[args.shape]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    srcs, coefs, lays = [], [], []
    for _ in range(args.n):
        idx = torch.randint(0, E, (T, h, k), generator=g, device="cuda")
        lays.append((idx, pg._layout(idx, E, m)))
        srcs.append(torch.randn(T, d, generator=g, **bf))
        coefs.append(torch.randn(T * h * k, m, generator=g, **bf))   # expert order
    main_grad = torch.zeros(E * m, d, device="cuda")
    layouts = [(lay[0], lay[3], lay[4]) for _, lay in lays]

    def single():
        for (idx, lay), c, s in zip(lays, coefs, srcs):
            gt = torch.ops.megapeer.grouped_scatter(c, idx, s, E * m, m, *lay, coef_sorted=True)
            grad_add.add_(main_grad, gt)

    def copies():
        p = table_grads._Pass(args.n, coefs[0], srcs[0])
        for (_, lay), c, s in zip(lays, coefs, srcs):
            p.add(c, s, lay[0], lay[3], lay[4], lay[5])
        return p

    buf = copies()

    def merged(p=None):
        p = p or buf
        gt = pg.scatter_merged(p.coef, p.src, layouts, h * k, E * m, m)
        grad_add.add_(main_grad, gt)
        return gt

    def with_copies():
        return merged(copies())

    def merged_store():   # what a deferred pass runs at its end under Megatron's DDP
        return pg.scatter_merged(buf.coef, buf.src, layouts, h * k, E * m, m, out=main_grad)

    def merged_acc():     # the same after an earlier pass of the step
        return pg.scatter_merged(buf.coef, buf.src, layouts, h * k, E * m, m, out=main_grad,
                                 accumulate=True)

    def merge():
        return pg.merge_layouts(layouts)

    def index_select_rows(rows, inv, out):   # the copies' gather as torch's index_select
        return torch.index_select(rows, 0, inv.long(), out=out)

    def ref():
        acc = torch.zeros(E * m, d, device="cuda")
        for (idx, lay), c, s in zip(lays, coefs, srcs):
            acc += torch.ops.megapeer.grouped_scatter(c, idx, s, E * m, m, *lay,
                                                      coef_sorted=True).float()
        return acc

    want = ref()
    out = header("rows")
    out.update(shape=args.shape, n=args.n)
    forms = [("single x n + n adds", single, {}), ("merged + 1 add", merged, {}),
             ("merged + 1 add, the n copies incl.", with_copies, {}),
             ("merged, stored into the fp32 main_grad", merged_store, {}),
             ("merged, added to the fp32 main_grad", merged_acc, {}),
             ("the n copies alone", copies, {}),
             ("the n copies alone, index_select", copies, {"gather_rows": index_select_rows}),
             ("merged + 1 add, layouts merged by torch ops (before)", merged,
              {"merge_layouts": pg.merge_layouts_torch}),
             ("merge_layouts alone", merge, {}),
             ("merge_layouts alone, torch ops (before)", merge,
              {"merge_layouts": pg.merge_layouts_torch})]
    forms += [(f"merged, {t}", merged, {"MERGED_TILES": {**pg.MERGED_TILES, **kv}})
              for t, kv in tiles]
    base = None
    for name, fn, change in forms:
        try:
            with mock.patch.multiple(pg, **change) if change else contextlib.nullcontext():
                ms = triton.testing.do_bench(fn, warmup=5, rep=50)
                err = None
                if fn not in (single, copies, merge):
                    main_grad.zero_()
                    err = float((fn().float() - want).abs().max() / want.abs().max())
        except (triton.runtime.errors.OutOfResources,
                triton.runtime.errors.PTXASError) as e:   # a tile variant too large
            print(json.dumps({"form": name, "error": str(e)}), flush=True)
            continue
        base = base or ms
        row = {"form": name, "ms": round(ms, 3), "x single": round(base / ms, 3), "err": err}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _kv(t):
    """"BM=32,num_stages=4" -> {"BM": 32, "num_stages": 4}"""
    return {k: int(v) for k, v in (kv.split("=") for kv in t.split(","))}


if __name__ == "__main__":
    main()
