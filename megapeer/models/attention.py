"""Core attention for MLA without Transformer Engine.

Megatron-Core's local DotProductAttention rejects the k_channels / v_channels that
MLASelfAttention passes (q/k heads are qk_head_dim + qk_pos_emb_head_dim wide,
v heads v_head_dim). This module accepts them and runs
torch.nn.functional.scaled_dot_product_attention, which dispatches to fused
flash / memory-efficient kernels on GPUs and never materialises the score matrix.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Causal (or masked) attention over [s, b, heads, dim] tensors via torch SDPA."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("packed sequences need Transformer Engine's attention")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, nh, _ = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # Megatron masks are True where attention is blocked
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale)
        # [b, n, s, dv] -> [s, b, n * dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * self.v_channels)


class _GatherKVLatent(torch.autograd.Function):
    """All-gather the last dim over TP; backward sums the rotary-key part over TP.

    MLA's shared rotary key (the last qk_pos_emb_head_dim columns) feeds every
    head, and heads are split over tensor-parallel ranks: each rank holds only its
    heads' share of that key's gradient. Megatron-Core 0.16.1 splits the gathered
    gradient without summing it (wrong gradients for linear_kv_down_proj at TP>1,
    measured in tests/test_parallel.py); here the rotary part is all-reduced first.
    The latent part's gradient is already complete on every rank (it passes
    through a column-parallel up-projection whose input gradient is all-reduced).
    """

    @staticmethod
    def forward(ctx, local, latent_dim, group):
        ctx.group, ctx.latent_dim = group, latent_dim
        world = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        pos = grad[..., ctx.latent_dim:].contiguous()
        torch.distributed.all_reduce(pos, group=ctx.group)
        grad[..., ctx.latent_dim:] = pos
        world = torch.distributed.get_world_size(ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None, None


class KVDownProjection(ColumnParallelLinear):
    """MLA's linear_kv_down_proj for the local spec, with exact gradients at TP>1.

    Returns the full [.., kv_lora_rank + qk_pos_emb_head_dim] output, so that
    MLASelfAttention skips its own gather (see _GatherKVLatent).
    """

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        tp = self.tp_group if getattr(self, "tp_group", None) is not None else \
            ps.get_tensor_model_parallel_group()
        if torch.distributed.get_world_size(tp) > 1:
            if self.config.sequence_parallel:
                # [s, b, width / tp] -> [s / tp, b, width], the shape of an unsplit linear
                # under SP: MLA then gathers the rotary key over the sequence, whose
                # backward (a reduce-scatter) sums its partial gradients over TP.
                out = tensor_parallel.gather_from_tensor_model_parallel_region(out, group=tp)
                out = tensor_parallel.scatter_to_sequence_parallel_region(out, group=tp)
            else:
                out = _GatherKVLatent.apply(out, self.config.kv_lora_rank, tp)
        return out, bias
