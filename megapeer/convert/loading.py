"""A ready-to-run plain PyTorch model (+ tokenizer) from an export folder or a checkpoint.

- Hugging Face folder (has config.json): AutoModelForCausalLM with trust_remote_code,
  offline (the megapeer format runs its bundled modeling file; deepseek_v3 is native).
- megapeer checkpoint (any layout): converted in memory to the same modeling code as
  the export, without writing files.
"""
import os

import torch

from .checkpoint_io import ConversionError, read_checkpoint
from .export import DTYPES
from .hf_config import megapeer_fields
from .keymap import to_hf
from .tokenizer import load_folder_tokenizer, special_ids, tokenizer_for_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def is_hf_folder(path) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_from_checkpoint(path, dtype=None, tokenizer=None):
    """(MegapeerForCausalLM, tokenizer or None) from a megapeer checkpoint, in memory."""
    from .hf_modeling.configuration_megapeer import MegapeerConfig
    from .hf_modeling.modeling_megapeer import MegapeerForCausalLM
    cfg, _, tensors = read_checkpoint(path, _dtype(dtype))
    tok = None
    if tokenizer is not False:
        tok = tokenizer_for_checkpoint(cfg, tokenizer)
    ids = special_ids(tok) if tok is not None else {}
    hf = to_hf(cfg.model, tensors)
    if "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    conf = MegapeerConfig(**megapeer_fields(cfg.model, ids))
    with torch.device("meta"):
        model = MegapeerForCausalLM(conf)
    model.load_state_dict(hf, strict=True, assign=True)
    return model.eval(), tok


def load_model(path, device="cpu", dtype=None, tokenizer=None):
    """(model, tokenizer) from an export folder or a checkpoint, in eval mode on `device`.

    tokenizer: None = the folder's / checkpoint's own, a path = that one, False = none.
    """
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such model folder or checkpoint")
    if is_hf_folder(path):
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=True, local_files_only=True, dtype=_dtype(dtype))
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{path}: cannot load the model ({e})") from None
        tok = None
        if tokenizer:
            tok = _load_tokenizer(tokenizer)
        elif tokenizer is None and any(os.path.isfile(os.path.join(path, f))
                                       for f in TOKENIZER_FILES):
            tok = load_folder_tokenizer(path)
    else:
        model, tok = model_from_checkpoint(path, dtype, tokenizer)
    return model.to(device).eval(), tok


def _load_tokenizer(path):
    from ..data.tokenizer import load_tokenizer
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return load_folder_tokenizer(path)
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise ConversionError(f"--tokenizer: {e}") from None
