"""The grouped PEER kernels one by one against torch._grouped_mm forms, on a GPU.

For one layer shape, times (triton.testing.do_bench, ms; TFLOP/s of the 2*P*m*d GEMM):
  axpy     Triton row form + per-token sum (what ops/peer_grouped.py runs; then with
           other ROWS_BYTES, the row buffer's cap per column pass), Triton fp32
           atomics, and torch._grouped_mm on the expert-sorted coefficients (rows in
           sorted order) + a gather-sum kernel (defined here); parts timed alone
  scatter  Triton (gathered rows; then with PREFETCH off and on: the pair ids loaded a
           step ahead) against torch._grouped_mm over copies of the rows in sorted
           order (groups along the reduced dimension)
  dot      Triton (gathered token rows) against torch._grouped_mm over a sorted copy
and variants ("v:") of the Triton scatter and axpy defined here: coefficients read from a
copy in sorted order, the scatter's coefficient tile loaded transposed, the axpy's rows
stored in sorted order (then the gather-sum); for experts >= 256 wide. Each alternative
is checked against the first form (max error / max magnitude).

  python3 bench/grouped_parts.py [--shapes wider_mb2,wider] [--json out.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grouped_tune import SHAPES  # noqa: E402


def _gather_sum_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum(rows, inv, out, T, hk, d, BT: tl.constexpr, BN: tl.constexpr):
        """out[t] = sum over the token's hk pairs of rows[inv[t * hk + s]] (fp32 sum in a
        fixed order): the per-token sum of pair rows stored in sorted (expert) order."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        tv = t < T
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = n < d
        acc = tl.zeros((BT, BN), dtype=tl.float32)
        for s in range(0, hk):
            r = tl.load(inv + t.to(tl.int64) * hk + s, mask=tv, other=0).to(tl.int64)
            acc += tl.load(rows + r[:, None] * d + n[None, :], mask=tv[:, None] & nm[None, :],
                           other=0.0).to(tl.float32)
        tl.store(out + t.to(tl.int64)[:, None] * d + n[None, :], acc.to(out.dtype.element_ty),
                 mask=tv[:, None] & nm[None, :])
    return gather_sum


def _variant_kernels():
    """Scatter and axpy variants (the sorted-order experiment): SORTED_COEF reads the
    coefficients from a copy in sorted (expert) order, contiguous per block; CT loads the
    scatter's coefficient tile transposed instead of tl.trans; SORTED_ROWS stores the axpy's
    pair rows in sorted order (contiguous tiles), summed by the gather-sum kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def scatter_v(coef, src, grad, order, expert_off, counts, hk, m, d,
                  BM: tl.constexpr, MB: tl.constexpr, BN: tl.constexpr, MC: tl.constexpr,
                  SORTED_COEF: tl.constexpr, CT: tl.constexpr):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(d, BN)
        e, rest = pid // (n_tiles * (MB // MC)), pid % (n_tiles * (MB // MC))
        nt, jc = rest % n_tiles, rest // n_tiles
        e = e.to(tl.int64)
        j = jc * MC + tl.arange(0, MC)
        jv = j < m
        n = nt * BN + tl.arange(0, BN)
        nm = n < d
        cnt = tl.load(counts + e)
        off = tl.load(expert_off + e).to(tl.int64)
        acc = tl.zeros((MC, BN), dtype=tl.float32)
        for start in range(0, cnt, BM):
            local = start + tl.arange(0, BM)
            valid = local < cnt
            pair = tl.load(order + off + local, mask=valid, other=0).to(tl.int64)
            crow = off + local if SORTED_COEF else pair
            sx = tl.load(src + (pair // hk)[:, None] * d + n[None, :],
                         mask=valid[:, None] & nm[None, :], other=0.0)
            if CT:
                ct = tl.load(coef + crow[None, :] * m + j[:, None],
                             mask=valid[None, :] & jv[:, None], other=0.0)
                acc += tl.dot(ct, sx)
            else:
                c = tl.load(coef + crow[:, None] * m + j[None, :],
                            mask=valid[:, None] & jv[None, :], other=0.0)
                acc += tl.dot(tl.trans(c), sx)
        tl.store(grad + (e * m + j)[:, None] * d + n[None, :], acc.to(grad.dtype.element_ty),
                 mask=jv[:, None] & nm[None, :])

    @triton.jit
    def axpy_v(coef, tab, out, order, block_expert, block_start, expert_off, counts, hk, m, d,
               BM: tl.constexpr, MB: tl.constexpr, BN: tl.constexpr, MC: tl.constexpr,
               SORTED_COEF: tl.constexpr, SORTED_ROWS: tl.constexpr):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(d, BN)
        b, nt = pid // n_tiles, pid % n_tiles
        e = tl.load(block_expert + b)
        es = tl.maximum(e, 0)
        local = (b - tl.load(block_start + es)) * BM + tl.arange(0, BM)
        cnt = tl.where(e >= 0, tl.load(counts + es), 0)
        valid = local < cnt
        srt = tl.load(expert_off + es).to(tl.int64) + local
        pair = tl.load(order + srt, mask=valid, other=0).to(tl.int64)
        es = es.to(tl.int64)
        n = nt * BN + tl.arange(0, BN)
        nm = n < d
        crow = srt if SORTED_COEF else pair
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for j0 in range(0, MB, MC):
            j = j0 + tl.arange(0, MC)
            jv = j < m
            c = tl.load(coef + crow[:, None] * m + j[None, :], mask=valid[:, None] & jv[None, :],
                        other=0.0)
            v = tl.load(tab + (es * m + j)[:, None] * d + n[None, :],
                        mask=jv[:, None] & nm[None, :], other=0.0)
            acc += tl.dot(c, v)
        orow = srt if SORTED_ROWS else pair
        tl.store(out + orow[:, None] * d + n[None, :], acc.to(out.dtype.element_ty),
                 mask=valid[:, None] & nm[None, :])
    return scatter_v, axpy_v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="wider_mb2,wider")
    ap.add_argument("--json")
    args = ap.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernels are timed there)")
    import triton
    import triton.testing

    from megapeer.ops import peer_grouped as pg
    gather_sum_kernel = _gather_sum_kernel()
    scatter_v, axpy_v = _variant_kernels()
    dev, bf = "cuda", dict(device="cuda", dtype=torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "rows": []}
    print(out["device"], out["torch"], "triton", out["triton"], flush=True)
    for shape in args.shapes.split(","):
        T, d, E, h, k, m = SHAPES[shape]
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(T, d, generator=g, **bf)
        U = torch.randn(E * m, d, generator=g, **bf) * 0.02
        w = torch.randn(T, h, k, m, generator=g, **bf)
        idx = torch.randint(0, E, (T, h, k), generator=g, device=dev)
        hk, P = h * k, T * h * k
        lay = pg._layout(idx, E, m)
        order, bexp, bstart, eoff, counts = lay
        order64 = order.long()
        inv = torch.empty_like(order).scatter_(0, order64, torch.arange(P, device=dev, dtype=torch.int32))
        offs = (eoff + counts).to(torch.int32)
        tok_sorted = order64 // hk
        flop = 2 * P * m * d

        def gather_sum(rows):
            o = torch.empty(T, d, **bf)
            gather_sum_kernel[(triton.cdiv(T, 32), triton.cdiv(d, 256))](
                rows, inv, o, T, hk, d, BT=32, BN=256, num_warps=4)
            return o

        def axpy_gmm():
            ws = w.view(P, m).index_select(0, order64)
            return gather_sum(torch._grouped_mm(ws, U.view(E, m, d), offs=offs))

        def axpy_atomic():
            saved = pg.WIDE_ROWS
            pg.WIDE_ROWS = False
            try:
                return torch.ops.megapeer.grouped_axpy(w, idx, U, m, *lay)
            finally:
                pg.WIDE_ROWS = saved

        ws = w.view(P, m).index_select(0, order64)
        gmm_ok = E <= 1023   # torch._grouped_mm's group limit on the GPU
        rows_sorted = torch._grouped_mm(ws, U.view(E, m, d), offs=offs) if gmm_ok else None
        xs = x.index_select(0, tok_sorted)
        w_sorted = w.view(P, m).index_select(0, order64)
        nb = bexp.numel()

        def sv(sorted_coef, ct, mc=128, bn=128, bm=64, warps=8):
            grad = torch.empty(E * m, d, **bf)
            scatter_v[(E * triton.cdiv(d, bn) * (m // mc),)](
                w_sorted if sorted_coef else w, x, grad, order, eoff, counts, hk, m, d,
                BM=bm, MB=m, BN=bn, MC=mc, SORTED_COEF=sorted_coef, CT=ct, num_warps=warps,
                num_stages=3)
            return grad

        def av(sorted_coef, sorted_rows, bn=256, mc=64, warps=8):
            rows = torch.empty(P, d, **bf)
            axpy_v[(nb * triton.cdiv(d, bn),)](
                w_sorted if sorted_coef else w, U, rows, order, bexp, bstart, eoff, counts,
                hk, m, d, BM=128, MB=m, BN=bn, MC=mc, SORTED_COEF=sorted_coef,
                SORTED_ROWS=sorted_rows, num_warps=warps, num_stages=3)
            return gather_sum(rows) if sorted_rows else rows.view(T, hk, d).sum(1)

        def axpy_rows_bytes(n):
            saved = pg.ROWS_BYTES
            pg.ROWS_BYTES = n
            try:
                return torch.ops.megapeer.grouped_axpy(w, idx, U, m, *lay)
            finally:
                pg.ROWS_BYTES = saved

        def scatter_prefetch(on):
            saved = pg.TILES_WIDE, pg.TILES
            pg.TILES_WIDE, pg.TILES = ({k: {**v, "PREFETCH": on} if k == "scatter" else v
                                        for k, v in t.items()} for t in saved)
            try:
                return torch.ops.megapeer.grouped_scatter(w, idx, x, E * m, m, *lay)
            finally:
                pg.TILES_WIDE, pg.TILES = saved

        forms = {
            "axpy": [("triton rows + sum", lambda: torch.ops.megapeer.grouped_axpy(w, idx, U, m, *lay)),
                     ("rows <= 256 MiB a pass", lambda: axpy_rows_bytes(256 << 20)),
                     ("rows <= 512 MiB a pass", lambda: axpy_rows_bytes(512 << 20)),
                     ("rows <= 1 GiB a pass", lambda: axpy_rows_bytes(1 << 30)),
                     ("rows <= 2 GiB a pass", lambda: axpy_rows_bytes(2 << 30)),
                     ("triton fp32 atomics", axpy_atomic),
                     ("gmm sorted + gather-sum", axpy_gmm),
                     ("  part: permute coef", lambda: w.view(P, m).index_select(0, order64)),
                     ("  part: gmm", lambda: torch._grouped_mm(ws, U.view(E, m, d), offs=offs)),
                     ("  part: gather-sum", lambda: gather_sum(rows_sorted)),
                     ("v: as triton", lambda: av(False, False)),
                     ("v: coef sorted", lambda: av(True, False)),
                     ("v: coef+rows sorted", lambda: av(True, True)),
                     ("v: coef+rows sorted bn128", lambda: av(True, True, bn=128)),
                     ("v: coef+rows sorted mc128", lambda: av(True, True, bn=128, mc=128))],
            "scatter": [("triton", lambda: torch.ops.megapeer.grouped_scatter(w, idx, x, E * m, m, *lay)),
                        ("triton, PREFETCH off", lambda: scatter_prefetch(False)),
                        ("triton, PREFETCH on", lambda: scatter_prefetch(True)),
                        ("gmm over sorted copies", lambda: torch._grouped_mm(
                            w.view(P, m).index_select(0, order64).t(), x.index_select(0, tok_sorted),
                            offs=offs).view(E * m, d)),
                        ("  part: gmm", lambda: torch._grouped_mm(ws.t(), xs, offs=offs)),
                        ("v: as triton", lambda: sv(False, False)),
                        ("v: transposed load", lambda: sv(False, True)),
                        ("v: coef sorted", lambda: sv(True, False)),
                        ("v: coef sorted, transposed", lambda: sv(True, True)),
                        ("v: coef sorted bm128", lambda: sv(True, False, bm=128)),
                        ("v: coef sorted mc256", lambda: sv(True, False, mc=256, bn=128)),
                        ("v: coef sorted, T, mc256 bn64", lambda: sv(True, True, mc=256, bn=64))],
            "dot": [("triton", lambda: torch.ops.megapeer.grouped_dot(x, idx, U, m, *lay)),
                    ("gmm over a sorted copy", lambda: torch._grouped_mm(
                        x.index_select(0, tok_sorted), U.view(E, m, d).transpose(1, 2),
                        offs=offs).index_select(0, inv.long()).view(T, h, k, m)),
                    ("  part: gmm", lambda: torch._grouped_mm(xs, U.view(E, m, d).transpose(1, 2), offs=offs))],
        }
        if m < 256:   # the variants' tiles assume experts at least 256 wide
            forms = {k: [f for f in fs if not f[0].startswith("v:")] for k, fs in forms.items()}
        if not gmm_ok:
            print(f"{shape}: {E} experts, more than torch._grouped_mm takes: its forms skipped")
            forms = {k: [f for f in fs if "gmm" not in f[0] and "gather-sum" not in f[0]]
                     for k, fs in forms.items()}
        for kind, fs in forms.items():
            want = fs[0][1]().float()
            for name, fn in fs:
                try:
                    ms = triton.testing.do_bench(fn, warmup=10, rep=50)
                except Exception as e:   # e.g. out of shared memory for a variant's tile
                    print(f"{shape:10s} {kind:8s} {name:26s} failed: {type(e).__name__}: "
                          f"{str(e)[:100]}", flush=True)
                    continue
                row = dict(shape=shape, kernel=kind, form=name, ms=ms, tflops=flop / ms / 1e9)
                if not name.startswith("  part"):
                    got = fn().float()
                    row["rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
                out["rows"].append(row)
                print(f"{shape:10s} {kind:8s} {name:26s} {ms:7.3f} ms {row['tflops']:6.0f} TFLOP/s"
                      f"  {'rel_err %.1e' % row['rel_err'] if 'rel_err' in row else ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
