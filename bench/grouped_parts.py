"""The grouped PEER kernels one by one against torch._grouped_mm forms, on a GPU.

For one layer shape, times (triton.testing.do_bench, ms; TFLOP/s of the 2*P*m*d GEMM):
  axpy     Triton row form + per-token sum (the token-ordered form; then with other
           ROWS_BYTES, the row buffer's cap per column pass), the expert-ordered form
           that ops/peer_grouped.py runs for wide bf16 experts (torch._grouped_mm on
           coefficients already in expert order + its gather-sum kernel), Triton fp32
           atomics, and the same gmm with the coefficient copy counted; parts alone
  scatter  Triton (gathered rows; then with PREFETCH off and on: the pair ids loaded a
           step ahead) against torch._grouped_mm over copies of the rows in sorted
           order (groups along the reduced dimension)
  dot      Triton (gathered token rows) against torch._grouped_mm over a sorted copy
Each alternative is checked against the first form (max error / max magnitude). (Variants
of the Triton scatter and axpy with sorted or transposed operand loads, docs/benchmarks.md
call 37, were timed by this script at commit 2e4fa2e and then removed: no gain.)

--check runs each form once, untimed, and raises on a failure (on a CPU in Triton's
interpreter, fp32, at the `tiny` shape: tests/test_bench_grouped.py).

  python3 bench/grouped_parts.py [--shapes wider_mb2,wider] [--json out.json] [--check]
"""
import argparse
import contextlib
import json
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grouped_tune import SHAPES, check_mode, header, shapes_arg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="wider_mb2,wider")
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true",
                    help="run each form once, untimed, raising on a failure (on a CPU: "
                         "TRITON_INTERPRET=1)")
    args = ap.parse_args()
    shapes = shapes_arg(ap, args.shapes)
    dev, dtype = check_mode(ap, args.check)
    import triton
    import triton.testing

    from megapeer.ops import peer_grouped as pg
    from megapeer.ops.peer_grouped_kernels import peer_gather_sum
    bf = dict(device=dev, dtype=dtype)
    out = header("rows")
    for shape in shapes:
        T, d, E, h, k, m = SHAPES[shape]
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(T, d, generator=g, **bf)
        U = torch.randn(E * m, d, generator=g, **bf) * 0.02
        w = torch.randn(T, h, k, m, generator=g, **bf)
        idx = torch.randint(0, E, (T, h, k), generator=g, device=dev)
        hk, P = h * k, T * h * k
        lay = pg._layout(idx, E, m)
        order, bexp, bstart, eoff, counts, inv = lay
        order64 = order.long()
        offs = (eoff + counts)[:E].to(torch.int32)   # the sentinel's group left out
        tok_sorted = order64 // hk
        flop = 2 * P * m * d

        def gather_sum(rows, **tiles):
            o = torch.empty(T, d, **bf)
            gs = {**pg.GATHER_SUM, **tiles}
            peer_gather_sum[(triton.cdiv(T, gs["BT"]), triton.cdiv(d, gs["BN"]))](
                rows, inv, o, d, T, hk, d, inv, **gs)   # limit: unused without LIMIT
            return o

        def axpy_gmm():   # the coefficient copy counted
            return gather_sum(torch._grouped_mm(w.view(P, m).index_select(0, order64),
                                                U.view(E, m, d), offs=offs))

        def axpy(**settings):   # the op with peer_grouped settings changed
            with mock.patch.multiple(pg, **settings) if settings else contextlib.nullcontext():
                return torch.ops.megapeer.grouped_axpy(w, idx, U, m, *lay)

        def dot_sorted_pos():   # the sorted store's row ids from its own arithmetic
            with pg.tiles_changed(INV_STORE=False):
                return torch.ops.megapeer.grouped_dot_sorted(x, idx, U, m, *lay)

        def scatter_prefetch(on):
            with pg.tiles_changed(PREFETCH=on):
                return torch.ops.megapeer.grouped_scatter(w, idx, x, E * m, m, *lay)

        ws = w.view(P, m).index_select(0, order64)
        gmm_ok = E <= 1023   # torch._grouped_mm's group limit on the GPU
        rows_sorted = torch._grouped_mm(ws, U.view(E, m, d), offs=offs) if gmm_ok else None
        xs = x.index_select(0, tok_sorted)
        forms = {
            "axpy": [("triton rows + sum", axpy),
                     ("expert order (what runs)", lambda: torch.ops.megapeer.grouped_axpy_sorted(
                         ws, idx, U, m, *lay)),
                     ("rows <= 256 MiB a pass", lambda: axpy(ROWS_BYTES=256 << 20)),
                     ("rows <= 512 MiB a pass", lambda: axpy(ROWS_BYTES=512 << 20)),
                     ("rows <= 1 GiB a pass", lambda: axpy(ROWS_BYTES=1 << 30)),
                     ("rows <= 2 GiB a pass", lambda: axpy(ROWS_BYTES=2 << 30)),
                     ("triton fp32 atomics", lambda: axpy(WIDE_ROWS=False)),
                     ("gmm sorted + gather-sum", axpy_gmm),
                     ("  part: permute coef", lambda: w.view(P, m).index_select(0, order64)),
                     ("  part: gmm", lambda: torch._grouped_mm(ws, U.view(E, m, d), offs=offs)),
                     ("  part: gather-sum", lambda: gather_sum(rows_sorted))]
                    + [(f"  part: gather-sum {bt}x{bn} w{nw}",
                        lambda bt=bt, bn=bn, nw=nw: gather_sum(rows_sorted, BT=bt, BN=bn,
                                                               num_warps=nw))
                       for bt, bn, nw in ((16, 256, 4), (64, 256, 8), (32, 512, 8),
                                          (16, 512, 4), (8, 1024, 4))],
            "scatter": [("triton", lambda: torch.ops.megapeer.grouped_scatter(w, idx, x, E * m, m, *lay)),
                        ("triton, PREFETCH off", lambda: scatter_prefetch(False)),
                        ("triton, PREFETCH on", lambda: scatter_prefetch(True)),
                        ("triton, coef in expert order", lambda: torch.ops.megapeer.grouped_scatter(
                            ws, idx, x, E * m, m, *lay, coef_sorted=True)),
                        ("gmm over sorted copies", lambda: torch._grouped_mm(
                            w.view(P, m).index_select(0, order64).t(), x.index_select(0, tok_sorted),
                            offs=offs).view(E * m, d)),
                        ("  part: gmm", lambda: torch._grouped_mm(ws.t(), xs, offs=offs))],
            "dot": [("triton", lambda: torch.ops.megapeer.grouped_dot(x, idx, U, m, *lay)),
                    ("triton, s in expert order", lambda: torch.ops.megapeer.grouped_dot_sorted(
                        x, idx, U, m, *lay).index_select(0, inv.long()).view(T, h, k, m)),
                    ("  part: s in expert order", lambda: torch.ops.megapeer.grouped_dot_sorted(
                        x, idx, U, m, *lay)),
                    ("  part: s in expert order, rows from pos", lambda: dot_sorted_pos()),
                    ("gmm over a sorted copy", lambda: torch._grouped_mm(
                        x.index_select(0, tok_sorted), U.view(E, m, d).transpose(1, 2),
                        offs=offs).index_select(0, inv.long()).view(T, h, k, m)),
                    ("  part: gmm", lambda: torch._grouped_mm(xs, U.view(E, m, d).transpose(1, 2), offs=offs))],
        }
        if not gmm_ok:
            print(f"{shape}: {E} experts, more than torch._grouped_mm takes: its forms skipped")
            forms = {k: [f for f in fs if "gmm" not in f[0] and "gather-sum" not in f[0]]
                     for k, fs in forms.items()}
        for kind, fs in forms.items():
            want = fs[0][1]().float()
            for name, fn in fs:
                if args.check:   # untimed; a failure raises
                    fn()
                    ms = None
                else:
                    try:
                        ms = triton.testing.do_bench(fn, warmup=10, rep=50)
                    except Exception as e:   # a form this torch or card cannot run
                        print(f"{shape:10s} {kind:8s} {name:26s} failed: {type(e).__name__}: "
                              f"{str(e)[:100]}", flush=True)
                        continue
                row = dict(shape=shape, kernel=kind, form=name, ms=ms,
                           tflops=ms and flop / ms / 1e9)
                if not name.startswith("  part"):
                    got = fn().float()
                    row["rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
                out["rows"].append(row)
                timed = f"{ms:7.3f} ms {row['tflops']:6.0f} TFLOP/s" if ms else "checked"
                print(f"{shape:10s} {kind:8s} {name:26s} {timed}"
                      f"  {'rel_err %.1e' % row['rel_err'] if 'rel_err' in row else ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
