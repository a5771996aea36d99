"""MLA + PEER GPT models on Megatron-Core.

counts.py (parameter and FLOP counts) needs no Megatron-Core; gpt.py imports it, so the
names from gpt.py load on first use and `megapeer.models.counts` stays quick to import
(ablation dry runs, config checks).
"""
from ..lazy import lazy_getattr
from .counts import flops_per_token, padded_vocab_size, param_counts

_LAZY = {name: "gpt" for name in ("build_model", "build_model_chunks", "compile_layers",
                                  "peer_modules", "transformer_config")}

__all__ = ["flops_per_token", "padded_vocab_size", "param_counts", *_LAZY]

__getattr__ = lazy_getattr(__name__, _LAZY)
