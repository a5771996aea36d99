"""Hugging Face export and import, and loading exported models for generation.

    export_checkpoint(ckpt, out)        checkpoint (any layout) -> HF folder   (export.py)
    import_hf(hf_dir, ckpt_dir)         HF folder -> checkpoint (any layout)   (hf_import.py)
    load_model(path)                    (model, tokenizer) from either           (loading.py)
    sample(path_or_model, tok, prompt)  text generation with the latent cache  (generate.py)

Importing this package is cheap; torch, transformers and Megatron load on first use.
CLIs: tools/convert_to_hf.py, tools/convert_from_hf.py. Details: docs/export_eval.md.
"""
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


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
