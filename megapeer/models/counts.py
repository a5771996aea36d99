"""Parameter counts and model FLOPs per token, as functions of the config alone.

FLOPs count multiply-adds as 2; attention is causal (each position attends to
half the sequence on average); a training step costs 3x the forward FLOPs.
Used by MFU logging and the ablation tool. Checked against the built model in
tests/test_model.py.
"""
import math

from ..config.validate import layer_kinds


def _mla_params(m) -> int:
    a, d, H = m.mla, m.hidden_size, m.num_attention_heads
    qk = a.qk_head_dim + a.qk_pos_emb_head_dim
    if a.q_lora_rank:
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk
    else:
        q = d * H * qk
    kv = d * (a.kv_lora_rank + a.qk_pos_emb_head_dim) + a.kv_lora_rank \
        + a.kv_lora_rank * H * (a.qk_head_dim + a.v_head_dim)
    return q + kv + H * a.v_head_dim * d + d  # + output proj + input norm


def _peer_router_params(m) -> int:
    p, d = m.peer, m.hidden_size
    norm = {"layernorm": 2 * p.key_dim, "rmsnorm": p.key_dim,
            "batchnorm": 2 * p.heads * p.key_dim, "none": 0}[p.query_norm]
    keys = sum(p.num_experts) * (p.key_dim // len(p.num_experts))
    return d * p.heads * p.key_dim + norm + keys


def param_counts(model_cfg, vocab_size=None) -> dict:
    """{'total', 'active', 'embedding', 'peer_tables'} parameter counts."""
    m = model_cfg
    d, V = m.hidden_size, vocab_size or m.vocab_size
    emb = V * d * (2 if m.untie_embeddings_and_output_weights else 1)
    total = active = emb + d  # + final norm
    tables = 0
    for kind in layer_kinds(m):
        attn = _mla_params(m)
        total += attn
        active += attn
        if kind == "D":
            mlp = 3 * d * m.ffn_hidden_size + d
            total += mlp
            active += mlp
        else:
            p = m.peer
            router = _peer_router_params(m) + d
            t = 2 * math.prod(p.num_experts) * p.expert_hidden * d
            tables += t
            total += router + t
            active += router + 2 * p.heads * p.topk * p.expert_hidden * d
    return {"total": total, "active": active, "embedding": emb, "peer_tables": tables}


def flops_per_token(model_cfg, seq_length=None, vocab_size=None, training=True) -> float:
    """Model FLOPs per token (forward, or forward+backward when training)."""
    m = model_cfg
    a, d, H = m.mla, m.hidden_size, m.num_attention_heads
    S = m.seq_length if seq_length is None else seq_length
    V = vocab_size or m.vocab_size
    qk = a.qk_head_dim + a.qk_pos_emb_head_dim
    attn_linear = _mla_params(m) - d - (a.kv_lora_rank + (a.q_lora_rank or 0))  # no norms
    attn_core = 2 * H * (qk + a.v_head_dim) * (S / 2)
    f = 0.0
    for kind in layer_kinds(m):
        f += 2 * attn_linear + attn_core
        if kind == "D":
            f += 2 * 3 * d * m.ffn_hidden_size
        else:
            p = m.peer
            f += 2 * d * p.heads * p.key_dim                      # query network
            f += 2 * p.heads * sum(p.num_experts) * (p.key_dim // len(p.num_experts))  # sub-keys
            f += 2 * 2 * p.heads * p.topk * p.expert_hidden * d   # u.x and w*v
    f += 2 * d * V  # output layer
    return 3 * f if training else f


def padded_vocab_size(model_cfg, tp: int) -> int:
    """The embedding rows: vocab_size padded to a multiple of 128 * tensor-parallel size."""
    mult = 128 * tp
    return ((model_cfg.vocab_size + mult - 1) // mult) * mult
