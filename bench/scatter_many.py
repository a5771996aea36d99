"""The one-pass scatter over several micro-batches (deferred table gradients) on a GPU.

For one layer shape and n micro-batches (fresh random indices each), times with
triton.testing.do_bench (ms):
  single   n calls of the grouped scatter, one per micro-batch (what a step runs without
           model.peer.defer_table_grads), plus DDP's fp32 add of each bf16 result into a
           main_grad (ops/grad_add.py)
  many     one scatter_many over the n micro-batches, plus one add; the same with the
           source loop not unrolled, without the 16-byte alignment hint, with the pair
           ids loaded a step ahead (PREFETCH) switched, and with other tiles (--tiles)
  merged   the single scatter kernel once over the n micro-batches concatenated (their
           coefficients in token order, one layout over all pairs: one loop per expert
           instead of one per source), plus one add; without and with the layout's sort
Each `many` form is checked against the sum of the single results in fp32 (max error over
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
    ap.add_argument("--tiles", nargs="*", default=["BN=64", "MC=256", "num_stages=4",
                                                    "num_warps=4", "BN=256"],
                    help="scatter tile changes to time `many` with, KEY=VALUE each")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernels are timed there)")
    import triton.testing

    from megapeer.ops import grad_add
    from megapeer.ops import peer_grouped as pg
    T, d, E, h, k, m = SHAPES[args.shape]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    srcs, coefs, lays = [], [], []
    for _ in range(args.n):
        idx = torch.randint(0, E, (T, h, k), generator=g, device="cuda")
        lays.append((idx, pg._layout(idx, E, m)))
        srcs.append(torch.randn(T, d, generator=g, **bf))
        coefs.append(torch.randn(T * h * k, m, generator=g, **bf))
    main_grad = torch.zeros(E * m, d, device="cuda")

    def single():
        for (idx, lay), c, s in zip(lays, coefs, srcs):
            gt = torch.ops.megapeer.grouped_scatter(c, idx, s, E * m, m, *lay, coef_sorted=True)
            grad_add.add_(main_grad, gt)

    def many():
        gt = pg.scatter_many(coefs, srcs, [lay[0] for _, lay in lays],
                             [lay[3] for _, lay in lays], [lay[4] for _, lay in lays],
                             h * k, E * m, m)
        grad_add.add_(main_grad, gt)
        return gt

    def ref():
        acc = torch.zeros(E * m, d, device="cuda")
        for (idx, lay), c, s in zip(lays, coefs, srcs):
            acc += torch.ops.megapeer.grouped_scatter(c, idx, s, E * m, m, *lay,
                                                      coef_sorted=True).float()
        return acc

    # merged: the sources as one micro-batch of n T tokens (coefficients in token order)
    idx_all = torch.cat([idx for idx, _ in lays])
    coef_all = torch.cat([c[lay[5].long()] for (_, lay), c in zip(lays, coefs)])
    src_all = torch.cat(srcs)
    lay_all = pg._layout_op(idx_all, E, pg._tiles("dot", m)["BM"])

    def merged(lay=lay_all):
        gt = torch.ops.megapeer.grouped_scatter(coef_all, idx_all, src_all, E * m, m, *lay)
        grad_add.add_(main_grad, gt)
        return gt

    def merged_sort():
        return merged(pg._layout_op(idx_all, E, pg._tiles("dot", m)["BM"]))

    want = ref()
    out = header("rows")
    out.update(shape=args.shape, n=args.n)
    forms = [("single x n + n adds", single, {}), ("many + 1 add", many, {}),
             ("many, loop not unrolled", many, dict(MANY_UNROLL=False)),
             ("many, no alignment hint", many, dict(_offsets=_unaligned(pg._offsets))),
             (f"many, PREFETCH {'off' if pg.MANY_PREFETCH else 'on'}", many,
              dict(MANY_PREFETCH=not pg.MANY_PREFETCH))]
    forms += [(f"many, {t}", many, {"tiles": dict([_kv(t)])}) for t in args.tiles]
    forms += [("merged (layout ready)", merged, {}), ("merged incl. its layout", merged_sort, {})]
    forms += [(f"merged, {t}", merged, {"tiles": dict([_kv(t)])}) for t in args.tiles]
    base = None
    for name, fn, change in forms:
        change = dict(change)
        tiles = change.pop("tiles", None)
        with mock.patch.multiple(pg, **change) if change else contextlib.nullcontext(), \
                _scatter_tiles(pg, tiles):
            ms = triton.testing.do_bench(fn, warmup=5, rep=50)
            err = None
            if fn is not single:
                err = float((fn().float() - want).abs().max() / want.abs().max())
        base = base or ms
        row = {"form": name, "ms": round(ms, 3), "x single": round(base / ms, 3),
               "err": err}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _kv(t):
    k, v = t.split("=")
    return k, int(v)


@contextlib.contextmanager
def _scatter_tiles(pg, changes):
    """The scatter's launch settings (both width classes) with changes, for one form."""
    if not changes:
        yield
        return
    saved = pg.TILES_WIDE, pg.TILES
    pg.TILES_WIDE = {**pg.TILES_WIDE, "scatter": {**pg.TILES_WIDE["scatter"], **changes}}
    pg.TILES = {**pg.TILES, "scatter": {**pg.TILES["scatter"], **changes}}
    try:
        yield
    finally:
        pg.TILES_WIDE, pg.TILES = saved


def _unaligned(offsets):
    def f(*a):
        offs, _ = offsets(*a)
        return offs, False
    return f


if __name__ == "__main__":
    main()
