"""Data: tokenizers, corpus preprocessing into Megatron indexed datasets, blending, batches.

Importing this package is cheap: torch and megatron.core load only when build_datasets or
BatchIterator is first used (worker processes import just the tokenizer side).
Preprocessing and tokenizer training: megapeer.data.preprocess.preprocess and
megapeer.data.train_tokenizer.train_tokenizer (CLIs in tools/).
"""
from .tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer, load_tokenizer

from ..lazy import lazy_getattr

_LAZY = {
    "build_datasets": "datasets",
    "parse_blend": "datasets",
    "BatchIterator": "batches",
    "prepare_demo_data": "demo",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["BatchIterator", "HFTokenizer", "SentencePieceTokenizer", "build_datasets",
           "build_tokenizer", "load_tokenizer", "parse_blend", "prepare_demo_data"]
