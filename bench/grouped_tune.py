"""Launch settings of the grouped Triton PEER kernels (ops/peer_grouped.py), timed on a GPU.

For each shape, block size BM (pairs per block) and kernel, every tile / warps / stages
combination is timed (triton.testing.do_bench, ms) and checked against the default
settings' result, in the LOCAL grid order and (--local 0,1) the order before it. The axpy
is timed two ways: fp32 atomics into [T, d] (what the ops do),
and one stored row per pair into [P, d] bf16 plus a per-token sum (deterministic; the time
includes the sum). Shapes: the ~1.3B PEER layer of bench/train_throughput.py (m=16) and its
wide (m=64) and wider (m=256) variants (wider_mb2: micro-batch 2); --mc sweeps the column
chunk of wide experts. --check runs each combination once, untimed, and raises on an error
other than a setting that cannot compile (on a CPU in Triton's interpreter, fp32, at the
`tiny` shape: tests/test_bench_grouped.py).

  python3 bench/grouped_tune.py [--shapes reuse,wide] [--json out.json] [--check]
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# T, d, experts, h, k, m
SHAPES = {"reuse": (4096, 2048, 64 ** 2, 16, 32, 16),
          "wide": (4096, 2048, 32 ** 2, 8, 16, 64),
          "wider": (4096, 2048, 16 ** 2, 4, 8, 256),
          "wider_mb2": (8192, 2048, 16 ** 2, 4, 8, 256),   # micro-batch 2 of 4096
          "tiny": (48, 64, 4, 2, 2, 128)}   # --check on a CPU (Triton's interpreter)
KERNELS = ("dot", "axpy", "axpy_store", "scatter")


def shapes_arg(ap, text):
    """The shape names of a --shapes value, each one of SHAPES (else ap.error)."""
    names = text.split(",")
    unknown = set(names) - set(SHAPES)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    return names


def header(key):
    """The run's card, torch and Triton (printed, and in the JSON), with an empty list under
    key for its rows (shared with bench/grouped_parts.py)."""
    import triton
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "triton": triton.__version__, key: []}
    print(out["device"], out["torch"], "triton", out["triton"], flush=True)
    return out


def check_mode(ap, check):
    """(device, dtype) of a run. check: each kernel or form runs once, untimed, and a failure
    raises (on a CPU in Triton's interpreter, fp32: tests/test_bench_grouped.py runs it so);
    otherwise timing needs a CUDA GPU."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    if not check:
        ap.error("needs a CUDA GPU (the kernels are timed there; --check runs them on a CPU)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--check on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return "cpu", torch.float32


def compile_errors():
    """The exceptions of a kernel setting that cannot run (too much shared memory, too many
    registers, settings Triton rejects): a sweep records them and goes on; others raise."""
    import triton
    from triton.compiler.errors import CompilationError
    errs = triton.runtime.errors
    return tuple(c for c in (getattr(errs, "OutOfResources", None),
                             getattr(errs, "PTXASError", None), CompilationError) if c)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="reuse,wide")
    ap.add_argument("--bm", default="64,128")
    ap.add_argument("--tiles", default="64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--mc", default="64", help="expert columns per chunk (wide experts)")
    ap.add_argument("--local", default="1", help="grid orders of axpy and scatter: 1 LOCAL "
                    "(a block's / expert's programs in a row), 0 the order before it")
    ap.add_argument("--prefetch", default=None, help="the scatter's pair ids loaded one step "
                    "ahead: 0, 1 or 0,1 (default: as ops/peer_grouped.py sets it for the width)")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true",
                    help="run each combination once, untimed (on a CPU: TRITON_INTERPRET=1)")
    args = ap.parse_args()
    for flag, given, known in (("--kernels", args.kernels, KERNELS), ("--shapes", args.shapes, SHAPES)):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            ap.error(f"{flag}: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    dev, dtype = check_mode(ap, args.check)
    import triton
    import triton.testing

    from megapeer.ops import peer_grouped as pg
    from megapeer.ops import peer_grouped_kernels as pk

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    errors = compile_errors()
    out = header("results")
    for shape in args.shapes.split(","):
        T, d, n_exp, h, k, m = SHAPES[shape]
        g = torch.Generator(device=dev).manual_seed(0)
        bf = dict(device=dev, dtype=dtype)
        x = torch.randn(T, d, generator=g, **bf)
        U = torch.randn(n_exp * m, d, generator=g, **bf) * 0.02
        w = torch.randn(T, h, k, m, generator=g, **bf)
        go = torch.randn(T, d, generator=g, **bf)
        idx = torch.randint(0, n_exp, (T, h, k), generator=g, device=dev)
        hk, MB = h * k, pg._mb(m)
        for bm, mc in itertools.product(ints(args.bm), ints(args.mc)):
            mc = min(mc, MB)
            lay = torch.ops.megapeer.grouped_layout(idx, n_exp, bm)
            order, bexp, bstart, eoff, counts, inv = lay
            nb = bexp.numel()

            def launch(kind, tile, warps, stages, local=True, prefetch=False):
                kw = dict(num_warps=warps, num_stages=stages, BM=bm, MB=MB, MC=mc, IEEE=False)
                if kind == "dot":
                    s = torch.empty(T, h, k, m, **bf)
                    pk.peer_grouped_dot[(nb, MB // mc)](x, d, U, d, s, order, bexp, bstart,
                                                        eoff, counts, inv, hk, m, d, n_exp,
                                                        BK=tile, **kw)
                    return s
                if kind.startswith("axpy"):
                    store = kind == "axpy_store"
                    o = (torch.empty(T * hk, d, **bf) if store
                         else torch.zeros(T, d, device=dev, dtype=torch.float32))
                    pk.peer_grouped_axpy[(nb * triton.cdiv(d, tile),)](
                        w, U, d, o, order, bexp, bstart, eoff, counts, hk, m, d, nb, n_exp,
                        BN=tile, STORE=store, LOCAL=local, **kw)
                    return o.view(T, hk, d).sum(1) if store else o.to(dtype)
                grad = torch.empty(n_exp * m, d, **bf)
                pk.peer_grouped_scatter[(n_exp * triton.cdiv(d, tile) * (MB // mc),)](
                    w, go, d, grad, order, eoff, counts, hk, m, d, n_exp, BN=tile,
                    LOCAL=local, PREFETCH=prefetch, I32=pg._offsets_fit(go, w), **kw)
                return grad

            for kind in args.kernels.split(","):
                want = launch("axpy" if kind == "axpy_store" else kind, 64, 4, 3).float()
                scale = want.abs().max().item()
                locals_ = [True] if kind == "dot" else [bool(v) for v in ints(args.local)]
                prefetches = ([pg._tiles("scatter", m)["PREFETCH"]] if args.prefetch is None
                              else [bool(v) for v in ints(args.prefetch)])
                prefetches = prefetches if kind == "scatter" else [False]
                for tile, warps, stages, local, pf in itertools.product(
                        ints(args.tiles), ints(args.warps), ints(args.stages), locals_, prefetches):
                    row = dict(shape=shape, BM=bm, MB=MB, MC=mc, kernel=kind, tile=tile,
                               warps=warps, stages=stages, local=local, prefetch=pf)
                    try:
                        got = launch(kind, tile, warps, stages, local, pf)
                        err = (got.float() - want).abs().max().item()
                        row["ms"] = None if args.check else triton.testing.do_bench(
                            lambda: launch(kind, tile, warps, stages, local, pf), warmup=10, rep=50)
                        row["rel_err"] = err / scale
                    except errors as e:  # e.g. out of shared memory for this tile
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    out["results"].append(row)
                    print(json.dumps(row), flush=True)
    if args.check:
        print(f"checked {len(out['results'])} combinations (untimed)")
    else:
        best_rows(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def best_rows(out):
    """Print the fastest settings per shape and kernel and add them to out["best"]."""
    print("\nbest per shape and kernel (ms; default: BM 64, MC 64, tile 64, 4 warps, 3 stages; "
          "rel_err against tile 64, 4 warps, 3 stages at the same BM and MC)")
    best = {}
    for r in out["results"]:
        key = (r["shape"], r["kernel"])
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    default = {(r["shape"], r["kernel"]): r for r in out["results"]
               if (r["BM"], r["tile"], r["warps"], r["stages"]) == (64, 64, 4, 3)
               and r["MC"] == min(64, r["MB"]) and "ms" in r}
    for key, r in sorted(best.items()):
        base = default.get(key, {}).get("ms")
        print(f"  {key[0]:6s} {key[1]:10s} default {base if base is None else round(base, 3)} "
              f"best {r['ms']:.3f} (BM {r['BM']}, MC {r['MC']}, tile {r['tile']}, "
              f"warps {r['warps']}, stages {r['stages']}, local {r['local']}, "
              f"prefetch {r['prefetch']}, rel_err {r['rel_err']:.1e})")
    out["best"] = [dict(r) for r in best.values()]


if __name__ == "__main__":
    main()
