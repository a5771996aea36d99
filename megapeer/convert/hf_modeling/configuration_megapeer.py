"""Hugging Face configuration of a megapeer model (MLA attention, dense SwiGLU or PEER MLPs).

Shipped next to modeling_megapeer.py in every exported folder (`auto_map` in config.json).
Field names follow transformers' DeepSeek-V3 config where the meaning is the same.
"""
from transformers import PretrainedConfig


class MegapeerConfig(PretrainedConfig):
    model_type = "megapeer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        layer_pattern="DPDP",          # one letter per layer: D dense SwiGLU, P PEER
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope_type="rope",              # "rope" or "yarn" (Megatron-Core's MLA variants)
        rope_base=10000.0,
        rope_factor=1.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=0.0,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        peer_num_experts=(32, 32),
        peer_heads=4,
        peer_topk=8,
        peer_subkey_topk=None,
        peer_key_dim=64,
        peer_query_norm="layernorm",   # layernorm | rmsnorm | batchnorm | none
        peer_score_fn="softmax",       # softmax | sigmoid
        peer_activation="gelu",        # gelu | relu | silu
        peer_expert_hidden=1,
        peer_batchnorm_eps=1e-5,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        if len(layer_pattern) != num_hidden_layers or set(layer_pattern) - {"D", "P"}:
            raise ValueError(f"layer_pattern {layer_pattern!r} must have one letter (D or P) per "
                             f"layer ({num_hidden_layers} layers)")
        self.layer_pattern = layer_pattern
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        if rope_type not in ("rope", "yarn"):
            raise ValueError(f"rope_type must be 'rope' or 'yarn', got {rope_type!r}")
        self.rope_type = rope_type
        self.rope_base = rope_base
        self.rope_factor = rope_factor
        self.original_max_position_embeddings = original_max_position_embeddings
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.peer_num_experts = list(peer_num_experts)
        self.peer_heads = peer_heads
        self.peer_topk = peer_topk
        self.peer_subkey_topk = peer_subkey_topk
        self.peer_key_dim = peer_key_dim
        self.peer_query_norm = peer_query_norm
        self.peer_score_fn = peer_score_fn
        self.peer_activation = peer_activation
        self.peer_expert_hidden = peer_expert_hidden
        self.peer_batchnorm_eps = peer_batchnorm_eps
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
