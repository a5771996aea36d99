"""Read a megapeer checkpoint's model weights as full tensors, whatever layout saved it.

dist_checkpointing records every tensor's global shape, so the full tensors are read
directly (no model is built and no layout is assumed): TP/PP/VPP/EP shards are
assembled by the reader. Keys are checked against the checkpoint's own megapeer.yaml.
"""
import os

import torch

from ..training.checkpointing import CONFIG_NAME, resolve_checkpoint
from .keymap import megatron_shapes, normalize_te_key, shape_matches

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class ConversionError(ValueError):
    """Bad input to export/import/eval; the message names the file or tensor."""


def ensure_process_group():
    """dist_checkpointing needs torch.distributed: a world of one when none is running."""
    if not torch.distributed.is_initialized():
        from ..parallel import init_distributed
        init_distributed()


def load_checkpoint_config(iter_dir):
    from ..config import ConfigError, load_config
    path = os.path.join(iter_dir, CONFIG_NAME)
    try:
        return load_config(path, validate=False)
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def _check_shard_files(iter_dir):
    """Every data file named in the checkpoint's .metadata must exist."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(iter_dir).read_metadata()
    except FileNotFoundError:
        raise ConversionError(f"{iter_dir}: no .metadata file: not a complete "
                              "dist_checkpointing checkpoint") from None
    names = sorted({s.relative_path for s in (meta.storage_data or {}).values()})
    missing = [n for n in names if not os.path.isfile(os.path.join(iter_dir, n))]
    if missing:
        raise ConversionError(f"{iter_dir}: missing checkpoint shard file(s) "
                              f"{', '.join(missing)} (listed in .metadata)")


def read_checkpoint(path, dtype=None):
    """(config, iteration folder, {checkpoint key: full tensor}) of the model in `path`.

    path: an iteration folder, a checkpoint dir with `latest`, or a run dir.
    dtype: cast every floating tensor to it (default: as saved).
    """
    try:
        it = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    cfg = load_checkpoint_config(it)
    ensure_process_group()
    from megatron.core import dist_checkpointing
    _check_shard_files(it)
    try:
        meta = dist_checkpointing.load_tensors_metadata(it)
    except Exception as e:  # dist_checkpointing raises several types for unreadable folders
        raise ConversionError(f"{it}: cannot read the checkpoint metadata ({e})") from None
    found = {normalize_te_key(k): k for k in meta if k.startswith(MODEL_PREFIXES)}
    check_keys(cfg.model, {k: tuple(meta[v].global_shape) for k, v in found.items()},
               os.path.join(it, CONFIG_NAME), it)
    request = {found[k]: meta[found[k]] for k in megatron_shapes(cfg.model)}
    try:
        loaded = dist_checkpointing.load(request, it, validate_access_integrity=False)
    except Exception as e:
        raise ConversionError(f"{it}: reading the model tensors failed ({e})") from None
    tensors = {}
    for k in megatron_shapes(cfg.model):
        t = loaded[found[k]]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t
    return cfg, it, tensors


def check_keys(model_cfg, shapes, config_path, where):
    """Raise ConversionError unless `shapes` (checkpoint key -> shape) fits the config."""
    want = megatron_shapes(model_cfg)
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    hint = (f"; {config_path} describes {model_cfg.num_layers} layers with pattern "
            f"{model_cfg.layer_pattern!r}, q_lora_rank={model_cfg.mla.q_lora_rank}, "
            f"untied output={model_cfg.untie_embeddings_and_output_weights}, "
            f"peer.query_norm={model_cfg.peer.query_norm!r}")
    if missing:
        raise ConversionError(f"{where}: tensors missing for the config: "
                              f"{few(missing)}{hint}")
    if extra:
        raise ConversionError(f"{where}: tensors not in the config: {few(extra)}{hint}")
    for k, exp in want.items():
        if not shape_matches(exp, shapes[k], model_cfg.vocab_size):
            exp_s = tuple("vocab>=%d" % model_cfg.vocab_size if e is None else e for e in exp)
            raise ConversionError(f"{where}: tensor {k} has shape {tuple(shapes[k])} but "
                                  f"{config_path} implies {exp_s}")


def few(keys, n=4):
    """The first n keys, and how many more."""
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
