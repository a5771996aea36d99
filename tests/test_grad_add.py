"""training.triton_grad_add (ops/grad_add.py): DDP's main_grad += grad as a Triton kernel.

The worker (tests/workers/grad_add_check.py; on a CPU in the Triton interpreter, on a GPU
natively) checks: the kernel's fp32 sums of bf16 / fp16 gradients (fresh random inputs,
sizes below, at and across the block size) equal torch's add bitwise; fp32, strided and
small (< MIN_NUMEL) gradients are left to torch; and the tiny MLA+PEER with bf16 parameters
(MIN_NUMEL lowered to 0) trains to the same losses, bit for bit, with the kernel in
Megatron's DDP hook as with torch's add.
"""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT


def test_kernel_adds_like_torch_in_ops_and_training():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "grad_add_check.py")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    ops = r["ops"]
    assert not ops.pop("fp32_grad_taken") and not ops.pop("strided_taken")
    assert not ops.pop("small_taken")     # below MIN_NUMEL: torch's add
    assert len(ops) == 8 and all(c == {"taken": True, "equal": True} for c in ops.values()), ops
    assert r["kernel_adds"] > 0 and r["plain_adds"] == 0, r
    assert r["fast"] == r["plain"], r
    assert r["plain"][0] != r["plain"][-1], r      # the steps changed the weights


def test_plain_ddp_where_the_kernel_cannot_run(world1, monkeypatch):
    from megatron.core.distributed import DistributedDataParallel as DDP
    from bench.train_throughput import TINY, TINY_PEER
    from megapeer.config import load_config
    from megapeer.models import build_model_chunks
    from megapeer.models.gpt import transformer_config
    from megapeer.parallel import init_model_parallel
    from megapeer.training import step
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = load_config(overrides=TINY + TINY_PEER, world_size=1)
    init_model_parallel(cfg.parallel, 1234)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.training)
    for flag in (True, False):
        (m,) = step.wrap_ddp(build_model_chunks(cfg, tcfg), tcfg, triton_grad_add=flag)
        want = step.GradAddDDP if flag and torch.cuda.is_available() else DDP
        assert type(m) is want, (flag, type(m))
