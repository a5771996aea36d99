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
    return get_megatron_optimizer(cfg, chunks, config_overrides=overrides)


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
    found_inf = optimizer.prepare_grads()
    if found_inf:
        return False, float("nan")
    norm = optimizer.get_grad_norm()
    norm = float(norm) if norm is not None else 0.0
    if not math.isfinite(norm):
        return False, norm
    if clip_grad > 0:
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = sub.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=norm)
    return bool(optimizer.step_with_ready_grads()), norm


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
