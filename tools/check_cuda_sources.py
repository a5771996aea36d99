#!/usr/bin/env python3
"""Compile-check csrc/peer/*.cu for sm_90a with nvcc (no GPU and no CUDA torch needed).

The .cu files include only CUDA, CUB and CUTLASS/CuTe headers (the torch binding
lives in peer_binding.cpp, which needs a CUDA build of torch and is compiled on the
GPU machine by setup.py). Each file is compiled with `nvcc -c` to a temporary
directory, in parallel; any error fails the check.

Headers: the nvidia-cutlass wheel (found without importing it), or
MEGAPEER_CUTLASS_INCLUDE. nvcc: $NVCC, then PATH, then $CUDA_HOME/bin.
Exit status: 0 ok, 1 compile error, 2 tools missing (message says which).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "peer"
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def find_cutlass_include() -> str | None:
    env = os.environ.get("MEGAPEER_CUTLASS_INCLUDE")
    if env:
        return env if os.path.isdir(os.path.join(env, "cute")) else None
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return inc if os.path.isdir(os.path.join(inc, "cute")) else None


def missing_tools() -> str | None:
    """A reason string when the check cannot run here, else None."""
    if find_nvcc() is None:
        return "nvcc not found (set NVCC or CUDA_HOME)"
    if find_cutlass_include() is None:
        return "CUTLASS/CuTe headers not found (pip install nvidia-cutlass, or set MEGAPEER_CUTLASS_INCLUDE)"
    return None


def compile_one(nvcc: str, inc: str, src: Path, out_dir: str, archs: list[str]) -> tuple[Path, int, str, float]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [nvcc, "-c", *FLAGS, *gencode, f"-I{inc}", f"-I{SRC}", str(src), "-o",
           os.path.join(out_dir, src.stem + ".o")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src, proc.returncode, (proc.stdout + proc.stderr).strip(), time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=os.environ.get("MEGAPEER_CUDA_ARCHS", "90a"),
                    help="targets separated by ';' or ',' (default 90a)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("files", nargs="*", help="default: csrc/peer/*.cu")
    args = ap.parse_args(argv)
    why = missing_tools()
    if why:
        print(f"check_cuda_sources: {why}", file=sys.stderr)
        return 2
    nvcc, inc = find_nvcc(), find_cutlass_include()
    archs = [a.strip() for a in args.archs.replace(",", ";").split(";") if a.strip()]
    files = [Path(f).resolve() for f in args.files] or sorted(SRC.glob("*.cu"))
    if not files:
        print("check_cuda_sources: no .cu files", file=sys.stderr)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory(prefix="megapeer-cu-") as tmp, cf.ThreadPoolExecutor(args.jobs) as pool:
        for src, rc, log, secs in pool.map(lambda f: compile_one(nvcc, inc, f, tmp, archs), files):
            status = "ok" if rc == 0 else "FAILED"
            print(f"{src.relative_to(ROOT) if src.is_relative_to(ROOT) else src}: {status} ({secs:.1f} s)")
            if rc != 0:
                failed += 1
                print(log, file=sys.stderr)
            elif "spill" in log and "0 bytes spill" not in log:
                print(log)
    print(f"check_cuda_sources: {len(files) - failed}/{len(files)} compiled for {', '.join('sm_' + a for a in archs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
