"""The one place where ModuleSpecs are built.

Every layer uses MLA attention; its MLP slot is a dense SwiGLU MLP ('D') or PEER
('P'), per model.layer_pattern. With Transformer Engine importable (and
attention_backend auto or te) Megatron-Core's TE spec is used; otherwise the
local spec with our SDPA core attention.
"""
import copy
import dataclasses
import logging

import torch

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ..config.validate import layer_kinds
from ..parallel.cpu_shims import transformer_engine_available
from .attention import SDPAttention
from .peer import PEER

log = logging.getLogger(__name__)


class _KnownMLPFilter(logging.Filter):
    """TransformerLayer warns about any MLP class it does not know; PEER is expected."""

    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMLPFilter())

# Megatron-Core 0.16.1's MLA module can believe Transformer Engine is present when it
# is not (its import guard succeeds partially) and then fails at build time with an
# isinstance TypeError, on CPU and GPU alike.
if not transformer_engine_available():
    from megatron.core.transformer import multi_latent_attention as _mla
    _mla.HAVE_TE = False


def attention_backend(model_cfg) -> str:
    """'te' or 'local' (SDPA), from model.attention_backend and what is importable."""
    want = model_cfg.attention_backend
    have_te = transformer_engine_available()
    if want == "te" and not have_te:
        raise RuntimeError("model.attention_backend=te but transformer_engine is not importable")
    return "te" if (want in ("auto", "te") and have_te) else "local"


class TorchNorm:
    """torch's LayerNorm / RMSNorm for the local spec, in place of Megatron's
    WrappedTorchNorm, which refuses sequence parallelism. Under it each TP rank normalises
    a chunk of the sequence, so the weights are marked `sequence_parallel` and Megatron's
    finalize_model_grads sums their gradients over TP (what apex's and TE's norms do)."""

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization {config.normalization!r} is not supported")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class RowParallelLinearWithGroup(RowParallelLinear):
    """Megatron's RowParallelLinear, handing its own group to its linear. Megatron-Core
    0.16.1 calls the linear with tp_group=None, and the default-group lookup warns on every
    call: torch.compile cannot trace warnings.warn, and the call sits inside a context
    manager it cannot resume from, so every compiled layer broke its graph there and ran
    the rest of its forward eagerly. The group is the same one either way (the linear uses
    it only for the input-gradient all-reduce and sequence parallelism, both off here)."""

    def _forward_impl(self, *args, **kwargs):
        if kwargs.get("tp_group", 0) is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(*args, **kwargs)


def _swap_local_modules(spec):
    """In a (nested) local spec, in place: TorchNorm for WrappedTorchNorm and
    RowParallelLinearWithGroup for RowParallelLinear."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    swaps = {WrappedTorchNorm: TorchNorm, RowParallelLinear: RowParallelLinearWithGroup}
    subs = getattr(spec, "submodules", None)
    if subs is None or not dataclasses.is_dataclass(subs):
        return spec
    for f in dataclasses.fields(subs):
        val = getattr(subs, f.name)
        if isinstance(val, type) and val in swaps:
            setattr(subs, f.name, swaps[val])
        elif isinstance(val, ModuleSpec):
            _swap_local_modules(val)
    return spec


def _base_spec(backend: str) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import \
            get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(
            multi_latent_attention=True, qk_layernorm=True)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True,
                                    normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return _swap_local_modules(spec)


def _norm(backend: str):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        return TENorm
    return TorchNorm


def layer_spec(kind: str, backend: str, peer_cfg) -> ModuleSpec:
    spec = _base_spec(backend)
    if kind == "P":
        spec = copy.deepcopy(spec)
        spec.submodules.mlp = ModuleSpec(module=PEER, params={"peer": peer_cfg})
        # TE fuses the pre-MLP norm into its first linear; PEER needs it explicit.
        spec.submodules.pre_mlp_layernorm = _norm(backend)
        spec.submodules.sharded_state_dict_keys_map = {}
    return spec


def block_spec(model_cfg, tcfg, vp_stage=None) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage (and virtual stage)."""
    backend = attention_backend(model_cfg)
    specs = [layer_spec(k, backend, model_cfg.peer) for k in layer_kinds(model_cfg)]
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage)
    n = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + n],
                                      layer_norm=_norm(backend))
