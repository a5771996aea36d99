"""The grouped Triton PEER kernels (ops/peer_grouped.py) against the plain PyTorch reference.

fp32, forward and every gradient (x, U, V, gates), fresh random inputs: m = 16, 4 (padded
to the 16-wide tile), 32 with hot experts spanning several blocks, 1, and 100 and 300
(padded to 128 and 512, cut into column chunks); T and d not
multiples of the tiles, one token choosing one expert in every slot, x a column slice;
one sort of the pairs per forward + backward (the layout is shared by the 6 kernel calls);
and deterministic mode (the axpy without atomics, in column passes): reference values and
bitwise-equal repeats; the same for experts >= 128 wide outside deterministic mode (their
axpy always writes one row per pair); other expert-parallel ranks' pairs as the sentinel
id (narrow, deterministic, wide in both forms: against the reference with them on
valid rows and gated 0; their dot outputs written as zeros over NaN-filled memory); the
layout's Triton kernels equal to its torch form (layout_torch) on awkward ids; the axpy and
scatter in their other grid order (LOCAL off) and the scatter with its pair ids loaded a
step ahead (PREFETCH): the benchmarks' comparisons; the scatter with 64-bit offsets (I32 off,
what inputs past 2**31 elements take). Experts >= 128 wide take the expert-ordered form (s and w sorted
by expert, the axpy as torch's grouped GEMM + a per-token sum): checked as above, and the
token-ordered form for them too (SORTED_FORM off), and both forms under torch.compile;
through the model under TP2, EP2 and
DP2 against the single-process reference path (the parallel tests' tolerances). On a GPU:
no host synchronisation in a forward + backward (torch.cuda.set_sync_debug_mode("error")),
in both forms.
On a CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set for the worker
process only). Tolerance: 1e-5 relative to the reference's largest magnitude (fp32 with
IEEE dots; the axpy sums with atomics in another order).
bf16 is checked on a GPU only, at m = 16 and m = 128 (the expert-ordered form, also in
64-column passes), within twice the reference's own bf16 error against fp32, plus 1e-3:
the Triton interpreter's bf16 dot is wrong (Triton 3.9 on CPU).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_trains_like_reference

triton = pytest.importorskip("triton", reason="the grouped PEER kernels need Triton")


def test_grouped_kernels_match_reference():
    import torch
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers",
                                                     "peer_grouped_check.py")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert "unavailable" not in res, res
    assert res.pop("layout_calls") == 1   # one sort per forward + backward, shared by 4 ops
    assert res.pop("host_syncs", "") == "", "the grouped path waits for the GPU (GPU only)"
    assert res.pop("host_syncs_expert_order", "") == "", "the expert-ordered form waits"
    # which form ran: expert order for wide experts (fp32 here: on a GPU only bf16 takes it,
    # checked by the bf16_wide case)
    wide = {"m100_chunked", "m300_chunked", "unlocal_m100_chunked", "prefetch_m100_chunked",
            "foreign_m100_chunked", "offsets64_m100_chunked"}
    # other EP ranks' pairs (the sentinel id): the dot writes zeros for them, not garbage
    assert res.pop("foreign_zeros") == {"ok": 1.0}
    # the layout's Triton kernels give layout_torch's tensors exactly
    assert res.pop("layout_kernels") == {"ok": 1.0}
    for case, errs in res.items():
        if "expert_order" in errs:
            want = case in wide and not torch.cuda.is_available()
            assert errs.pop("expert_order") == float(want), case
    for case, errs in res.items():
        if case.startswith("bf16"):   # GPU only: grouped bf16 error vs the reference's
            for name, (grp, ref) in errs.items():
                assert grp <= 2 * ref + 1e-3, (name, grp, ref)
            continue
        for name, err in errs.items():
            if name.endswith("_repeat"):   # deterministic mode: bitwise repeatable
                assert err == 0.0, (case, name, err)
            else:
                assert err < 1e-5, (case, name, err)


def test_grouped_mode_needs_triton_to_run(monkeypatch):
    import torch

    from megapeer.ops import dispatch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("on a GPU the grouped mode runs")
    x, U = torch.randn(4, 8), torch.randn(16, 8)
    idx = torch.zeros(4, 1, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="model.peer.kernel=grouped but needs a CUDA GPU"):
        dispatch.gather_dot(x, idx, U, 2, mode="grouped")


def test_scatter_offsets_in_32_bits_only_where_they_fit():
    """The scatter's gathers take 32-bit offsets (I32) only while every offset into its
    coefficients and rows is below 2**31 (meta tensors: no memory)."""
    import torch

    from megapeer.ops.peer_grouped import _offsets_fit
    rows = torch.empty(2 ** 19, 2048, device="meta")
    assert _offsets_fit(rows, torch.empty(2 ** 23, 255, device="meta"))
    assert not _offsets_fit(rows, torch.empty(2 ** 23, 256, device="meta"))
    assert not _offsets_fit(torch.empty(2 ** 21, 1024, device="meta"))
    wide = torch.empty(2 ** 17, 2 ** 14, device="meta")[:, :2048]   # rows strided 2**14
    assert not _offsets_fit(wide) and _offsets_fit(wide[: 2 ** 17 - 1])


@pytest.mark.timeout(900)
def test_grouped_kernels_train_like_reference(tmp_path, parity_demo):
    """model.peer.kernel=grouped through the trainer (tiny MLA+PEER, experts of width 16,
    fp32, Triton interpreter on CPU): the reference path's per-step losses (1e-6 relative)
    and gradient norms (1e-5; they include the table gradients). Seen: equal to the last
    bit; a 0.1% error in the grouped forward output or table gradients fails it."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU: bench/kernel_parity.py compares fused and grouped in bf16")
    assert_trains_like_reference(tmp_path, parity_demo, "grouped", env={"TRITON_INTERPRET": "1"})


@pytest.mark.timeout(900)
def test_expert_ordered_form_in_parallel_layouts(tmp_path, wide_reference):
    """The tiny MLA+PEER of tests/test_parallel.py with experts 128 wide: the single-process
    reference path's loss and gradients against the grouped kernels' expert-ordered form
    (Triton interpreter on a CPU) under TP2, EP2 and DP2 (1e-5 loss, 1e-4 gradients); and
    the same with deferred table gradients (model.peer.defer_table_grads=3: 4 micro-batches
    on one rank, 2 per rank under DP2, also with the reduction overlapped with the backward;
    under PP2 the 1F1B schedule; under TP2 the tables' column slices, under EP2 their row
    slices), each step run twice: the second's zero_grad_buffer leaves the tables' main_grads
    as the first left them (their first write stored them whole), and its gradients are
    the ones checked (tests/test_table_grads.py has the deferral's own checks)."""
    import torch

    from conftest import WIDE, torchrun, use_reference
    if torch.cuda.is_available():
        pytest.skip("CPU check (Triton interpreter); GPU layouts: bench/layout_scaling.py")
    use_reference(wide_reference, tmp_path)
    plain = ["tp2", "ep2", "dp2"]
    deferred = [f"{x}+defer3" for x in ("dp2", "dp2overlap", "pp2", "tp2", "ep2")]
    torchrun("parallel_check.py", ["layouts", str(tmp_path), ",".join(plain + deferred)], 2,
             env={"PARALLEL_EXTRA": WIDE + " model.peer.kernel=grouped", "TRITON_INTERPRET": "1",
                  "PARALLEL_SAVE": "0"})
    ref = json.loads((tmp_path / "reference.json").read_text())
    got = json.loads((tmp_path / "layouts.json").read_text())
    for layout in plain + deferred:
        r = got[layout]
        assert r["missing"] == [], layout
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (layout, r, ref["loss"])
        assert r["grad_rel_err"] < 1e-4, (layout, r)
        # deferred: not zeroed for the second step, every other gradient was
        assert r["tables_kept"] is (True if layout in deferred else None), layout
    assert got["dp2overlap+defer3"]["tables_ready"] is True   # buckets reduced in backward
