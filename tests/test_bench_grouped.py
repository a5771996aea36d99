"""bench/grouped_parts.py and bench/grouped_tune.py with --check: each form or launch setting
runs once, untimed, on a CPU in Triton's interpreter (fp32, the `tiny` shape), so a kernel
signature or layout change that breaks the benchmarks fails here rather than on the GPU
(both broke once without notice when the layout gained the sentinel group). Every form
must run, and those with an error figure must agree with the first form of their kernel
(grouped_parts) or with the default settings (grouped_tune) to 1e-5 relative."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton", reason="the grouped PEER kernels need Triton")


def _check(script, args, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark itself runs (timed, bf16)")
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--check",
                        "--shapes", "tiny", "--json", str(out)] + args,
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


def test_grouped_parts_runs_every_form(tmp_path):
    rows = _check("grouped_parts.py", [], tmp_path)["rows"]
    forms = {(r["kernel"], r["form"]) for r in rows}
    for kernel, form in [("axpy", "expert order (what runs)"), ("axpy", "gmm sorted + gather-sum"),
                         ("axpy", "triton fp32 atomics"), ("scatter", "gmm over sorted copies"),
                         ("scatter", "triton, PREFETCH off"), ("dot", "gmm over a sorted copy")]:
        assert (kernel, form) in forms, (kernel, form, sorted(forms))
    assert len(rows) == 28, len(rows)
    for r in rows:
        assert r["ms"] is None and r.get("rel_err", 0.0) < 1e-5, r


def test_grouped_tune_runs_every_setting(tmp_path):
    res = _check("grouped_tune.py", ["--bm", "64", "--tiles", "64,128", "--warps", "4",
                                     "--stages", "3", "--mc", "128", "--local", "0,1",
                                     "--prefetch", "0,1"], tmp_path)["results"]
    kinds = {}
    for r in res:
        assert "error" not in r and r["rel_err"] < 1e-5, r
        kinds[r["kernel"]] = kinds.get(r["kernel"], 0) + 1
    # the dot in one grid order; axpy and scatter in both, the scatter with and without PREFETCH
    assert kinds == {"dot": 2, "axpy": 4, "axpy_store": 4, "scatter": 8}, kinds
