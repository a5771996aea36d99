"""Hugging Face folder written by megapeer (either format) -> megapeer checkpoint.

The weights are loaded into a single-process (TP=PP=EP=1) model and saved with
dist_checkpointing, which reshards them on load: the checkpoint resumes under any
layout. The checkpoint holds the model only (no optimizer state): train_state.json
says so with "model_only": true.
"""
import json
import os
import shutil
import tempfile

import torch

from .checkpoint_io import ConversionError, ensure_process_group, few
from .hf_config import model_config_from_hf
from .keymap import from_hf, hf_shapes
from .safetensors_io import read_weights

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def read_hf_config(hf_dir) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def config_from_hf_folder(hf_dir, overrides=()):
    """megapeer Config: megapeer.yaml of the folder (when present) with the model section
    taken from config.json, then `overrides` ("a.b=value")."""
    from ..config import Config, ConfigError, load_config, save_config, validate_config
    hf = read_hf_config(hf_dir)
    yaml_path = os.path.join(hf_dir, "megapeer.yaml")
    try:
        cfg = load_config(yaml_path, validate=False) if os.path.isfile(yaml_path) else Config()
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    model_config_from_hf(hf, cfg.model, os.path.join(hf_dir, "config.json"))
    with tempfile.TemporaryDirectory() as d:
        save_config(cfg, os.path.join(d, "c.yaml"))
        try:
            cfg = load_config(os.path.join(d, "c.yaml"), list(overrides), validate=False)
            p = cfg.parallel
            validate_config(cfg, p.tensor * p.pipeline * p.expert, source=hf_dir)
        except ConfigError as e:
            raise ConversionError(str(e)) from None
    return cfg, hf


def _copy_tokenizer(hf_dir, out_dir, cfg):
    """Copy the folder's tokenizer next to the checkpoint and point data.tokenizer at it."""
    from .tokenizer import load_folder_tokenizer
    names = [n for n in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "vocab.json", "merges.txt")
             if os.path.isfile(os.path.join(hf_dir, n))]
    if not names:
        return None
    dst = os.path.join(out_dir, "tokenizer")
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(hf_dir, n), os.path.join(dst, n))
    tok = load_folder_tokenizer(dst)
    if tok.kind == "sentencepiece":
        cfg.data.tokenizer.type, cfg.data.tokenizer.path = "sentencepiece", tok.path
    else:
        cfg.data.tokenizer.type, cfg.data.tokenizer.path = "huggingface", os.path.abspath(dst)
    return tok


def import_hf(hf_dir, output, iteration=0, overrides=(), overwrite=False) -> str:
    """Write a megapeer checkpoint dir (iter folder + latest) from a Hugging Face folder.
    Returns the iteration folder."""
    from ..config import save_config
    from ..models import build_model_chunks, padded_vocab_size
    from ..parallel import init_model_parallel
    from ..training.checkpointing import (CONFIG_NAME, LATEST, STATE_NAME, iter_name,
                                          save_model, unwrap)
    cfg, _ = config_from_hf_folder(hf_dir, overrides)
    tensors = read_weights(hf_dir, hf_shapes(cfg.model))
    dtype = tensors["model.embed_tokens.weight"].dtype
    if dtype not in _PRECISION:
        raise ConversionError(f"{hf_dir}: weights are {dtype}; megapeer trains in float32 or "
                              "bfloat16 (export with --dtype float32 or bfloat16)")
    it = os.path.join(output, iter_name(iteration))
    if os.path.exists(it) and not overwrite:
        raise ConversionError(f"{it} exists (pass --overwrite)")
    os.makedirs(output, exist_ok=True)
    _copy_tokenizer(hf_dir, output, cfg)
    cfg.training.precision = _PRECISION[dtype]

    ensure_process_group()
    if torch.distributed.get_world_size() != 1:
        raise ConversionError("import runs in one process (dist_checkpointing reshards later)")
    single = _single_process_copy(cfg)
    init_model_parallel(single.parallel, single.training.seed)
    chunks = build_model_chunks(single)
    model = unwrap(chunks[0])       # the GPTModel (bf16 chunks are Float16Module wrappers)
    mt = from_hf(cfg.model, tensors, padded_vocab_size(cfg.model, 1))
    own = model.state_dict()
    for k, t in mt.items():
        if k not in own or tuple(own[k].shape) != tuple(t.shape):
            got = tuple(own[k].shape) if k in own else "absent"
            raise ConversionError(f"internal: model tensor {k} is {got}, converted "
                                  f"{tuple(t.shape)}")
        if t.is_floating_point() and torch.finfo(t.dtype).bits > torch.finfo(own[k].dtype).bits:
            raise ConversionError(f"{hf_dir}: tensor {k} is {t.dtype} but a "
                                  f"{cfg.training.precision} model keeps it in {own[k].dtype} "
                                  "(export with a single --dtype)")
    missing = [k for k in own if k not in mt and not k.endswith("_extra_state")]
    if missing:
        raise ConversionError(f"internal: no converted tensor for {few(missing)}")
    model.load_state_dict(mt, strict=False)
    if os.path.exists(it):
        shutil.rmtree(it)
    save_model(chunks, it)
    save_config(cfg, os.path.join(it, CONFIG_NAME))
    with open(os.path.join(it, STATE_NAME), "w") as f:
        json.dump({"iteration": iteration, "consumed_samples": 0, "model_only": True,
                   "imported_from": os.path.abspath(hf_dir)}, f, indent=2)
    with open(os.path.join(output, LATEST), "w") as f:
        f.write(iter_name(iteration))
    return it


def _single_process_copy(cfg):
    import copy
    single = copy.deepcopy(cfg)
    single.parallel.tensor = single.parallel.pipeline = single.parallel.expert = 1
    single.parallel.virtual_pipeline = None
    single.parallel.sequence_parallel = False
    return single
