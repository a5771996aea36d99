"""Checks on combinations of values. Runs before any process group exists."""
import math

from .loader import ConfigError
from .schema import Config


def _fail(source: str, key: str, msg: str):
    raise ConfigError(f"{source}: '{key}' {msg}")


def layer_kinds(model) -> list:
    """Expand model.layer_pattern to one letter per layer ('D' or 'P')."""
    pat = model.layer_pattern
    return [pat[i % len(pat)] for i in range(model.num_layers)]


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def validate_config(cfg: Config, world_size: int, source: str = "<config>") -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    for key, val in (("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline),
                     ("parallel.expert", p.expert)):
        if val < 1:
            _fail(source, key, f"must be >= 1, got {val}")
    if world_size % (p.tensor * p.pipeline):
        _fail(source, "parallel.tensor", f"* parallel.pipeline = {p.tensor * p.pipeline} "
              f"does not divide the world size {world_size}")
    dp = world_size // (p.tensor * p.pipeline)
    if dp % p.expert:
        _fail(source, "parallel.expert", f"= {p.expert} does not divide the data-parallel "
              f"size {dp} (world {world_size} / tensor {p.tensor} / pipeline {p.pipeline})")
    if t.fused_cross_entropy and (t.precision == "fp32" or
                                  (t.precision == "auto" and not _cuda_available())):
        _fail(source, "training.fused_cross_entropy", "needs bf16 (training.precision=bf16, or "
              "auto on a GPU): Megatron's fused cross-entropy returns bf16 logit gradients")
    if p.sequence_parallel:
        if p.tensor < 2:
            _fail(source, "parallel.sequence_parallel", "needs parallel.tensor >= 2")
        if m.seq_length % p.tensor:
            _fail(source, "parallel.sequence_parallel", f"needs model.seq_length = "
                  f"{m.seq_length} divisible by parallel.tensor = {p.tensor}")
        if m.peer.query_norm == "batchnorm":
            _fail(source, "parallel.sequence_parallel", "does not work with "
                  "model.peer.query_norm=batchnorm (its statistics would cover one chunk)")
    if m.num_layers % p.pipeline:
        _fail(source, "model.num_layers", f"= {m.num_layers} is not divisible by "
              f"parallel.pipeline = {p.pipeline}")
    if p.virtual_pipeline is not None:
        if p.pipeline < 2:
            _fail(source, "parallel.virtual_pipeline", "needs parallel.pipeline >= 2")
        if m.num_layers % (p.pipeline * p.virtual_pipeline):
            _fail(source, "parallel.virtual_pipeline", f"* pipeline = "
                  f"{p.pipeline * p.virtual_pipeline} does not divide model.num_layers "
                  f"= {m.num_layers}")
    for key in ("num_attention_heads", "hidden_size", "ffn_hidden_size"):
        val = getattr(m, key)
        if val < 1 or val % p.tensor:
            _fail(source, f"model.{key}", f"= {val} must be positive and divisible by "
                  f"parallel.tensor = {p.tensor}")
    if m.num_layers < 1 or m.seq_length < 1 or m.vocab_size < 1:
        _fail(source, "model", "num_layers, seq_length and vocab_size must be positive")
    bad = set(m.layer_pattern) - {"D", "P"}
    if not m.layer_pattern or bad:
        _fail(source, "model.layer_pattern", f"= {m.layer_pattern!r}: use letters D (dense) "
              "and P (PEER)")

    a = m.mla
    for key in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        if getattr(a, key) < 1:
            _fail(source, f"model.mla.{key}", f"must be positive, got {getattr(a, key)}")
    if a.qk_pos_emb_head_dim % 2:
        _fail(source, "model.mla.qk_pos_emb_head_dim", f"= {a.qk_pos_emb_head_dim} must be "
              "even (rotary pairs)")
    if a.q_lora_rank is not None and a.q_lora_rank < 1:
        _fail(source, "model.mla.q_lora_rank", "must be positive or null")
    if a.rope_type == "yarn" and a.rotary_scaling_factor < 1:
        _fail(source, "model.mla.rotary_scaling_factor", "must be >= 1 for yarn")

    pe = m.peer
    if "P" in m.layer_pattern:
        sizes = pe.num_experts
        if len(sizes) < 2 or min(sizes) < 1:
            _fail(source, "model.peer.num_experts", f"= {sizes}: need two or more positive "
                  "product-key sizes")
        if pe.key_dim % len(sizes):
            _fail(source, "model.peer.key_dim", f"= {pe.key_dim} is not divisible by the "
                  f"number of product-key dimensions {len(sizes)}")
        ck = pe.subkey_topk or pe.topk
        if ck < 1 or ck > min(sizes):
            _fail(source, "model.peer.subkey_topk" if pe.subkey_topk else "model.peer.topk", f"= {ck} must be in [1, {min(sizes)}] "
                  f"(smallest sub-key set of {sizes})")
        candidates = ck ** len(sizes)
        if pe.topk < 1 or pe.topk > candidates:
            _fail(source, "model.peer.topk", f"= {pe.topk} is larger than the candidate set "
                  f"({ck}^{len(sizes)} = {candidates})")
        if pe.topk_kernel == "triton" and len(sizes) != 2:
            _fail(source, "model.peer.topk_kernel", f"= triton needs two sub-key sets; "
                  f"model.peer.num_experts = {sizes} has {len(sizes)} (use auto or torch)")
        n = math.prod(sizes)
        if n % p.expert:
            _fail(source, "model.peer.num_experts", f"total {n} is not divisible by "
                  f"parallel.expert = {p.expert}")
        if pe.heads < 1 or pe.expert_hidden < 1:
            _fail(source, "model.peer", "heads and expert_hidden must be positive")
        if pe.defer_table_grads < 1:
            _fail(source, "model.peer.defer_table_grads", f"= {pe.defer_table_grads}: must be "
                  ">= 1 (micro-batches per table gradient; 1 = every micro-batch)")
        if pe.defer_table_grads > 1 and t.compile and t.compile_mode == "reduce-overhead":
            # a CUDA-graph replay would skip the host-side bookkeeping (ops/table_grads.py)
            _fail(source, "model.peer.defer_table_grads", f"= {pe.defer_table_grads} does not "
                  "work with training.compile_mode=reduce-overhead (CUDA graphs replay the "
                  "backward without the deferral's host-side step); use 1 or another mode")
        d_local = m.hidden_size // p.tensor
        if pe.kernel == "gmm" and (pe.expert_hidden % 8 or d_local % 8):
            _fail(source, "model.peer.expert_hidden", f"= {pe.expert_hidden} and the table width "
                  f"{d_local} (hidden_size / parallel.tensor) must be multiples of 8 for "
                  "model.peer.kernel=gmm (16-byte rows for torch._grouped_mm)")
        if pe.query_norm == "batchnorm" and p.expert > 1:
            pass  # allowed; statistics are per rank (documented)
    elif p.expert > 1:
        _fail(source, "parallel.expert", "> 1 needs at least one PEER layer ('P' in "
              "model.layer_pattern)")

    dp_mb = t.micro_batch_size * dp
    if t.micro_batch_size < 1 or t.global_batch_size % dp_mb:
        _fail(source, "training.global_batch_size", f"= {t.global_batch_size} is not a "
              f"multiple of micro_batch_size * data_parallel = {dp_mb}")
    if t.train_iters < 1 or t.warmup_iters < 0 or t.warmup_iters > t.train_iters:
        _fail(source, "training.warmup_iters", f"= {t.warmup_iters} must be in "
              f"[0, train_iters={t.train_iters}]")
    if t.min_lr > t.lr:
        _fail(source, "training.min_lr", f"= {t.min_lr} is above training.lr = {t.lr}")
    if t.peer_weight_decay not in (None, t.weight_decay) and t.weight_decay == 0:
        _fail(source, "training.peer_weight_decay", "needs training.weight_decay > 0 (it is "
              "applied as a multiple of it)")
    if not 0.0 <= t.wsd_decay_fraction <= 1.0:
        _fail(source, "training.wsd_decay_fraction", "must be in [0, 1]")
    if p.virtual_pipeline is not None:
        nmb = t.global_batch_size // dp_mb
        if nmb % p.pipeline:
            _fail(source, "training.global_batch_size", f"gives {nmb} micro-batches, not a "
                  f"multiple of parallel.pipeline = {p.pipeline} (interleaved schedule)")

    parts = cfg.data.split.split(",")
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        vals = []
    if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0:
        _fail(source, "data.split", f"= {cfg.data.split!r}: expected three weights like "
              "'98,1,1'")
    if cfg.logging.log_interval < 1:
        _fail(source, "logging.log_interval", "must be >= 1")
    ps_ = cfg.logging.profile_steps
    if ps_ is not None and (len(ps_) != 2 or not 1 <= ps_[0] <= ps_[1] <= t.train_iters):
        _fail(source, "logging.profile_steps", f"must be [first, last] with 1 <= first <= "
              f"last <= training.train_iters ({t.train_iters}); got {ps_}")
    if t.exit_interval < 0:
        _fail(source, "training.exit_interval", f"must be >= 0, got {t.exit_interval}")
    if cfg.checkpoint.keep_last < 1:
        _fail(source, "checkpoint.keep_last", "must be >= 1")
