"""megapeer ModelConfig <-> Hugging Face config (our `megapeer` type or native `deepseek_v3`)."""
import math

from ..config.validate import layer_kinds
from .checkpoint_io import ConversionError

AUTO_MAP = {"AutoConfig": "configuration_megapeer.MegapeerConfig",
            "AutoModelForCausalLM": "modeling_megapeer.MegapeerForCausalLM"}

# (megapeer ModelConfig field, HF megapeer config field); mla.* and peer.* are sub-sections
_FIELDS = [
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"), ("norm_epsilon", "rms_norm_eps"),
    ("init_method_std", "initializer_range"), ("seq_length", "max_position_embeddings"),
    ("mla.q_lora_rank", "q_lora_rank"), ("mla.kv_lora_rank", "kv_lora_rank"),
    ("mla.qk_head_dim", "qk_nope_head_dim"), ("mla.qk_pos_emb_head_dim", "qk_rope_head_dim"),
    ("mla.v_head_dim", "v_head_dim"), ("mla.rope_type", "rope_type"),
    ("mla.rotary_base", "rope_base"), ("mla.rotary_scaling_factor", "rope_factor"),
    ("mla.original_max_position_embeddings", "original_max_position_embeddings"),
    ("mla.beta_fast", "beta_fast"), ("mla.beta_slow", "beta_slow"), ("mla.mscale", "mscale"),
    ("mla.mscale_all_dim", "mscale_all_dim"),
    ("peer.num_experts", "peer_num_experts"), ("peer.heads", "peer_heads"),
    ("peer.topk", "peer_topk"), ("peer.subkey_topk", "peer_subkey_topk"),
    ("peer.key_dim", "peer_key_dim"), ("peer.query_norm", "peer_query_norm"),
    ("peer.score_fn", "peer_score_fn"), ("peer.activation", "peer_activation"),
    ("peer.expert_hidden", "peer_expert_hidden"),
]


def _get(m, dotted):
    for part in dotted.split("."):
        m = getattr(m, part)
    return m


def _set(m, dotted, value):
    *path, last = dotted.split(".")
    for part in path:
        m = getattr(m, part)
    setattr(m, last, value)


def megapeer_fields(model_cfg, special_ids) -> dict:
    """Keyword arguments of MegapeerConfig for this model."""
    m = model_cfg
    kw = {hf: _get(m, ours) for ours, hf in _FIELDS}
    kw["layer_pattern"] = "".join(layer_kinds(m))
    kw["tie_word_embeddings"] = not m.untie_embeddings_and_output_weights
    kw.update(special_ids)
    return kw


def yarn_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def native_blocker(model_cfg):
    """Why this model cannot be a transformers DeepseekV3ForCausalLM (None when it can)."""
    m, a = model_cfg, model_cfg.mla
    peer_layers = [i for i, k in enumerate(layer_kinds(m)) if k == "P"]
    if peer_layers:
        return f"layers {peer_layers} are PEER layers"
    if a.rope_type == "rope" and yarn_mscale(a.rotary_scaling_factor, a.mscale_all_dim) != 1.0:
        return ("rope_type 'rope' with rotary_scaling_factor > 1 and mscale_all_dim != 0 scales "
                "the softmax, which transformers' default RoPE does not")
    if a.rope_type == "yarn" and (not a.beta_fast or not a.beta_slow):
        return "yarn with beta_fast or beta_slow = 0"
    return None


def deepseek_fields(model_cfg, special_ids) -> dict:
    """Keyword arguments of transformers' DeepseekV3Config for a model without PEER layers."""
    why = native_blocker(model_cfg)
    if why:
        raise ConversionError(f"cannot export as native DeepSeek-V3: {why}")
    m, a = model_cfg, model_cfg.mla
    if a.rope_type == "rope":
        rope = {"rope_type": "default", "rope_theta": a.rotary_base}
    else:
        f = a.rotary_scaling_factor
        rope = {"rope_type": "yarn", "rope_theta": a.rotary_base, "factor": f,
                "original_max_position_embeddings": a.original_max_position_embeddings,
                "beta_fast": a.beta_fast, "beta_slow": a.beta_slow, "mscale": a.mscale,
                "mscale_all_dim": a.mscale_all_dim, "truncate": True,
                "attention_factor": yarn_mscale(f, a.mscale) / yarn_mscale(f, a.mscale_all_dim)}
    kw = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        moe_intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        n_shared_experts=1, n_routed_experts=1, n_group=1, topk_group=1, num_experts_per_tok=1,
        first_k_dense_replace=m.num_layers, kv_lora_rank=a.kv_lora_rank,
        q_lora_rank=a.q_lora_rank, qk_rope_head_dim=a.qk_pos_emb_head_dim,
        v_head_dim=a.v_head_dim, qk_nope_head_dim=a.qk_head_dim, hidden_act="silu",
        max_position_embeddings=m.seq_length, initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon, tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        rope_parameters=rope, rope_interleave=True, attention_bias=False, attention_dropout=0.0,
        num_mtp_layers=0,
    )
    kw.update(special_ids)
    return kw


def model_config_from_hf(hf: dict, base_model_cfg, where: str):
    """Fill `base_model_cfg` (a ModelConfig) from a config.json dict; returns it."""
    m = base_model_cfg
    base_kinds = layer_kinds(m)
    kind = hf.get("model_type")
    try:
        if kind == "megapeer":
            for ours, theirs in _FIELDS:
                _set(m, ours, hf[theirs])
            pattern = hf["layer_pattern"]
            m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
        elif kind == "deepseek_v3":
            pattern = _deepseek_into(hf, m, where)
        else:
            raise ConversionError(f"{where}: model_type {kind!r} is not one megapeer exports "
                                  "('megapeer' or 'deepseek_v3')")
    except KeyError as e:
        raise ConversionError(f"{where}: missing field {e.args[0]!r}") from None
    if len(pattern) != m.num_layers or set(pattern) - {"D", "P"}:
        raise ConversionError(f"{where}: layer_pattern {pattern!r} does not give one D/P "
                              f"letter for each of {m.num_layers} layers")
    if base_kinds != list(pattern):     # keep a shorter repeating pattern that expands equally
        m.layer_pattern = pattern
    m.peer.num_experts = list(m.peer.num_experts)
    return m


def _deepseek_into(hf, m, where):
    n = hf["num_hidden_layers"]
    if hf.get("first_k_dense_replace", 0) < n:
        raise ConversionError(f"{where}: DeepSeek-V3 MoE layers (first_k_dense_replace="
                              f"{hf.get('first_k_dense_replace')} < {n} layers) have no "
                              "megapeer equivalent")
    heads = hf["num_attention_heads"]
    if not hf.get("rope_interleave", True) or hf.get("attention_bias", False) \
            or hf.get("hidden_act", "silu") != "silu" \
            or hf.get("num_key_value_heads", heads) != heads:
        raise ConversionError(f"{where}: only rope_interleave=true, attention_bias=false, "
                              "hidden_act=silu and num_key_value_heads = num_attention_heads "
                              "match megapeer's MLA")
    m.vocab_size, m.hidden_size = hf["vocab_size"], hf["hidden_size"]
    m.ffn_hidden_size, m.num_layers = hf["intermediate_size"], n
    m.num_attention_heads, m.norm_epsilon = hf["num_attention_heads"], hf["rms_norm_eps"]
    m.init_method_std = hf.get("initializer_range", m.init_method_std)
    m.seq_length = hf.get("max_position_embeddings", m.seq_length)
    m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
    a = m.mla
    a.q_lora_rank, a.kv_lora_rank = hf["q_lora_rank"], hf["kv_lora_rank"]
    a.qk_head_dim, a.qk_pos_emb_head_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    a.v_head_dim = hf["v_head_dim"]
    rope = hf.get("rope_parameters") or {"rope_type": "default",
                                         "rope_theta": hf.get("rope_theta", 10000.0)}
    a.rotary_base = float(rope["rope_theta"])
    if rope.get("rope_type", "default") == "default":
        a.rope_type = "rope"
    elif rope["rope_type"] == "yarn":
        a.rope_type, a.rotary_scaling_factor = "yarn", float(rope["factor"])
        a.original_max_position_embeddings = rope["original_max_position_embeddings"]
        a.beta_fast, a.beta_slow = float(rope["beta_fast"]), float(rope["beta_slow"])
        a.mscale, a.mscale_all_dim = float(rope["mscale"]), float(rope["mscale_all_dim"])
        f = a.rotary_scaling_factor
        ours = yarn_mscale(f, a.mscale) / yarn_mscale(f, a.mscale_all_dim)
        if abs(rope.get("attention_factor", ours) - ours) > 1e-9:
            raise ConversionError(f"{where}: yarn attention_factor {rope['attention_factor']} "
                                  f"differs from Megatron's mscale ratio {ours}")
    else:
        raise ConversionError(f"{where}: rope_type {rope['rope_type']!r} has no megapeer "
                              "equivalent (default or yarn)")
    return "D" * n
