"""Tensor (with and without sequence parallelism), pipeline (1F1B and interleaved), expert
and data parallel layouts equal the single-process loss and gradients (fp32, CPU, gloo),
and checkpoints reshard.

Tolerances: loss within 1e-5 relative; every gradient tensor within 1e-4 of the
reference, relative to that tensor's largest entry (TP changes summation order).
"""
import json

import pytest
import torch

from conftest import torchrun

LAYOUTS_2 = ["tp2", "tp2sp", "pp2", "vpp2", "ep2", "dp2"]
LAYOUTS_4 = ["tp2ep2", "tp2spep2", "tp2sppp2"]
RELOAD = ["tp2", "tp2sp", "pp2", "vpp2", "ep2", *LAYOUTS_4]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    torchrun("parallel_check.py", ["reference", str(out)], 1)
    torchrun("parallel_check.py", ["layouts", str(out), ",".join(LAYOUTS_2)], 2)
    layouts = json.loads((out / "layouts.json").read_text())
    torchrun("parallel_check.py", ["layouts", str(out), ",".join(LAYOUTS_4)], 4)
    layouts.update(json.loads((out / "layouts.json").read_text()))
    torchrun("parallel_check.py", ["reload", str(out), ",".join(RELOAD)], 1)
    return {"ref": json.loads((out / "reference.json").read_text()), "layouts": layouts,
            "reload": json.loads((out / "reload.json").read_text())}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS_2 + LAYOUTS_4)
def test_layout_matches_single_process(results, layout):
    ref, got = results["ref"], results["layouts"][layout]
    assert got["missing"] == []
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert got["grad_rel_err"] < 1e-4, f"worst gradient: {got['worst_key']}"


@pytest.mark.parametrize("layout", RELOAD)
def test_checkpoint_reshards_to_single_process(results, layout):
    ref = torch.tensor(results["ref"]["logits"])
    got = torch.tensor(results["reload"][layout])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
