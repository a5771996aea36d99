"""Deferred PEER table gradients (ops/table_grads.py, model.peer.defer_table_grads).

The grouped kernels' expert-ordered form (experts 100 wide, padded to 128) over 4
micro-batches of one step, fresh random inputs, fp32: the table gradients with deferral
(every 2, 3 and 5 micro-batches, eager and compiled) against one gradient per micro-batch
within 1e-6 of the largest magnitude (sums in another order), the x and gate gradients
unchanged (bitwise), the scatter over several micro-batches at once against the sum of
single scatters (1e-6), the merged layout's Triton kernels equal to its torch form
(merge_layouts_torch), how many micro-batches each table-gradient pass took, no table
gradient before the first pass, and an error when a step ends with inputs kept; deferred
gradients written into an fp32 main_grad (as under Megatron's DDP): added to the values it
holds, or stored once table_grads.zeroed says it was zeroed (it holds NaN there, which
must not show), and an ordinary gradient of the table ending that state; a main_grad left
stale by zero_grad_buffer (lazy zeroing) zeroed before an ordinary gradient or, where no
gradient came, by table_grads.settle, and whether a step's first write stored it whole.
On a GPU the same in bf16 with experts 128 wide (the form's 16-byte rows): the deferred
table gradients within the per-micro-batch bf16 error against fp32, plus 1e-3. Deferral
through Megatron's schedule and DDP under DP2, PP2, TP2 and EP2, two steps (the second
with the tables' main_grads not zeroed): tests/test_peer_grouped.py
(test_expert_ordered_form_in_parallel_layouts). Lazy zeroing's buffer spans: below.
On a CPU the kernels run in the Triton interpreter.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

triton = pytest.importorskip("triton", reason="the grouped PEER kernels need Triton")


def _env():
    import torch
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def test_deferred_table_grads_match_per_micro_batch():
    import torch
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers",
                                                     "table_grads_check.py")],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res.pop("scatter_merged") < (1e-6 if not torch.cuda.is_available() else 1e-2)
    assert res.pop("merge_kernels") == {"ok": 1.0}   # merge_layouts' kernels = torch's
    assert res.pop("single_micro_batch_calls") == 0
    assert "still hold 2 micro-batch(es)" in res.pop("short_step")
    lazy = res.pop("lazy_zeroing")
    for k in ("grad_zeroes", "grad_not_whole", "settle_zeroes", "settle_keeps_fresh"):
        assert lazy.pop(k) is True, k
    for case, r in res.items():
        assert r.pop("calls_ok"), case
        assert r.pop("none_before_flush", True), case
        for name, err in r.items():
            if name.endswith("_bf16"):   # GPU: (deferred, per micro-batch) error vs fp32
                assert err[0] <= err[1] + 1e-3, (case, name, err)
            else:
                assert err < (1e-6 if name in ("U", "V") else 1e-12), (case, name, err)


def test_defer_table_grads_config_errors(tmp_path):
    from megapeer.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.peer.defer_table_grads"):
        load_config(None, ["model.peer.defer_table_grads=0"])
    with pytest.raises(ConfigError, match="reduce-overhead"):   # CUDA graphs: no host step
        load_config(None, ["model.peer.defer_table_grads=2", "training.compile=true",
                           "training.compile_mode=reduce-overhead"])
    load_config(None, ["model.peer.defer_table_grads=2", "training.compile=true"])


def test_trainer_states_the_deferral_buffers(monkeypatch):
    """The trainer's log of the deferral's memory: the 1.3B benchmark model's PEER layer at
    micro-batch 2 holds 320 MiB per micro-batch (U and V: coefficients [262144, 256] and
    token rows [8192, 2048] in bf16), times the layers and micro-batches of a pass."""
    from types import SimpleNamespace as NS

    import torch

    from megapeer.training import loop
    layer = NS(ep_size=1, m=256, d_local=2048, peer=NS(heads=4, topk=8),
               U=torch.empty(0, dtype=torch.bfloat16))
    monkeypatch.setattr(loop, "peer_modules", lambda chunks: [layer] * 12)
    cfg = NS(training=NS(micro_batch_size=2), model=NS(seq_length=4096))
    assert loop._defer_buffer_gib(None, cfg, 4) == 12 * 4 * 320 / 1024
    layer.ep_size = 2   # experts see the expert-parallel group's tokens
    assert loop._defer_buffer_gib(None, cfg, 1) == 12 * 2 * 320 / 1024


def test_zeroing_skips_only_the_kept_tables():
    """training/step.py's lazy zeroing: inside _zeroing_skips a buffer's reset zeroes all
    but the kept parameters' spans (apart, touching, at the start, short of the end), buffers
    without kept parameters reset as before, and afterwards every reset is the class's."""
    import torch

    from megapeer.training import step

    class Buffer:
        def __init__(self, index):
            self.grad_data, self.param_index_map = torch.ones(12), index

        def reset(self):
            self.grad_data.zero_()
    a, b, c, d = (object() for _ in range(4))
    mixed = Buffer({a: (0, 3, 0), b: (3, 5, 0), c: (7, 9, 0), d: (9, 11, 0)})
    other = Buffer({object(): (0, 12, 0)})
    ddp = type("DDP", (), {"buffers": [mixed], "expert_parallel_buffers": [other]})()
    with step._zeroing_skips(ddp, [a, c, d]):
        for buf in (mixed, other):
            buf.reset()
    assert mixed.grad_data.tolist() == [1] * 3 + [0] * 4 + [1] * 4 + [0]
    assert other.grad_data.tolist() == [0] * 12
    assert "reset" not in vars(mixed) and "reset" not in vars(other)
    mixed.reset()
    assert mixed.grad_data.tolist() == [0] * 12
