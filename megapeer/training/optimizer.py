"""Megatron optimizer (Adam) and LR schedule from TrainingConfig.

Weight-decay groups: none on norms and biases (Megatron's standard rule: 1-D
parameters and *.bias); PEER tables use training.peer_weight_decay when set.
"""
import math

import torch
from megatron.core.optimizer import (OptimizerConfig, get_megatron_optimizer,
                                     get_standard_config_overrides)
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

_DECAY_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def build_optimizer(chunks, t, dtype, distributed=None):
    """chunks: DDP-wrapped model chunks; t: TrainingConfig."""
    cfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=(t.use_distributed_optimizer if distributed is None
                                   else distributed),
    )
    overrides = get_standard_config_overrides(cfg)
    if t.peer_weight_decay is not None and t.peer_weight_decay != t.weight_decay:
        overrides[ParamKey(attr="peer_table")] = ParamGroupOverride(
            wd_mult=t.peer_weight_decay / t.weight_decay)
    sync_free_grad_norm()
    foreach_scale_copy()
    opt = get_megatron_optimizer(cfg, chunks, config_overrides=overrides)
    opt.megapeer_fused_adam = bool(t.fused_adam)
    opt.megapeer_triton_adam = bool(t.triton_adam)
    use_fused_adam(opt)
    return opt


def sync_free_grad_norm() -> bool:
    """Without Transformer Engine or apex, Megatron's gradient norm uses its local helper
    (utils.local_multi_tensor_l2_norm), which reads every tensor's norm back to the host:
    one GPU synchronisation per parameter tensor per step. Use torch's foreach norm
    (torch.nn.utils.get_total_norm) instead: the same value, computed on the device;
    Megatron's one read-back of the total remains. Returns whether it was installed."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    if clip_grads.l2_norm_impl is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    return clip_grads.l2_norm_impl is foreach_l2_norm


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for Megatron's local_multi_tensor_l2_norm: (the l2 norm of all tensors as
    a float32 tensor of shape [1], None)."""
    tensors = [t for group in tensor_lists for t in group]
    return torch.nn.utils.get_total_norm(tensors, 2.0).float().reshape(1), None


def foreach_scale_copy() -> bool:
    """Without Transformer Engine or apex, Megatron copies the fp32 main parameters into
    the model parameters after each step with a loop of `copy_` (bf16: `overflow_buf` is
    None) or its local helper (utils.local_multi_tensor_scale: `dst.copy_(src * scale)`
    per tensor, two kernels and an fp32 temporary each), and scales clipped gradients with
    that helper. Use torch's foreach ops instead (a few launches for all tensors, the same
    values), and skip the copies that the Triton Adam made (training.triton_adam). Returns
    whether it was installed."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    for mod in (clip_grads, moptimizer):
        if mod.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
            mod.multi_tensor_scale_impl = foreach_scale
    if moptimizer.multi_tensor_scale_impl is foreach_scale:
        moptimizer._multi_tensor_copy_this_to_that = foreach_copy
    return all(mod.multi_tensor_scale_impl is foreach_scale for mod in (clip_grads, moptimizer))


# data_ptrs of the fp32 main parameters whose model copy ops/adam.py wrote this step
_COPIED = set()


def foreach_copy(this, that, overflow_buf=None):
    """Drop-in for Megatron's _multi_tensor_copy_this_to_that: that[i] = this[i], except
    where the Triton Adam already wrote that[i] this step."""
    pairs = [(a, b) for a, b in zip(this, that) if a.data_ptr() not in _COPIED]
    if pairs:
        torch._foreach_copy_([b for _, b in pairs], [a for a, _ in pairs])


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for Megatron's local_multi_tensor_scale: dst = src * scale, per pair."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _fusable(p) -> bool:
    return p.is_cuda


def _torch_adams(optimizer):
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def _steps_elsewhere(inner, group) -> bool:
    """Whether the group's step counts (read from its first parameter with state) are not
    fp32 on the parameters' device, as after loading a state saved by the multi-tensor form."""
    for p in group["params"]:
        st = inner.state.get(p)
        if st and "step" in st:
            step = st["step"]
            return (not torch.is_tensor(step) or step.device != p.device
                    or step.dtype != torch.float32)
    return False


def use_fused_adam(optimizer) -> bool:
    """training.fused_adam: when Megatron fell back to torch's Adam (no Transformer Engine
    or apex FusedAdam) and every parameter is on a GPU, run torch's fused kernel (one
    pass over parameters, grads and state) instead of its default multi-tensor form.
    Set again before every step, since a resumed optimizer state restores its groups'
    flags. Returns whether any group is fused."""
    on = getattr(optimizer, "megapeer_fused_adam", False)
    fused = False
    for inner in _torch_adams(optimizer):
        for g in inner.param_groups:
            gpu = bool(g["params"]) and all(_fusable(p) for p in g["params"])
            want = on and gpu
            if want and _steps_elsewhere(inner, g):
                for p in g["params"]:   # fused keeps its fp32 step counts on the device
                    st = inner.state.get(p)
                    if st and "step" in st:
                        st["step"] = st["step"].to(p.device, torch.float32)
            g["fused"], g["foreach"] = (True, False) if want else (None, None)
            fused |= bool(g["fused"])
    return fused


def build_scheduler(optimizer, t):
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_iters, lr_decay_steps=t.train_iters,
        lr_decay_style=_DECAY_STYLE[t.lr_schedule],
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, int(round(t.wsd_decay_fraction * t.train_iters))),
        lr_wsd_decay_style="cosine",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
    )


def optimizer_step(optimizer, clip_grad: float):
    """Step unless the gradients are not finite. Returns (stepped, grad_norm).

    Megatron's own step() applies the update before the caller sees the norm; this
    splits it so a NaN/Inf step can be skipped. The norm is computed over all
    model-parallel ranks, so every rank takes the same decision.
    """
    use_fused_adam(optimizer)
    found_inf = optimizer.prepare_grads()
    if found_inf:
        return False, float("nan")
    norm = optimizer.get_grad_norm()
    norm = float(norm) if norm is not None else 0.0
    if not math.isfinite(norm):
        return False, norm
    adams, gmul = [], 1.0
    coef = clip_grad / (norm + 1.0e-6)    # Megatron's clip coefficient
    if clip_grad > 0 and coef < 1.0:
        adams = _all_fused(optimizer)
        if adams:   # the fused kernel divides the gradients as it reads them;
            gmul = coef   # the Triton Adam multiplies them by gmul
            scale = torch.full((), (norm + 1.0e-6) / clip_grad, dtype=torch.float32,
                               device=adams[0].param_groups[0]["params"][0].device)
            for inner in adams:
                inner.grad_scale = scale
        else:
            for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
                params = sub.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=norm)
    done = []
    try:
        if getattr(optimizer, "megapeer_triton_adam", False):
            done = triton_adam(optimizer, gmul)
        return bool(optimizer.step_with_ready_grads()), norm
    finally:
        for inner in adams:
            inner.grad_scale = None
        for p, g in done:
            p.grad = g
        _COPIED.clear()


def triton_adam(optimizer, gmul=1.0):
    """training.triton_adam: step the large fp32 main parameters of Megatron's
    mixed-precision optimizers with ops/adam.py (AdamW that also writes the model
    parameter), before Megatron's step; their .grad is set to None meanwhile so that torch's
    Adam skips them, and their main -> model copies are skipped (foreach_copy). gmul: the
    clip factor when clipping rides on the fused kernel (else Megatron already scaled the
    gradients). State in torch's fused layout (fp32 step on the device), so either path
    can continue it. Returns [(main parameter, its gradient)] to restore after the step."""
    from megatron.core.optimizer import optimizer as moptimizer
    from ..ops import adam
    if moptimizer._multi_tensor_copy_this_to_that is not foreach_copy or not adam.available():
        return []
    done = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam) or not hasattr(sub, "fp32_from_float16_groups"):
            continue
        group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
        work = []
        for models, mains in zip(sub.float16_groups, sub.fp32_from_float16_groups):
            for model, main in zip(models, mains):
                g = group_of.get(id(main))
                if g is None or not _adamw_like(inner, g) or not adam.takes(main, model):
                    continue
                grad = main.grad
                if grad is None or grad.dtype != torch.float32 or not grad.is_contiguous():
                    continue
                st = inner.state[main]
                if not st:   # torch's initial state, in its fused layout
                    st["step"] = torch.zeros((), dtype=torch.float32, device=main.device)
                    st["exp_avg"] = torch.zeros_like(main, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(main, memory_format=torch.preserve_format)
                step = st.get("step")
                if (not torch.is_tensor(step) or step.device != main.device
                        or step.dtype != torch.float32 or "exp_avg" not in st):
                    continue   # a state in another layout: torch's Adam continues it
                work.append((g, main, model, st))
        if not work:
            continue
        torch._foreach_add_([st["step"] for *_, st in work], 1.0)
        for g, main, model, st in work:
            b1, b2 = g["betas"]
            adam.adamw_copy_(main.data, main.grad, st["exp_avg"], st["exp_avg_sq"], model.data,
                             st["step"], float(g["lr"]), b1, b2, g["eps"], g["weight_decay"],
                             gmul)
            _COPIED.add(main.data_ptr())
            done.append((main, main.grad))
            main.grad = None
    return done


def _adamw_like(inner, g) -> bool:
    """Whether the group's update is ops/adam.py's: decoupled weight decay (or none), no
    amsgrad, not maximising, not differentiable, plain float lr."""
    decoupled = g.get("decoupled_weight_decay", isinstance(inner, torch.optim.AdamW))
    return ((decoupled or g["weight_decay"] == 0) and not g.get("amsgrad")
            and not g.get("maximize") and not g.get("differentiable")
            and not torch.is_tensor(g["lr"]))


def _all_fused(optimizer):
    """The inner torch Adams when every sub-optimizer is one, with every group fused and
    parameters on one device: then clipping rides on the fused kernel's gradient scale
    (torch's AMP unscaling: grad / scale as it reads the gradient, the scaled gradient written
    back), one pass over the gradients fewer than Megatron's in-place multiply. Else []."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    adams = list(_torch_adams(optimizer))
    groups = [g for a in adams for g in a.param_groups if g["params"]]
    if len(adams) != len(subs) or not groups or not all(g.get("fused") for g in groups):
        return []
    devs = {p.device for g in groups for p in g["params"]}
    return adams if len(devs) == 1 else []


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
