"""megapeer causal LM in plain PyTorch for transformers: MLA attention, dense SwiGLU or PEER MLPs.

Reproduces megapeer's Megatron-Core forward (fp32 logits equal to ~1e-6):
- RMSNorm: torch's rms_norm (the kernel Megatron's local spec uses), eps = rms_norm_eps.
- MLA (DeepSeek-V2/V3): q = q_b(rmsnorm(q_a(x))) (or q_proj(x)); [latent | k_rope] = kv_a(x);
  latent = rmsnorm(latent); [k_nope | v] = kv_b(latent) per head; the rotary key is shared by
  all heads. RoPE as Megatron's MLA applies it: the rotary channels are read as interleaved
  pairs (x0,x1),(x2,x3).. (de-interleaved to [even | odd]) and rotated with rotate-half;
  YaRN frequencies and cos/sin scale as Megatron's YarnRotaryEmbedding; softmax scale
  mscale(factor, mscale_all_dim)^2 / sqrt(qk_nope + qk_rope).
- Dense MLP: down(silu(gate(x)) * up(x)); gate/up are the two halves of Megatron's fc1.
- PEER (He 2024): per-head query, product-key top-k retrieval, softmax/sigmoid gates in fp32,
  experts act(U[e] . x) V[e] (rows e*m + j for m-wide experts).
- KV cache: per layer only the normalised latent [b, 1, t, kv_lora_rank] and the rotated
  shared key [b, 1, t, qk_rope_head_dim] are cached (transformers' DynamicCache keys/values).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megapeer import MegapeerConfig

try:  # transformers >= 5: initialisers that respect already-loaded weights
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
_OUT_FIELDS = CausalLMOutputWithPast.__dataclass_fields__
_CACHE_FIELD = "cache" if "cache" in _OUT_FIELDS else "past_key_values"


def _up(t):
    """t in at least fp32: retrieval ranks score sums there (as training does)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ------------------------------------------------------------------------------ RoPE
def yarn_mscale(scale: float, mscale: float) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg, device=None):
    """(inv_freq [qk_rope_head_dim / 2] fp32, cos/sin scale) as Megatron-Core computes them."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_base
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    if cfg.rope_type == "rope":
        return 1.0 / (base ** exponent), 1.0
    factor = cfg.rope_factor
    extra = 1.0 / (base ** exponent)
    inter = 1.0 / (factor * base ** exponent)

    def correction_dim(rotations):
        return (dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low))
    keep = 1.0 - ramp.clamp(0, 1)
    inv_freq = inter * (1 - keep) + extra * keep
    scale = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
    return inv_freq, float(scale)


def rope_cos_sin(inv_freq, scale, positions):
    """positions [b, s] -> cos, sin [b, 1, s, dim] (fp32)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return torch.cos(emb) * scale, torch.sin(emb) * scale


def apply_rope(t, cos, sin):
    """t [b, h, s, dim] with interleaved rotary pairs -> rotated, laid out [even | odd]."""
    t = torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)
    x1, x2 = t.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return t * cos.to(t.dtype) + rotated * sin.to(t.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ------------------------------------------------------------------------------- MLA
class MLAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        d, qdim = cfg.hidden_size, cfg.num_attention_heads * (self.nope + self.rope)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, qdim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qdim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.heads * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.vdim, d, bias=False)
        factor = cfg.rope_factor
        self.softmax_scale = yarn_mscale(factor, cfg.mscale_all_dim) ** 2 / math.sqrt(
            self.nope + self.rope)

    def forward(self, x, cos, sin, mask, cache):
        b, s, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)           # [b, 1, s, r]
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)          # [b, 1, s, rope]
        q_rope = apply_rope(q_rope, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)
        t = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(b, t, self.heads, self.nope + self.vdim)
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.vdim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        causal = mask is None and s > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.vdim))


# ------------------------------------------------------------------------------- MLPs
class DenseMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PEER(nn.Module):
    """Product-key retrieval over single-neuron (or m-wide) experts."""

    max_gather = 1 << 26            # elements of gathered expert rows per chunk of tokens

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.topk = cfg.peer_heads, cfg.peer_topk
        self.sizes = list(cfg.peer_num_experts)
        self.m = cfg.peer_expert_hidden
        self.sub_dim = cfg.peer_key_dim // len(self.sizes)
        self.subkey_topk = cfg.peer_subkey_topk or cfg.peer_topk
        self.score_fn = cfg.peer_score_fn
        self.act = _ACTS[cfg.peer_activation]
        n = math.prod(self.sizes)
        kd = cfg.peer_key_dim
        self.query = nn.Linear(d, self.heads * kd, bias=False)
        norm = cfg.peer_query_norm
        if norm == "layernorm":
            self.query_norm = nn.LayerNorm(kd, eps=cfg.rms_norm_eps)
        elif norm == "rmsnorm":
            self.query_norm = nn.RMSNorm(kd, eps=cfg.rms_norm_eps)
        elif norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(self.heads * kd, eps=cfg.peer_batchnorm_eps)
        elif norm == "none":
            self.query_norm = None
        else:
            raise ValueError(f"peer_query_norm {norm!r} is not one of layernorm, rmsnorm, "
                             "batchnorm, none")
        self.keys = nn.ParameterList([nn.Parameter(torch.empty(k, self.sub_dim))
                                      for k in self.sizes])
        self.U = nn.Parameter(torch.empty(n * self.m, d))
        self.V = nn.Parameter(torch.empty(n * self.m, d))

    def retrieve(self, x):
        """x [T, d] -> expert ids [T, h, k] and gates [T, h, k]."""
        T = x.shape[0]
        q = F.linear(x, self.query.weight)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q)
        q = q.view(T, self.heads, -1)
        if self.query_norm is not None and not isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q)
        ck, last = self.subkey_topk, len(self.sizes) - 1
        cand_s = cand_i = None
        for i, (qi, ki) in enumerate(zip(q.split(self.sub_dim, dim=-1), self.keys)):
            vals, ids = torch.einsum("thc,nc->thn", qi, ki.to(qi.dtype)).topk(ck, dim=-1)
            if cand_s is None:
                cand_s, cand_i = vals, ids
                continue
            comb_s = (_up(cand_s).unsqueeze(-1) + _up(vals).unsqueeze(-2)).flatten(-2)
            comb_i = (cand_i.unsqueeze(-1) * self.sizes[i] + ids.unsqueeze(-2)).flatten(-2)
            keep = self.topk if i == last else min(comb_s.shape[-1], max(ck, self.topk))
            cand_s, pos = comb_s.topk(keep, dim=-1)
            cand_i = comb_i.gather(-1, pos)
        s32 = _up(cand_s)
        gates = torch.softmax(s32, dim=-1) if self.score_fn == "softmax" else torch.sigmoid(s32)
        return cand_i, gates.to(x.dtype)

    def experts(self, x, idx, gates):
        rows = idx.unsqueeze(-1)
        if self.m > 1:
            rows = rows * self.m + torch.arange(self.m, device=idx.device)
        s = torch.einsum("thkmd,td->thkm", self.U[rows], x)
        w = self.act(s) * gates.unsqueeze(-1)
        return torch.einsum("thkmd,thkm->td", self.V[rows], w)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, gates = self.retrieve(x)
        step = max(1, self.max_gather // (self.heads * self.topk * self.m * shape[-1]))
        out = torch.cat([self.experts(x[i:i + step], idx[i:i + step], gates[i:i + step])
                         for i in range(0, x.shape[0], step)])
        return out.view(shape)


# ----------------------------------------------------------------------------- blocks
class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = PEER(cfg) if cfg.layer_pattern[layer_idx] == "P" else DenseMLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MegapeerPreTrainedModel(PreTrainedModel):
    config_class = MegapeerConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    # No _keep_in_fp32_modules: megapeer trains bf16 under Megatron's Float16Module, which
    # keeps every parameter (norms included) in bf16, so the weights load as saved.
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, PEER):
            for k in module.keys:
                _init.normal_(k, mean=0.0, std=1.0 / math.sqrt(module.sub_dim))
            _init.normal_(module.U, mean=0.0, std=std)
            _init.normal_(module.V, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        else:
            super()._init_weights(module)


def _mask(attention_mask, past, s, device):
    """Boolean [b, 1, s, past + s] mask (True = attend), or None for plain causal attention."""
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or s == 1:
            return None
        attention_mask = None
    t = past + s
    qpos = torch.arange(past, t, device=device).unsqueeze(-1)
    allowed = torch.arange(t, device=device).unsqueeze(0) <= qpos            # [s, t]
    allowed = allowed.unsqueeze(0).unsqueeze(0)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -t:].bool()
        # a query row with nothing to attend to (left padding) attends to itself: no NaN
        allowed = allowed | (torch.arange(t, device=device) == qpos)
    return allowed


class MegapeerModel(MegapeerPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._rope = {}
        self.post_init()

    def rope(self, device):
        if device not in self._rope:
            self._rope[device] = rope_parameters(self.config, device)
        return self._rope[device]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None):
        """Final hidden states [b, s, d]; `cache` (a transformers Cache) is read and extended."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=x.device).expand(b, s)
        inv_freq, scale = self.rope(x.device)
        cos, sin = rope_cos_sin(inv_freq, scale, position_ids)
        mask = _mask(attention_mask, past, s, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class MegapeerForCausalLM(MegapeerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MegapeerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # older transformers
                cache = DynamicCache()
        if not use_cache:
            cache = None
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return out.to_tuple() if return_dict is False else out
