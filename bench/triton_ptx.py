"""What Triton makes of a grouped PEER kernel for a Hopper GPU, on any machine (no GPU).

Compiles one kernel of megapeer/ops/peer_grouped_kernels.py for sm_90a with Triton's own
compiler and ptxas (no CUDA device or driver needed), with the launch settings that a
layer shape gets (ops/peer_grouped.py: _tiles, MERGED_TILES, GATHER_SUM), changed by
--tiles, and prints what decides its speed before a GPU is spent on it:
  smem      shared memory per program (bytes)
  loads     global loads by kind and width: cp.async into shared memory (0x10: 16 bytes)
            and plain ld.global (b16: 2-byte loads, v4: 16-byte ones, ...)
  mma       tensor-core instructions (wgmma on sm_90a)
  ptxas     registers per thread and spill bytes (ptxas -v), or the error of a setting
            ptxas refuses (e.g. too few registers at 16 warps)
  sass      machine instructions in the kernel, its subroutine calls (nvdisasm; a
            runtime 64-bit integer division, for one, is a call) and in its longest loop
Screen changes here first: on an H200 a `tl.where` over the scatter's offsets turned its
16-byte loads into 2-byte ones, and a 256 x 256 scatter tile did not fit the registers
(docs/benchmarks.md, calls 116-118). Integer arguments divisible by 16 get Triton's
divisibility hint, as a launch with the shape's values would.

  python3 bench/triton_ptx.py [--kernel scatter_merged] [--shape wider_mb2]
                              [--tiles KEY=V[,KEY=V...]] [--arch 90] [--json out.json]
"""
import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grouped_tune import SHAPES, compile_errors  # noqa: E402

INDEX = {"order", "block_expert", "block_start", "expert_off", "counts", "inv", "limit"}
DATA = {"x", "tab", "s", "coef", "src", "rows"}
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)")   # an instruction: address, text


def launch(kernel, shape):
    """(JIT function, constexprs, num_warps, num_stages, argument values) of one kernel as
    ops/peer_grouped.py launches it at shape (T, d, experts, h, k, m), bf16."""
    from megapeer.ops import peer_grouped as pg
    from megapeer.ops import peer_grouped_kernels as pk
    T, d, E, h, k, m = shape
    hk, mb = h * k, pg._mb(m)
    vals = dict(ldx=d, ldt=d, lds=d, ldo=d, hk=hk, m=m, d=d, n_exp=E, T=T,
                n_blocks=pg._n_blocks(T * hk, E, pg._tiles("dot", m)["BM"]))
    if kernel.startswith("scatter"):
        t = pg._tiles("scatter", m)
        if kernel == "scatter_merged":   # a deferred pass: its own chunk, an fp32 main_grad
            t.update(pg.MERGED_TILES)
        fn, const = pk.peer_grouped_scatter, dict(IEEE=False, SORTED=kernel == "scatter",
                                                  ACC=False)
    elif kernel == "dot":
        t = pg._tiles("dot", m)
        fn, const = pk.peer_grouped_dot, dict(IEEE=False, SORTED=True)
    elif kernel == "axpy":
        t = pg._tiles("axpy", m)
        fn, const = pk.peer_grouped_axpy, dict(IEEE=False, STORE=False)
    else:
        t = dict(pg.GATHER_SUM, num_stages=3)
        fn, const = pk.peer_gather_sum, dict(LIMIT=False)
    t["MC"] = min(t.get("MC", mb), mb)
    warps, stages = t.pop("num_warps"), t.pop("num_stages")
    names = {p.name for p in fn.params if p.is_constexpr}
    const.update({k: v for k, v in t.items() if k in names})
    const.update({k: v for k, v in vals.items() if k in names})   # e.g. the scatter's hk
    if "MB" in names:
        const["MB"] = mb
    return fn, const, warps, stages, vals


def signature(fn, const, vals, out_dtype):
    """Triton's signature and divisibility hints for fn's arguments (pointers aligned)."""
    sig, hints = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in const:
            sig[a] = "constexpr"
            continue
        if a in INDEX:
            sig[a] = "*i32"
        elif a in DATA:
            sig[a] = "*bf16"
        elif a in ("grad", "out"):
            sig[a] = out_dtype
        else:
            sig[a] = "i32"
            if vals.get(a, 1) % 16:
                continue
        hints[(i,)] = [["tt.divisibility", 16]]
    return sig, hints


@contextlib.contextmanager
def _quiet():
    """File descriptors 1 and 2 to /dev/null inside (Triton's native code writes there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def ptxas_report(ptx, arch):
    """(registers, spill bytes, error) from Triton's ptxas -v on ptx."""
    from triton import knobs
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except ImportError:   # older Triton: one ptxas
        ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o",
                            os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode:
        return None, None, " ".join(line.strip() for line in log.splitlines()
                                    if "fatal" in line or "error" in line)[:300]
    regs = re.search(r"Used (\d+) registers", log)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return int(regs.group(1)) if regs else None, sum(spill), None


def report(kernel, shape, tiles, arch=90, out_dtype=None):
    """The kernel's compile report (a dict) at shape with tiles changed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, const, warps, stages, vals = launch(kernel, shape)
    unknown = set(tiles) - set(const) - {"num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"--tiles: {sorted(unknown)} are not settings of {kernel} "
                         f"(it has {sorted(const)}, num_warps, num_stages)")
    warps, stages = tiles.get("num_warps", warps), tiles.get("num_stages", stages)
    const.update({k: v for k, v in tiles.items() if k in const})
    out_dtype = out_dtype or ("*fp32" if kernel in ("scatter_merged", "axpy") else "*bf16")
    sig, hints = signature(fn, const, vals, out_dtype)
    row = {"kernel": kernel, "settings": {**const, "num_warps": warps, "num_stages": stages},
           "triton": triton.__version__}
    try:
        with _quiet():   # a failing ptxas makes Triton print the whole PTX
            k = triton.compile(ASTSource(fn, sig, const, attrs=hints),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=warps, num_stages=stages))
    except compile_errors() as e:   # ptxas refused it (Triton runs ptxas), or Triton
        msg = str(e).split("`ptxas` stderr:")[-1].split("Repro command")[0]
        row["error"] = " ".join(msg.split())[:300]
        return row
    ptx = k.asm["ptx"]
    row["smem"] = k.metadata.shared
    row["loads"] = dict(collections.Counter(
        [f"cp.async {w}" for w in re.findall(
            r"cp\.async\.c[ag]\.shared\.global(?:\.\w+)* \[[^]]*\], \[[^]]*\], (\w+)", ptx)]
        + re.findall(r"ld\.global(?:\.\w+)*\.(?:v[248]\.)?[bsuf]\d+", ptx)))
    row["mma"] = dict(collections.Counter(re.findall(r"(wgmma\.mma_async|mma\.sync)", ptx)))
    row["registers"], row["spill_bytes"], err = ptxas_report(ptx, arch)
    if err:
        row["error"] = err
    row["sass"] = sass_counts(k.asm["cubin"])
    return row


def sass_counts(cubin):
    """{instructions, calls, loop} of a cubin's machine code (Triton's nvdisasm; loop: the
    longest loop's instructions)."""
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        p = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr.strip()[:200]}
    ins = [line for line in p.stdout.splitlines() if SASS_LINE.match(line)]
    return {"instructions": len(ins), "calls": sum(" CALL" in line for line in ins),
            "loop": longest_loop(p.stdout)}


def longest_loop(sass):
    """Instructions in the longest loop of nvdisasm's listing: from a label to a branch back
    to it (a kernel's main loop, where a latency-bound kernel spends its time); 0 if none."""
    labels, addrs, branches = {}, [], []
    pending = []
    for line in sass.splitlines():
        lab = re.match(r"\.(L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = SASS_LINE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        addrs.append(addr)
        for name in pending:
            labels[name] = addr
        pending = []
        target = re.search(r"\bBRA\b.*\(\.(L_x_\d+)\)", m.group(2))
        if target:
            branches.append((addr, target.group(1)))
    best = 0
    for addr, name in branches:
        start = labels.get(name)
        if start is not None and start <= addr:
            best = max(best, sum(start <= a <= addr for a in addrs))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", default="scatter_merged",
                    choices=["scatter_merged", "scatter", "dot", "axpy", "gather_sum"])
    ap.add_argument("--shape", default="wider_mb2", choices=sorted(SHAPES))
    ap.add_argument("--tiles", nargs="*", default=[""],
                    help="settings to compile with, KEY=INT[,KEY=INT] each ('' the defaults)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for t in args.tiles:
        try:
            kv = {k: int(v) for k, v in (x.split("=") for x in t.split(",") if x)}
        except ValueError:
            ap.error(f"--tiles: each item KEY=INT[,KEY=INT], got {t!r}")
        try:
            row = report(args.kernel, SHAPES[args.shape], kv, args.arch)
        except ValueError as e:
            ap.error(str(e))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "arch": args.arch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
