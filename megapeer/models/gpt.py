"""build_model: Megatron-Core GPTModel chunks with MLA attention and dense/PEER MLPs."""
import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import MLATransformerConfig

from ..ops import compile_cache
from ..parallel import cpu_shims
from ..parallel.cpu_shims import transformer_engine_available
from .attention import KVDownProjection
from .counts import padded_vocab_size
from .layer_specs import attention_backend, block_spec

log = logging.getLogger(__name__)


def param_dtype(training_cfg) -> torch.dtype:
    p = training_cfg.precision if training_cfg is not None else "auto"
    if p == "auto":
        p = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if p == "bf16" else torch.float32


def fused_cross_entropy_impl(training_cfg) -> str | None:
    """training.fused_cross_entropy: Transformer Engine's kernel ("te") where TE is
    importable, else Megatron's compiled one ("native"); None when off."""
    if training_cfg is None or not training_cfg.fused_cross_entropy:
        return None
    return "te" if transformer_engine_available() else "native"


def transformer_config(model_cfg, parallel_cfg, training_cfg=None) -> MLATransformerConfig:
    """Megatron's config from our sections (MLA + parallel + precision + recompute)."""
    m, a, p = model_cfg, model_cfg.mla, parallel_cfg
    dtype = param_dtype(training_cfg)
    recompute = training_cfg.recompute if training_cfg is not None else "none"
    on_cpu = not torch.cuda.is_available()
    kw = {}
    ce = fused_cross_entropy_impl(training_cfg)
    if ce:
        kw.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl=ce)
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return MLATransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=a.v_head_dim,
        q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank,
        qk_head_dim=a.qk_head_dim,
        qk_pos_emb_head_dim=a.qk_pos_emb_head_dim,
        v_head_dim=a.v_head_dim,
        rope_type=a.rope_type,
        rotary_base=a.rotary_base,
        rotary_scaling_factor=a.rotary_scaling_factor,
        original_max_position_embeddings=a.original_max_position_embeddings,
        beta_fast=a.beta_fast,
        beta_slow=a.beta_slow,
        mscale=a.mscale,
        mscale_all_dim=a.mscale_all_dim,
        qk_layernorm=True,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        # per-layer checkpoint keys (layers.N.*): dense and PEER layers differ
        hetereogenous_dist_checkpoint=True,
        # Batched p2p with interleaved schedules gives wrong gradients on gloo.
        batch_p2p_comm=not on_cpu,
        batch_p2p_sync=not on_cpu,
        **kw,
    )


def build_model_chunks(cfg, tcfg=None) -> list:
    """This rank's model chunks (one per virtual pipeline stage) for a full Config."""
    m, p = cfg.model, cfg.parallel
    tcfg = tcfg or transformer_config(m, p, cfg.training)
    backend = attention_backend(m)
    if torch.distributed.get_rank() == 0:
        log.info("attention: %s", "Transformer Engine" if backend == "te"
                 else "local spec + torch SDPA core attention")
    vpp = p.virtual_pipeline
    chunks = []
    for vp in (range(vpp) if vpp else [None]):
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=block_spec(m, tcfg, vp_stage=vp),
            vocab_size=padded_vocab_size(m, p.tensor),
            max_sequence_length=m.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type="none",
            vp_stage=vp,
        )
        _fix_mla_tp_grads(model)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if tcfg.bf16:
            # As Megatron-LM does: every parameter in bf16 (norms included), inputs cast
            # on the first stage and logits returned in fp32. Without it the optimizer
            # holds mixed bf16/fp32 groups whose checkpoint state Megatron misaligns.
            model = Float16Module(tcfg, model)
        chunks.append(model)
    return chunks


def _fix_mla_tp_grads(model):
    """Two Megatron-Core 0.16.1 MLA gradient errors at tensor parallel > 1.

    1. finalize_model_grads *sums* the grads of any parameter named '*q_layernorm*'
       over TP ranks (right for per-head q norms). MLA's q_layernorm acts on the
       all-gathered latent, so each rank already holds the full grad; the sum doubles
       it. Averaging is exact.
    2. The shared rotary key's grad is split without being summed over TP ranks
       (attention.KVDownProjection). The module's class is switched after
       construction because MLASelfAttention accepts only listed classes there.
    Both are checked against the single-process gradients in tests/test_parallel.py.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear
    for name, p in model.named_parameters():
        # under sequence parallelism q_layernorm sees a chunk of the sequence: the sum is right
        if "self_attention.q_layernorm" in name and not model.config.sequence_parallel:
            p.average_gradients_across_tp_domain = True
    for mod in model.modules():
        proj = getattr(mod, "linear_kv_down_proj", None)
        if type(proj) is ColumnParallelLinear:
            proj.__class__ = KVDownProjection


def build_model(cfg):
    """This rank's GPTModel (a list of chunks with virtual pipeline stages)."""
    chunks = build_model_chunks(cfg)
    return chunks if cfg.parallel.virtual_pipeline else chunks[0]


def peer_modules(model):
    """All PEER modules of a model or list of chunks."""
    from .peer import PEER
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [mod for c in chunks for mod in c.modules() if isinstance(mod, PEER)]


def compile_layers(chunks, mode="default") -> int:
    """torch.compile every transformer layer in place (training.compile); returns the count.

    mode: torch.compile's mode ('reduce-overhead' adds CUDA graphs on GPU).
    Layers share one compiled graph (parameters are graph inputs), so the cost is one
    compilation per layer kind (dense, PEER), not per layer. Inductor's pattern matcher
    is turned off: its attention rewrite (fuse_attention) fails on the MLA layer with a
    shape error (torch 2.13 CPU, 2026-11-28); pointwise fusion, which is what pays here,
    stays.
    On an H200 this took the ~1.3B dense MLA step from 678 to 445 ms (581 ms on a slower
    host; docs/benchmarks.md).
    """
    import torch._inductor.config as inductor_config
    inductor_config.pattern_matcher = False
    compile_cache.tag_compile_caches()
    n = 0
    for c in chunks:
        model = c.module if isinstance(c, Float16Module) else c
        for layer in model.decoder.layers:
            if ps.get_tensor_model_parallel_world_size() > 1:
                keep_tp_linears_eager(layer)
            layer.compile(mode=None if mode == "default" else mode)
            n += 1
    return n


def keep_tp_linears_eager(layer) -> int:
    """Run Megatron's tensor-parallel linears outside the compiled graph; returns the count.

    Under TP their autograd Function launches async collectives in backward, which Dynamo
    cannot trace: it broke the graph inside every linear and recompiled each one per
    shape and class (32 recompiles for a 2-layer model on CPU). Kept eager, each linear
    is one clean graph break; the elementwise work between them is still compiled, and
    no collective runs inside a compiled graph (PEER's are eager too: models/peer.py).
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    n = 0
    for mod in layer.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.forward = torch._dynamo.disable(mod.forward, recursive=True)
            n += 1
    return n


__all__ = ["build_model", "build_model_chunks", "compile_layers", "padded_vocab_size",
           "peer_modules", "transformer_config", "cpu_shims"]
