"""training.fused_adam (training/optimizer.py): torch's fused Adam kernel for GPU parameters.

On the CPU the flag leaves Megatron's optimizer as it was; on a GPU it fuses every group.
With the device test forced open (the fused kernel also runs on the CPU), a tiny
MLA+PEER trains to the same losses as with the multi-tensor Adam (fp32, 1e-6 relative),
every group reports fused, and the flag survives a reload of the optimizer state (which
restores the groups' flags).
"""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)


def _losses(world1, overrides, steps=4):
    from bench.compile_check import losses
    from bench.train_throughput import TINY, TINY_PEER
    return losses(TINY + TINY_PEER + overrides, "eager", steps)


def test_cpu_parameters_stay_unfused_gpu_ones_fused(world1):
    import torch
    from megapeer.training import optimizer as O
    from bench.train_throughput import TINY, TINY_PEER
    from megapeer.config import load_config
    from megapeer.models import build_model_chunks
    from megapeer.models.gpt import param_dtype, transformer_config
    from megapeer.parallel import init_model_parallel
    from megapeer.training.step import wrap_ddp
    cfg = load_config(overrides=TINY + TINY_PEER, world_size=1)
    init_model_parallel(cfg.parallel, 1234)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.training)
    opt = O.build_optimizer(wrap_ddp(build_model_chunks(cfg, tcfg), tcfg), cfg.training,
                            param_dtype(cfg.training))
    gpu = torch.cuda.is_available()          # the trainer puts the model on the GPU if any
    assert cfg.training.fused_adam and O.use_fused_adam(opt) == gpu
    inner = list(O._torch_adams(opt))
    assert inner and all(g["fused"] is (True if gpu else None) for o in inner for g in o.param_groups)
    assert isinstance(inner[0], torch.optim.Adam)


def test_fused_adam_trains_like_multi_tensor(world1, monkeypatch):
    from megapeer.training import optimizer as O
    plain = _losses(world1, ["training.fused_adam=false"])
    seen = []
    real = O.use_fused_adam

    def spy(opt):
        seen.append(real(opt))
        return seen[-1]

    monkeypatch.setattr(O, "_fusable", lambda p: True)
    monkeypatch.setattr(O, "use_fused_adam", spy)
    import bench.compile_check  # noqa: F401  (imports optimizer_step by name at call time)
    fused = _losses(world1, ["training.fused_adam=true"])
    assert seen and all(seen), seen
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 1e-6 * abs(b), (fused, plain)
    # a different update would show: the plain losses move after step 1
    assert plain[-1] != plain[0]


def test_flag_survives_state_reload(world1, monkeypatch):
    import torch
    from megapeer.training import optimizer as O
    monkeypatch.setattr(O, "_fusable", lambda p: True)
    p = torch.nn.Parameter(torch.randn(4))
    inner = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    inner.step()                      # state made by the multi-tensor path (step on the CPU)
    saved = inner.state_dict()

    class Wrapped:                    # Megatron's mixed-precision wrapper holds .optimizer
        optimizer = inner
        megapeer_fused_adam = True

    assert O.use_fused_adam(Wrapped)
    inner.load_state_dict(saved)      # restores fused=None from the saved groups
    assert inner.param_groups[0]["fused"] is None
    assert O.use_fused_adam(Wrapped) and inner.param_groups[0]["fused"] is True
    inner.step()
    assert float(inner.state[p]["step"]) == 2.0
    inner.state[p]["step"] = torch.tensor(2.0, dtype=torch.float64)   # as a foreign state
    assert O.use_fused_adam(Wrapped) and inner.state[p]["step"].dtype == torch.float32
    inner.step()
    assert float(inner.state[p]["step"]) == 3.0
