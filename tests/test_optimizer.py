"""training.fused_adam (training/optimizer.py): torch's fused Adam kernel for GPU parameters.

On the CPU the flag leaves Megatron's optimizer as it was; on a GPU it fuses every group.
With the device test forced open (the fused kernel also runs on the CPU), a tiny
MLA+PEER trains to the same losses as with the multi-tensor Adam (fp32, 1e-6 relative; every
step clipped, the fused form through its kernel's gradient scale),
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
    """Also with every step's gradients clipped (clip_grad 0.05): the fused form clips
    through the kernel's gradient scale, the multi-tensor one by Megatron's multiply."""
    from megapeer.training import optimizer as O
    clip = ["training.clip_grad=0.05"]
    plain = _losses(world1, ["training.fused_adam=false"] + clip)
    seen, folded = [], []
    real, real_all = O.use_fused_adam, O._all_fused

    def spy(opt):
        seen.append(real(opt))
        return seen[-1]

    def spy_all(opt):
        folded.append(bool(real_all(opt)))
        return real_all(opt)

    monkeypatch.setattr(O, "_fusable", lambda p: True)
    monkeypatch.setattr(O, "use_fused_adam", spy)
    monkeypatch.setattr(O, "_all_fused", spy_all)
    import bench.compile_check  # noqa: F401  (imports optimizer_step by name at call time)
    fused = _losses(world1, ["training.fused_adam=true"] + clip)
    assert seen and all(seen), seen
    assert len(folded) == 4 and all(folded), folded   # every step clipped, in the kernel
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


def test_grad_norm_without_per_tensor_host_reads(world1, monkeypatch):
    """Without TE / apex the trainer replaces Megatron's local gradient-norm helper (one
    host read-back per tensor) by torch's foreach norm: the same norm (fp32, 1e-6
    relative, fresh random tensors of mixed shapes) and the same clipped training losses
    (1e-6), with clipping active (clip_grad 0.05)."""
    import torch
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megapeer.training import optimizer as O
    assert O.sync_free_grad_norm() and clip_grads.l2_norm_impl is O.foreach_l2_norm
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    ts = [torch.randn(*s, generator=g) * torch.rand((), generator=g) * 10
          for s in ((7,), (3, 5), (64, 33), (1,), (2, 3, 4))]
    ours, _ = O.foreach_l2_norm(65536, None, [ts], False)   # as Megatron calls it
    ref, _ = mutils.local_multi_tensor_l2_norm(65536, None, [ts], False)
    exact = torch.cat([t.double().flatten() for t in ts]).norm()
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert abs(ours.item() - exact.item()) <= 1e-6 * exact.item()
    assert abs(ours.item() - ref.item()) <= 1e-6 * exact.item()
    clip = ["training.clip_grad=0.05"]
    fast = _losses(world1, clip)
    monkeypatch.setattr(O, "sync_free_grad_norm", lambda: False)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", mutils.local_multi_tensor_l2_norm)
    slow = _losses(world1, clip)
    assert len(fast) == len(slow) == 4
    for a, b in zip(fast, slow):
        assert abs(a - b) <= 1e-6 * abs(b), (fast, slow)


def test_foreach_scale_matches_megatrons_local_helper(world1, monkeypatch):
    """The foreach stand-in for Megatron's local multi-tensor scale (main -> bf16 model
    parameter copies, clipped gradients): bitwise Megatron's helper on fresh random
    tensors (fp32 -> bf16 and fp32 -> fp32 copies, in-place and out-of-place scales), and
    the same clipped training losses (1e-6)."""
    import torch
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megapeer.training import optimizer as O
    assert O.foreach_scale_copy()
    assert moptimizer.multi_tensor_scale_impl is clip_grads.multi_tensor_scale_impl is O.foreach_scale
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    shapes = ((7,), (3, 5), (64, 33), (1,), (2, 3, 4))
    for dtype in (torch.bfloat16, torch.float32):
        for scale in (1.0, 0.37):
            src = [torch.randn(*s, generator=g) * 10 for s in shapes]
            ours = [torch.empty(*s, dtype=dtype) for s in shapes]
            ref = [torch.empty(*s, dtype=dtype) for s in shapes]
            O.foreach_scale(65536, None, [src, ours], scale)
            mutils.local_multi_tensor_scale(65536, None, [src, ref], scale)
            assert all(torch.equal(a, b) for a, b in zip(ours, ref)), (dtype, scale)
    grads = [torch.randn(*s, generator=g) for s in shapes]
    ref = [t * 0.37 for t in grads]
    O.foreach_scale(65536, None, [grads, grads], 0.37)   # as clip_grads calls it
    assert all(torch.equal(a, b) for a, b in zip(grads, ref))
    clip = ["training.clip_grad=0.05", "training.precision=bf16"]
    fast = _losses(world1, clip)
    monkeypatch.setattr(O, "foreach_scale_copy", lambda: False)
    for mod in (clip_grads, moptimizer):
        monkeypatch.setattr(mod, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale)
    slow = _losses(world1, clip)
    assert len(fast) == len(slow) == 4
    for a, b in zip(fast, slow):
        assert abs(a - b) <= 1e-6 * abs(b), (fast, slow)


def test_clip_in_the_fused_kernel_equals_megatrons_clip(world1, monkeypatch):
    """One clipped step (fresh random gradients, norm far above clip_grad) on the tiny
    MLA+PEER: clipping through the fused kernel's gradient scale gives Megatron's clipped
    gradients (written back by the kernel) and the same parameters (fp32, 1e-6 relative)."""
    import torch
    from bench.train_throughput import TINY, TINY_PEER
    from megapeer.config import load_config
    from megapeer.models import build_model_chunks
    from megapeer.models.gpt import param_dtype, transformer_config
    from megapeer.parallel import init_model_parallel
    from megapeer.training import optimizer as O
    from megapeer.training.step import wrap_ddp
    monkeypatch.setattr(O, "_fusable", lambda p: True)
    cfg = load_config(overrides=TINY + TINY_PEER, world_size=1)
    seed = int(torch.randint(0, 10**6, ()))
    runs = {}
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(O, "_all_fused", lambda opt: [])
        init_model_parallel(cfg.parallel, 1234)
        tcfg = transformer_config(cfg.model, cfg.parallel, cfg.training)
        ddp = wrap_ddp(build_model_chunks(cfg, tcfg), tcfg)
        opt = O.build_optimizer(ddp, cfg.training, param_dtype(cfg.training))
        g = torch.Generator().manual_seed(seed)
        for p in ddp[0].parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g))
        stepped, norm = O.optimizer_step(opt, 0.05)
        assert stepped and norm > 1.0
        params = [p for o in O._torch_adams(opt) for grp in o.param_groups for p in grp["params"]]
        runs[fold] = ([p.detach().clone() for p in params],
                      [p.grad.detach().clone() for p in params])
    for a, b in zip(*(sum(runs[f], []) for f in (True, False))):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max().clamp(min=1e-30)
