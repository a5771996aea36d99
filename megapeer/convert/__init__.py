"""Hugging Face export and import, and loading exported models for generation.

    export_checkpoint(ckpt, out)        checkpoint (any layout) -> HF folder   (export.py)
    import_hf(hf_dir, ckpt_dir)         HF folder -> checkpoint (any layout)   (hf_import.py)
    load_model(path)                    (model, tokenizer) from either           (loading.py)
    sample(path_or_model, tok, prompt)  text generation with the latent cache  (generate.py)

Importing this package is cheap; torch, transformers and Megatron load on first use.
CLIs: tools/convert_to_hf.py, tools/convert_from_hf.py. Details: docs/export_eval.md.
"""
from ..lazy import lazy_getattr

_LAZY = {
    "ConversionError": "checkpoint_io",
    "read_checkpoint": "checkpoint_io",
    "export_checkpoint": "export",
    "import_hf": "hf_import",
    "load_model": "loading",
    "model_from_checkpoint": "loading",
    "generate_ids": "generate",
    "sample": "generate",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
