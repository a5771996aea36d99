"""megapeer checkpoint (any TP/PP/VPP/EP layout) -> Hugging Face folder.

The folder holds: safetensors weights (sharded above --max-shard-size, with an index),
config.json, generation_config.json, tokenizer files, megapeer.yaml (the training
config, read back by the importer) and, for the `megapeer` format, the self-contained
modeling code (configuration_megapeer.py, modeling_megapeer.py) named by `auto_map`.
"""
import os
import shutil

import torch

from .checkpoint_io import ConversionError, read_checkpoint
from .hf_config import AUTO_MAP, deepseek_fields, megapeer_fields, native_blocker
from .keymap import to_hf
from .safetensors_io import write_weights
from .tokenizer import save_tokenizer, special_ids, tokenizer_for_checkpoint

MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
MODELING_FILES = ("configuration_megapeer.py", "modeling_megapeer.py")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
FORMATS = ("auto", "megapeer", "deepseek_v3")


def parse_size(text) -> int:
    """'2GB', '500MB', '4096' -> bytes."""
    s = str(text).strip().upper()
    for unit, mult in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024), ("B", 1)):
        if s.endswith(unit):
            s, scale = s[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        return int(float(s) * scale)
    except ValueError:
        raise ConversionError(f"bad shard size {text!r} (use e.g. 2GB, 500MB)") from None


def resolve_format(fmt, model_cfg) -> str:
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "megapeer" if native_blocker(model_cfg) else "deepseek_v3"
    if fmt == "deepseek_v3":
        deepseek_fields(model_cfg, {})      # raises with the reason when impossible
    return fmt


def hf_config_object(model_cfg, fmt, ids, dtype):
    """The transformers config object for this model and format."""
    if fmt == "megapeer":
        from .hf_modeling.configuration_megapeer import MegapeerConfig
        conf = MegapeerConfig(**megapeer_fields(model_cfg, ids))
        conf.auto_map = dict(AUTO_MAP)
        conf.architectures = ["MegapeerForCausalLM"]
    else:
        from transformers import DeepseekV3Config
        conf = DeepseekV3Config(**deepseek_fields(model_cfg, ids))
        conf.architectures = ["DeepseekV3ForCausalLM"]
    conf.dtype = dtype
    return conf


def write_hf_folder(output, cfg, hf_tensors, fmt, tok=None, max_shard_bytes=2 * 1024 ** 3,
                    overwrite=False):
    """Write a complete Hugging Face folder (atomically: into OUTPUT.tmp, then renamed)."""
    from transformers import GenerationConfig

    from ..config import save_config
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise ConversionError(f"{output} exists and is not empty (pass --overwrite)")
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ids = special_ids(tok) if tok is not None else {}
    dtype = hf_tensors["model.embed_tokens.weight"].dtype
    write_weights(hf_tensors, tmp, max_shard_bytes)
    hf_config_object(cfg.model, fmt, ids, dtype).save_pretrained(tmp)
    if fmt == "megapeer":
        for name in MODELING_FILES:
            shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(tmp, name))
    gen = {k: v for k, v in ids.items() if v is not None}
    GenerationConfig(**gen).save_pretrained(tmp)
    if tok is not None:
        save_tokenizer(tok, tmp, cfg.model.seq_length)
    save_config(cfg, os.path.join(tmp, "megapeer.yaml"))
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)


def export_checkpoint(checkpoint, output, fmt="auto", dtype=None, tokenizer=None,
                      no_tokenizer=False, max_shard_size="2GB", overwrite=False) -> dict:
    """Convert a megapeer checkpoint to a Hugging Face folder. Returns a summary dict."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    cfg, it, tensors = read_checkpoint(checkpoint, DTYPES.get(dtype))
    fmt = resolve_format(fmt, cfg.model)
    tok = None
    if not no_tokenizer:
        tok = tokenizer_for_checkpoint(cfg, tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConversionError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the "
                                  f"model's vocab_size is {cfg.model.vocab_size}")
    hf = to_hf(cfg.model, tensors)
    write_hf_folder(output, cfg, hf, fmt, tok, max_bytes, overwrite)
    return {"checkpoint": it, "output": output, "format": fmt, "tensors": len(hf),
            "parameters": sum(t.numel() for t in hf.values()),
            "dtype": str(hf["model.embed_tokens.weight"].dtype).replace("torch.", ""),
            "tokenizer": tok.path if tok is not None else None}
