"""Tensor names and shapes: megapeer (Megatron-Core) checkpoint keys <-> Hugging Face names.

The Hugging Face names follow transformers' DeepSeek-V3 for everything the two share
(MLA, norms, dense SwiGLU MLP), so a model without PEER layers maps one to one onto
DeepseekV3ForCausalLM. PEER layers keep megapeer's own names under `mlp.`.

Megatron-Core's fused dense fc1 weight [2 * ffn, d] holds [gate; up]; it is split into
gate_proj and up_proj. Embedding and output rows beyond model.vocab_size (Megatron's
vocab padding) are dropped on export and zero-filled on import.
"""
import math

import torch

from ..config.validate import layer_kinds

# Transformer Engine checkpoints fuse the q/kv latent norms and the pre-MLP norm into
# the following linear layer; these names are read as the local-spec names.
TE_ALIASES = {
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_ATTN = [  # (megatron suffix under decoder.layers.N., hf suffix under model.layers.N.)
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
    ("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
]
_Q_LORA = [
    ("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
    ("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
    ("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
]
_Q_DIRECT = [("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight")]
_PEER_NORM = {"layernorm": ["weight", "bias"], "rmsnorm": ["weight"],
              "batchnorm": ["weight", "bias", "running_mean", "running_var",
                            "num_batches_tracked"], "none": []}


def normalize_te_key(key: str) -> str:
    for te, local in TE_ALIASES.items():
        if key.endswith(te):
            return key[: -len(te)] + local
    return key


def hf_shapes(model_cfg) -> dict:
    """Every Hugging Face tensor name of this model -> shape (vocab rows = model.vocab_size)."""
    m, a, pe = model_cfg, model_cfg.mla, model_cfg.peer
    d, n = m.hidden_size, m.num_attention_heads
    qdim = n * (a.qk_head_dim + a.qk_pos_emb_head_dim)
    shapes = {"model.embed_tokens.weight": (m.vocab_size, d), "model.norm.weight": (d,)}
    if m.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (m.vocab_size, d)
    for i, kind in enumerate(layer_kinds(m)):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.kv_a_proj_with_mqa.weight": (a.kv_lora_rank + a.qk_pos_emb_head_dim, d),
            p + "self_attn.kv_a_layernorm.weight": (a.kv_lora_rank,),
            p + "self_attn.kv_b_proj.weight": (n * (a.qk_head_dim + a.v_head_dim), a.kv_lora_rank),
            p + "self_attn.o_proj.weight": (d, n * a.v_head_dim),
            p + "post_attention_layernorm.weight": (d,),
        })
        if a.q_lora_rank is None:
            shapes[p + "self_attn.q_proj.weight"] = (qdim, d)
        else:
            shapes.update({p + "self_attn.q_a_proj.weight": (a.q_lora_rank, d),
                           p + "self_attn.q_a_layernorm.weight": (a.q_lora_rank,),
                           p + "self_attn.q_b_proj.weight": (qdim, a.q_lora_rank)})
        if kind == "D":
            f = m.ffn_hidden_size
            shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                           p + "mlp.down_proj.weight": (d, f)})
            continue
        rows = math.prod(pe.num_experts) * pe.expert_hidden
        sub = pe.key_dim // len(pe.num_experts)
        shapes[p + "mlp.query.weight"] = (pe.heads * pe.key_dim, d)
        norm_dim = pe.heads * pe.key_dim if pe.query_norm == "batchnorm" else pe.key_dim
        for name in _PEER_NORM[pe.query_norm]:
            shapes[p + f"mlp.query_norm.{name}"] = () if name == "num_batches_tracked" \
                else (norm_dim,)
        for j, size in enumerate(pe.num_experts):
            shapes[p + f"mlp.keys.{j}"] = (size, sub)
        shapes[p + "mlp.U"] = (rows, d)
        shapes[p + "mlp.V"] = (rows, d)
    return shapes


def _layer_pairs(model_cfg, i, kind):
    """(megatron key, hf name) for layer i, except the dense fc1 (split in two)."""
    mp, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
    pairs = _ATTN + (_Q_DIRECT if model_cfg.mla.q_lora_rank is None else _Q_LORA)
    out = [(mp + a, hp + b) for a, b in pairs]
    if kind == "D":
        out.append((mp + "mlp.linear_fc2.weight", hp + "mlp.down_proj.weight"))
        return out
    pe = model_cfg.peer
    out.append((mp + "mlp.query", hp + "mlp.query.weight"))
    out += [(mp + f"mlp.query_norm.{n}", hp + f"mlp.query_norm.{n}")
            for n in _PEER_NORM[pe.query_norm]]
    out += [(mp + f"mlp.keys.{j}", hp + f"mlp.keys.{j}") for j in range(len(pe.num_experts))]
    out += [(mp + "mlp.U", hp + "mlp.U"), (mp + "mlp.V", hp + "mlp.V")]
    return out


def to_hf(model_cfg, tensors: dict) -> dict:
    """Megatron-key tensors (full, unsharded) -> Hugging Face-name tensors."""
    m, V = model_cfg, model_cfg.vocab_size
    out = {"model.embed_tokens.weight": tensors["embedding.word_embeddings.weight"][:V],
           "model.norm.weight": tensors["decoder.final_layernorm.weight"]}
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = tensors["output_layer.weight"][:V]
    for i, kind in enumerate(layer_kinds(m)):
        for mk, hk in _layer_pairs(m, i, kind):
            out[hk] = tensors[mk]
        if kind == "D":
            gate, up = tensors[f"decoder.layers.{i}.mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate
            out[f"model.layers.{i}.mlp.up_proj.weight"] = up
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(model_cfg, tensors: dict, padded_vocab: int) -> dict:
    """Hugging Face-name tensors -> Megatron-key tensors (vocab rows zero-padded)."""
    m = model_cfg

    def pad(t):
        full = torch.zeros((padded_vocab,) + tuple(t.shape[1:]), dtype=t.dtype)
        full[: t.shape[0]] = t
        return full

    out = {"embedding.word_embeddings.weight": pad(tensors["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": tensors["model.norm.weight"]}
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = pad(tensors["lm_head.weight"])
    for i, kind in enumerate(layer_kinds(m)):
        for mk, hk in _layer_pairs(m, i, kind):
            out[mk] = tensors[hk]
        if kind == "D":
            p = f"model.layers.{i}.mlp."
            out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
                [tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"]], dim=0)
    return out


def megatron_shapes(model_cfg) -> dict:
    """Checkpoint key -> expected shape; vocab-sized dims (padded in checkpoints) are None."""
    m = model_cfg
    hs = hf_shapes(m)
    out = {"embedding.word_embeddings.weight": (None, m.hidden_size),
           "decoder.final_layernorm.weight": hs["model.norm.weight"]}
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = (None, m.hidden_size)
    for i, kind in enumerate(layer_kinds(m)):
        for mk, hk in _layer_pairs(m, i, kind):
            out[mk] = hs[hk]
        if kind == "D":
            out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = (2 * m.ffn_hidden_size,
                                                                m.hidden_size)
    return out


def shape_matches(expected, got, vocab_size) -> bool:
    if len(expected) != len(got):
        return False
    return all((g >= vocab_size) if e is None else (e == g) for e, g in zip(expected, got))
