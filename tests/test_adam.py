"""training.triton_adam (ops/adam.py): AdamW on fp32 main parameters that also writes the
bf16 model parameter, one Triton pass.

The worker (tests/workers/adam_check.py; on a CPU in the Triton interpreter, on a GPU
natively) checks: the kernel's p, m, v against torch's AdamW (fresh random tensors and
state, with and without weight decay and a clip factor, sizes below, at and across the block
size) within 2e-6 relative (the moments: to the size of their update's terms), the model
copy equal to p rounded, the gradient left as it was; small tensors left to torch; and the
tiny MLA+PEER with bf16 parameters (every tensor on the kernel) trained with it and without:
main parameters and Adam moments after the first step within 1e-5 relative, model parameters
equal to their rounded main parameters after every step, per-step losses within 1e-3 (bf16
parameters round the fp32 differences); and a checkpoint round trip
(training/checkpointing.py) with the kernel stepping before and after it, bitwise equal to
the run without the break.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def _run(clip, fused, *more):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "adam_check.py"),
                        clip, fused, *more], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("clip,fused", [("0.0", "0"), ("0.05", "0"), ("0.05", "1")])
def test_kernel_steps_like_torch_adamw(clip, fused):
    """clip 0.05 clips every step: by Megatron's multiply before the kernel, or (every
    group fused: a GPU, or forced on the CPU) by the kernel's clip factor, compared with
    torch's fused Adam and its gradient scale."""
    r = _run(clip, fused)
    ops = r["ops"]
    assert len(ops) == 12, ops
    for name, c in ops.items():
        assert c["copy"] and c["grad_kept"], (name, c)
        assert max(c["p"], c["m"], c["v"]) <= 2e-6, (name, c)
    assert not r["small_taken"]
    assert r["kernel_calls"] > 0 and r["plain_calls"] == 0, r
    assert r["copies_equal"], r
    assert r["first_step_main_rel"] <= 1e-5, r
    for a, b in zip(r["fast"], r["plain"]):
        assert abs(a - b) <= 1e-3 * abs(b), r
    assert r["plain"][0] != r["plain"][-1], r      # the steps changed the weights
    if clip == "0.05":
        folded = fused == "1" or torch.cuda.is_available()
        assert r["gmul_below_1"] == (r["kernel_calls"] if folded else 0), r


def test_resume_through_a_checkpoint_is_exact(tmp_path):
    """The kernel's optimizer state through training/checkpointing.py: 6 steps straight
    equal 3 steps, a checkpoint, a fresh build that loads it and 3 more (losses and every
    fp32 main parameter bitwise), with the kernel stepping after the load."""
    r = _run("0.05", "1", str(tmp_path / "ckpt"))
    assert r["kernel_calls_after"] > 0, r
    assert r["after"] == r["straight"][3:], r
    assert r["mains_equal"], r
