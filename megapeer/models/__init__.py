"""MLA + PEER GPT models on Megatron-Core."""
from .counts import flops_per_token, param_counts
from .gpt import (build_model, build_model_chunks, compile_layers, padded_vocab_size,
                  peer_modules, transformer_config)

__all__ = ["build_model", "build_model_chunks", "compile_layers", "flops_per_token", "padded_vocab_size",
           "param_counts", "peer_modules", "transformer_config"]
