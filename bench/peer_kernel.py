#!/usr/bin/env python3
"""Benchmark PEER's expert step: plain PyTorch reference vs the fused CUDA kernels.

    python3 bench/peer_kernel.py [--sizes small,large] [--json out.json]

For each size: forward and forward+backward of
    out = sum_{h,k} softmax(scores)[t,h,k] * gelu(U[idx] . x[t]) * V[idx]
in bf16 (leaves x, scores, U, V; every gradient computed), timed with CUDA events
(median of --reps after --warmup), tokens/s, achieved GB/s next to a
device-to-device copy measured in the same run, and peak memory. Then the fused
algorithm variants and a per-op breakdown.

Memory floor ("each table row read once per pass"): forward reads every used row
of U and of V once plus x, writes out; backward reads the used rows of U and V
once more, writes the dense grad_U and grad_V once, and reads/writes the [T, d]
activations and gradients. floor time = floor bytes / copy bandwidth (bytes read +
written per second by a large device-to-device copy).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megapeer.ops import peer_cuda, peer_gmm, peer_grouped, peer_ref  # noqa: E402

SIZES = {
    # name: (tokens T, hidden d, experts N, heads h, top-k k[, expert width m])
    "small": (8192, 1024, 512 ** 2, 8, 16),
    "large": (16384, 1024, 1024 ** 2, 8, 16),
    "tiny": (256, 128, 64 ** 2, 4, 8),   # smoke test
    # the 1B PEER layer at equal active FLOPs: ~512 tokens per expert (docs/kernels.md)
    "reuse": (4096, 2048, 64 ** 2, 16, 32, 16),
    # the same layer with more experts: ~128 and ~32 tokens per expert (where grouped and
    # fused cross over)
    "reuse128": (4096, 2048, 128 ** 2, 16, 32, 16),
    "reuse32": (4096, 2048, 256 ** 2, 16, 32, 16),
    # narrower experts with many pairs each (where auto's width threshold should sit): the
    # reuse layer with single neurons (~512 pairs per expert), and the ~100M PEER layers of
    # bench/train_throughput.py (mla_peer: m=1, mla_peer_wide: m=4; ~32 pairs per expert)
    "m1_512": (4096, 2048, 64 ** 2, 16, 32, 1),
    "m1_32": (16384, 768, 256 ** 2, 8, 16, 1),
    "m4_32": (16384, 768, 128 ** 2, 4, 8, 4),
    # the 1B PEER layers of bench/train_throughput.py's mla_peer_wide and mla_peer_wider
    # (same table rows and active FLOPs as "reuse": 32^2 experts of width 64, h=8, k=16;
    # 16^2 of width 256, h=4, k=8)
    "wide": (4096, 2048, 32 ** 2, 8, 16, 64),
    "wider": (4096, 2048, 16 ** 2, 4, 8, 256),
    "wider_mb2": (8192, 2048, 16 ** 2, 4, 8, 256),   # micro-batch 2 of 4096 tokens
    # the same active neurons per token with fewer experts (<= 1023: torch._grouped_mm's
    # limit), for the gmm / grouped crossover by width
    "m128": (4096, 2048, 512, 8, 8, 128),
    "m64_512": (4096, 2048, 512, 8, 16, 64),
    "m32_512": (4096, 2048, 512, 16, 16, 32),
}
REF_MAX_BYTES = 40 * 1024 ** 3  # the reference gathers [T, h, k, m, d]: skipped above this
GiB = 1024 ** 3


def timeit(fn, warmup, reps, setup=None):
    """Median milliseconds of fn() (CUDA events on GPU, wall clock on CPU)."""
    cuda = torch.cuda.is_available()
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times), min(times), max(times)


def copy_bandwidth(nbytes=2 * GiB, reps=10):
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms, _, _ = timeit(lambda: dst.copy_(src), 3, reps)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


class Problem:
    def __init__(self, size, dtype, device, seed=0):
        T, d, N, h, k, m = (SIZES[size] + (1,))[:6]
        self.size, self.T, self.d, self.N, self.h, self.k, self.m = size, T, d, N, h, k, m
        g = torch.Generator(device=device).manual_seed(seed)
        self.idx = torch.randint(0, N, (T, h, k), device=device, generator=g)
        self.x = torch.randn(T, d, device=device, generator=g).to(dtype).requires_grad_()
        self.scores = torch.randn(T, h, k, device=device, generator=g).to(dtype).requires_grad_()
        self.U = (torch.randn(N * m, d, device=device, generator=g) * d ** -0.5).to(dtype).requires_grad_()
        self.V = (torch.randn(N * m, d, device=device, generator=g) * d ** -0.5).to(dtype).requires_grad_()
        self.go = torch.randn(T, d, device=device, generator=g).to(dtype)
        self.leaves = [self.x, self.scores, self.U, self.V]
        self.esize = self.x.element_size()
        self.used = int(torch.unique(self.idx).numel())

    def clear(self):
        for t in self.leaves:
            t.grad = None

    def forward(self, mod):
        return mod.peer_experts(self.x, self.idx, self.scores.softmax(-1), self.U, self.V, F.gelu, self.m)

    def step(self, mod):
        self.forward(mod).backward(self.go)

    # floors, in bytes
    def floor_fwd(self):
        e, T, d = self.esize, self.T, self.d
        tables = 2 * self.used * self.m * d * e         # used rows of U and V, once each
        acts = 2 * T * d * e                            # x read, out written
        small = 2 * self.idx.numel() * 8 + 4 * self.idx.numel() * e
        return tables + acts + small

    def floor_bwd(self):
        e, T, d, N = self.esize, self.T, self.d, self.N
        tables = 2 * (self.used + N) * self.m * d * e   # used rows of U, V read; grad_U, grad_V written
        acts = 3 * T * d * e                            # grad_out, x read; grad_x written
        small = 2 * self.idx.numel() * 8 + 6 * self.idx.numel() * e
        return tables + acts + small

    def table_bytes(self):
        return 2 * self.N * self.m * self.d * self.esize

    def ref_bytes(self):
        return self.idx.numel() * self.m * self.d * self.esize


def peak_memory(p, fn):
    """(peak, base) bytes allocated while fn() runs once from cleared gradients; zeros on CPU."""
    peak = base = 0
    if torch.cuda.is_available():
        p.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    p.clear()
    return peak, base


def measure_step(p, mod, warmup, reps):
    fwd = timeit(lambda: p.forward(mod), warmup, reps, setup=p.clear)
    both = timeit(lambda: p.step(mod), warmup, reps, setup=p.clear)
    peak, base = peak_memory(p, lambda: p.step(mod))
    return {"fwd_ms": fwd[0], "fwd_min_ms": fwd[1], "fwdbwd_ms": both[0], "fwdbwd_min_ms": both[1],
            "peak_gib": peak / GiB, "base_gib": base / GiB,
            # beyond inputs and the dense table gradients every method must produce
            "transient_gib": (peak - base - p.table_bytes()) / GiB if peak else 0.0}


def measure_prev(p, warmup, reps):
    """The grouped path with LOCAL off (the launch order before it: each d-tile's wave of
    programs re-reads the gathered rows), for a same-run comparison."""
    with peer_grouped.tiles_changed(LOCAL=False):
        return measure_step(p, peer_grouped, warmup, reps)


def measure_token_order(p, warmup, reps):
    """The grouped path with wide experts in the token-ordered form (before the
    expert-ordered one: the Triton row-form axpy), for a same-run comparison."""
    with mock.patch.object(peer_grouped, "SORTED_FORM", False):
        return measure_step(p, peer_grouped, warmup, reps)


def measure_accum(p, mod, warmup, reps):
    """A training micro-batch's PEER work: fwd+bwd, then the table gradients into fp32
    main grads. Unfused: bf16 table gradients, then Megatron's add into main_grad. Fused:
    the backward kernels add into main_grad themselves (ops/grad_accum.py), no table grads."""
    acc = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (p.U, p.V)]

    def unfused():
        p.step(mod)
        acc[0].add_(p.U.grad)
        acc[1].add_(p.V.grad)

    def fused():
        peer_ref.expert_step(lambda x, i, U, m: mod.gather_dot(x, i, U, m, acc=acc[0]),
                             lambda w, i, V, m: mod.gather_axpy(w, i, V, m, acc=acc[1]),
                             p.x, p.idx, p.scores.softmax(-1), p.U, p.V, F.gelu, p.m).backward(p.go)

    out = {}
    for name, fn in (("unfused", unfused), ("fused", fused)):
        out[f"{name}_ms"] = timeit(fn, warmup, reps, setup=p.clear)[0]
        peak, base = peak_memory(p, fn)
        out[f"{name}_extra_gib"] = (peak - base) / GiB
    return out


def breakdown(p, warmup, reps, copy_bw):
    """Each fused op alone (bf16), with its own floor."""
    ext = peer_cuda._ext()
    x, U, V, idx = p.x.detach(), p.U.detach(), p.V.detach(), p.idx
    T, d, N, e = p.T, p.d, p.N, p.esize
    w = torch.randn(*idx.shape, 1, device=x.device).to(x.dtype)
    rows = p.used * d * e
    act = T * d * e
    grad = N * d * e
    chunk = peer_cuda._settings.chunk
    def switch(name, flag, fn):   # an environment switch of the kernels for one call (unset: default)
        def run():
            os.environ[name] = flag
            try:
                return fn()
            finally:
                os.environ.pop(name, None)
        return run

    def prefetch(flag, fn):
        return switch("MEGAPEER_PEER_PREFETCH", flag, fn)

    def stage(flag, fn):   # the table-gradient walks staged through shared memory (1) or not (0)
        return switch("MEGAPEER_PEER_STAGE", flag, fn)

    # L2 gather rate: the same token-major gather from a table of T rows ([T, d], like x: it
    # stays in L2), the access pattern of the walks' per-pair x / grad_out rows
    small_tab = torch.randn(T, d, device=x.device).to(x.dtype)
    small_idx = torch.randint(0, T, idx.shape, device=x.device)
    pair_rows = idx.numel() * d * e
    ops = {
        "sort pairs by expert": (lambda: ext.sort_pairs(idx, N, chunk), idx.numel() * 8 * 2),
        "gather_axpy token-major, L2-resident table": (lambda: ext.gather_axpy(w, small_idx, small_tab, 1),
                                                       pair_rows + act),
        "gather_dot token-major": (lambda: ext.gather_dot(x, idx, U, 1, 0, chunk), rows + act),
        "gather_dot expert-major (incl. sort)": (lambda: ext.gather_dot(x, idx, U, 1, 1, chunk), rows + act),
        "gather_dot expert-major, no prefetch": (prefetch("0", lambda: ext.gather_dot(x, idx, U, 1, 1, chunk)),
                                                 rows + act),
        "gather_axpy token-major": (lambda: ext.gather_axpy(w, idx, V, 1), rows + act),
        "grad_U: scatter sorted (incl. sort)": (lambda: ext.expert_scatter(w, idx, x, None, N, 1, 0, chunk), grad + act),
        "grad_U: scatter sorted, staged": (stage("1", lambda: ext.expert_scatter(w, idx, x, None, N, 1, 0, chunk)),
                                           grad + act),
        "grad_U: scatter sorted, unstaged": (stage("0", lambda: ext.expert_scatter(w, idx, x, None, N, 1, 0, chunk)),
                                             grad + act),
        "grad_U: scatter atomic (incl. zero fill)": (lambda: ext.expert_scatter(w, idx, x, None, N, 1, 1, chunk), grad + act),
        "grad_U: scatter atomic, bf16 atomics": (lambda: ext.expert_scatter(w, idx, x, None, N, 1, 2, chunk), grad + act),
        "grad_V+grad_w: sorted, fused dot": (lambda: ext.expert_scatter(w, idx, x, V, N, 1, 0, chunk), rows + grad + act),
        "grad_V+grad_w: sorted, fused dot, staged": (stage("1", lambda: ext.expert_scatter(w, idx, x, V, N, 1, 0, chunk)),
                                                      rows + grad + act),
        "grad_V+grad_w: sorted, fused dot, unstaged": (stage("0", lambda: ext.expert_scatter(w, idx, x, V, N, 1, 0, chunk)),
                                                        rows + grad + act),
        "grad_V+grad_w: sorted, fused dot, prefetch": (prefetch("1", lambda: ext.expert_scatter(w, idx, x, V, N, 1, 0, chunk)),
                                                        rows + grad + act),
        "grad_V+grad_w: atomic, fused dot": (lambda: ext.expert_scatter(w, idx, x, V, N, 1, 1, chunk), rows + grad + act),
    }
    out = {}
    # accuracy of the table-gradient variants against fp32 math on the same bf16 inputs
    ref = ext.expert_scatter(w.float(), idx, x.float(), None, N, 1, 0, chunk)[0]
    for algo, name in ((0, "sorted"), (1, "atomic"), (2, "atomic_native")):
        g = ext.expert_scatter(w, idx, x, None, N, 1, algo, chunk)[0].float()
        out[f"grad_U rel. error vs fp32, {name}"] = ((g - ref).norm() / ref.norm()).item()
        del g
    del ref
    torch.cuda.empty_cache()
    for name, (fn, floor_bytes) in ops.items():
        ms = timeit(fn, warmup, reps)[0]
        out[name] = {"ms": ms, "floor_bytes": floor_bytes, "gbs": floor_bytes / (ms * 1e-3) / 1e9,
                     "x_floor": ms / (floor_bytes / copy_bw * 1e3)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ref-reps", type=int, default=10)
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--paths", default="grouped",
                    help="extra paths to time, comma-separated: grouped (Triton), gmm "
                         "(torch._grouped_mm), grouped_prev (grouped with LOCAL off: the launch "
                         "order before it), grouped_token (wide experts in the token-ordered "
                         "form, before the expert-ordered one)")
    ap.add_argument("--deterministic", action="store_true",
                    help="the kernels' deterministic forms (peer_cuda.set_deterministic)")
    ap.add_argument("--accumulate", action="store_true",
                    help="also time fwd+bwd with the table gradients added to fp32 main grads, "
                         "unfused (Megatron's add) and fused into the backward kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    known = {"grouped", "gmm", "grouped_prev", "grouped_token"}
    unknown = set(args.paths.split(",")) - known - {""}
    if unknown:
        ap.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(sorted(known))}")
    peer_cuda.set_deterministic(args.deterministic)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    fused_ok, why = peer_cuda.available()
    grouped_ok = peer_grouped.available()[0] and "grouped" in args.paths.split(",")
    gmm_ok = peer_gmm.available()[0] and "gmm" in args.paths.split(",")
    info = {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(["python3"] + sys.argv),
            "fused": why, "algorithms": peer_cuda.get_algorithms(),
            "deterministic": args.deterministic}
    print(f"# card: {info['card']}  torch {info['torch']}  date {info['date']}")
    print(f"# fused path: {why}; deterministic: {args.deterministic}")
    copy_bw = copy_bandwidth() if cuda else float("nan")
    info["copy_GBps"] = copy_bw / 1e9
    print(f"# device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    results = {"info": info, "sizes": {}}
    rows = []
    for size in args.sizes.split(","):
        p = Problem(size, dtype, device)
        T, d, N, h, k, m = p.T, p.d, p.N, p.h, p.k, p.m
        floor_fwd, floor_both = p.floor_fwd(), p.floor_fwd() + p.floor_bwd()
        res = {"shape": dict(T=T, d=d, N=N, h=h, k=k, m=m), "used_experts": p.used,
               "floor_fwd_bytes": floor_fwd, "floor_fwdbwd_bytes": floor_both,
               "floor_fwd_ms": floor_fwd / copy_bw * 1e3, "floor_fwdbwd_ms": floor_both / copy_bw * 1e3}
        if p.ref_bytes() <= REF_MAX_BYTES:
            res["reference"] = measure_step(p, peer_ref, 2, args.ref_reps)
            rows.append((size, "reference", res["reference"], floor_fwd, floor_both, T))
        else:
            print(f"# {size}: reference skipped (it would gather {p.ref_bytes() / GiB:.0f} GiB)")
        if grouped_ok:
            res["grouped"] = measure_step(p, peer_grouped, args.warmup, args.reps)
            rows.append((size, "grouped (Triton)", res["grouped"], floor_fwd, floor_both, T))
        if grouped_ok and "grouped_prev" in args.paths.split(","):
            res["grouped_prev"] = measure_prev(p, args.warmup, args.reps)
            rows.append((size, "grouped (order before LOCAL)", res["grouped_prev"], floor_fwd,
                         floor_both, T))
        if grouped_ok and "grouped_token" in args.paths.split(","):
            res["grouped_token"] = measure_token_order(p, args.warmup, args.reps)
            rows.append((size, "grouped (token order)", res["grouped_token"], floor_fwd,
                         floor_both, T))
        if gmm_ok and peer_gmm.supports(m, d, dtype, N, cuda):
            res["gmm"] = measure_step(p, peer_gmm, args.warmup, args.reps)
            rows.append((size, "gmm (grouped GEMM)", res["gmm"], floor_fwd, floor_both, T))
        if fused_ok:
            res["fused"] = measure_step(p, peer_cuda, args.warmup, args.reps)
            rows.append((size, "fused " + "/".join(str(v) for v in list(peer_cuda.get_algorithms().values())[:2]),
                         res["fused"], floor_fwd, floor_both, T))
            with mock.patch.dict(os.environ, {"MEGAPEER_PEER_SORT_REUSE": "0"}):  # a sort per pass
                res["fused_sort_per_pass"] = measure_step(p, peer_cuda, args.warmup, args.reps)
            rows.append((size, "fused, a sort per table pass", res["fused_sort_per_pass"], floor_fwd,
                         floor_both, T))
            if not args.no_variants:
                res["variants"] = {}
                st = peer_cuda._settings
                saved = (st.dot, st.scatter)
                for dot, scatter, flag in (("token", "sorted", ""), ("token", "sorted", "0"), ("token", "sorted", "1"),
                                           ("expert", "sorted", ""), ("token", "atomic", "")):
                    peer_cuda.set_algorithms(dot=dot, scatter=scatter)
                    os.environ["MEGAPEER_PEER_PREFETCH"] = flag
                    r = measure_step(p, peer_cuda, args.warmup, args.reps)
                    label = {"": "", "0": "/no-prefetch", "1": "/prefetch-all"}[flag]
                    res["variants"][f"{dot}/{scatter}{label}"] = r
                os.environ.pop("MEGAPEER_PEER_PREFETCH", None)
                st.dot, st.scatter = saved
            if not args.no_breakdown and p.m == 1:
                res["breakdown"] = breakdown(p, args.warmup, args.reps, copy_bw)
        if args.accumulate and fused_ok:   # the path that takes acc (ops/dispatch.py: _call)
            res["accumulate"] = {"fused": measure_accum(p, peer_cuda, args.warmup, args.reps)}
        results["sizes"][size] = res
        del p
        if cuda:
            torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)

    # ---- summary (printed last) ----
    for size, res in results["sizes"].items():
        if "breakdown" in res:
            print(f"\n## {size}: fused ops alone (bf16), effective GB/s = floor bytes / time")
            for name, r in res["breakdown"].items():
                if not isinstance(r, dict):
                    print(f"  {name:48s} {r:.2e}")
                    continue
                print(f"  {name:48s} {r['ms']:7.3f} ms  {r['gbs']:7.0f} GB/s  {r['x_floor']:5.2f}x floor")
        if "variants" in res:
            print(f"\n## {size}: fused variants (dot/scatter)")
            for name, r in res["variants"].items():
                print(f"  {name:28s} fwd {r['fwd_ms']:7.3f} ms  fwd+bwd {r['fwdbwd_ms']:7.3f} ms  "
                      f"peak {r['peak_gib']:6.2f} GiB")
    print(f"\n## {info['card']}, {info['date']}, copy {copy_bw / 1e9:.0f} GB/s; bf16; GB/s = floor bytes / time")
    print(f"{'size':6s} {'path':22s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} {'Mtok/s':>7s} {'GB/s':>6s} "
          f"{'x floor':>7s} {'peak GiB':>8s} {'extra GiB':>9s}")
    for size, name, r, ff, fb, T in rows:
        gbs = fb / (r["fwdbwd_ms"] * 1e-3) / 1e9
        xf = r["fwdbwd_ms"] / (fb / copy_bw * 1e3)
        print(f"{size:6s} {name:22s} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:10.3f} {T / r['fwdbwd_ms'] / 1e3:7.2f} "
              f"{gbs:6.0f} {xf:7.2f} {r['peak_gib']:8.2f} {r['transient_gib']:9.2f}")
    for size, res in results["sizes"].items():
        for name, r in res.get("accumulate", {}).items():
            print(f"{size}: {name} fwd+bwd + fp32 main-grad accumulation: unfused {r['unfused_ms']:.3f} ms, "
                  f"fused {r['fused_ms']:.3f} ms ({r['unfused_ms'] / r['fused_ms']:.2f}x); extra memory "
                  f"{r.get('unfused_extra_gib', 0):.2f} vs {r.get('fused_extra_gib', 0):.2f} GiB")
    for size, res in results["sizes"].items():
        if "fused" in res and "reference" in res:
            ref, fu = res["reference"], res["fused"]
            print(f"{size}: fused/reference speed-up fwd {ref['fwd_ms'] / fu['fwd_ms']:.1f}x, "
                  f"fwd+bwd {ref['fwdbwd_ms'] / fu['fwdbwd_ms']:.1f}x; peak {fu['peak_gib']:.2f} vs "
                  f"{ref['peak_gib']:.2f} GiB ({fu['peak_gib'] / ref['peak_gib']:.2f}); floor fwd+bwd "
                  f"{res['floor_fwdbwd_ms']:.3f} ms, fused at {fu['fwdbwd_ms'] / res['floor_fwdbwd_ms']:.2f}x")


if __name__ == "__main__":
    main()
