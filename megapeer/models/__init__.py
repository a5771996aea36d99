"""MLA + PEER GPT models on Megatron-Core.

counts.py (parameter and FLOP counts) needs no Megatron-Core; gpt.py imports it, so the
names from gpt.py load on first use and `megapeer.models.counts` stays quick to import
(ablation dry runs, config checks).
"""
from .counts import flops_per_token, padded_vocab_size, param_counts

_FROM_GPT = ("build_model", "build_model_chunks", "compile_layers", "peer_modules",
             "transformer_config")

__all__ = ["flops_per_token", "padded_vocab_size", "param_counts", *_FROM_GPT]


def __getattr__(name):
    if name in _FROM_GPT:
        from . import gpt
        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
