"""DataConfig -> Megatron-Core GPTDataset / BlendedDataset splits.

Blends are flat string lists, as in Megatron-LM: [weight, prefix, weight, prefix, ...] or
[prefix, ...] (weights then follow dataset sizes). Either one blend split by `split`, or
one blend per split (train_blend / valid_blend / test_blend). Index caches (shuffle,
sample and blending indices) go to cache_dir, default <folder of the first prefix>/cache.
"""
import contextlib
import os
from collections import OrderedDict


def parse_blend(blend, what="data.blend"):
    """Flat list -> (prefixes, weights or None), or None for an empty list."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import get_blend_from_list

    if not blend:
        return None
    items = [str(x).strip() for x in blend]
    numeric = [_is_number(x) for x in items]
    if len(items) % 2 == 0 and any(numeric[0::2]) and not all(numeric[0::2]):
        raise ValueError(f"{what}: expected [weight, prefix, weight, prefix, ...] or "
                         f"[prefix, ...], got {blend}")
    prefixes, weights = get_blend_from_list(items)
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"{what}: weights must be positive, got {weights}")
    for p in prefixes:
        if not IndexedDataset.exists(p):
            raise ValueError(f"{what}: no indexed dataset at prefix {p!r} "
                             f"(need {p}.bin and {p}.idx)")
    return prefixes, weights


def _check_split_sizes(prefixes, split, sizes):
    """Each split with a non-zero share must get at least one document of each prefix;
    otherwise Megatron's epoch count loops forever. Same rounding as Megatron."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    w = [float(x) for x in split.split(",")]
    bounds = [sum(w[:i]) / sum(w) for i in range(4)]
    for p in prefixes:
        n = len(IndexedDataset(p, mmap=True).document_indices) - 1
        for i, name in enumerate(("train", "valid", "test")):
            beg, end = int(round(bounds[i] * n)), int(round(bounds[i + 1] * n))
            if w[i] > 0 and end <= beg:
                raise ValueError(
                    f"data.split={split!r} gives the {name} split no documents of {p} "
                    f"({n} documents in all): give it a larger share, or 0 to disable it")


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


class MegatronTokenizerView:
    """What GPTDatasetConfig reads from a tokenizer: vocab_size, eod, pad (-1 when absent:
    a value never present in the data), and unique_identifiers for the cache hash."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod if tokenizer.eod is not None else -1
        pad = getattr(tokenizer, "pad", None)
        self.pad = pad if pad is not None else -1
        self.unique_identifiers = OrderedDict(
            [("class", type(tokenizer).__name__), ("vocab_size", self.vocab_size),
             ("eod", self.eod), ("pad", self.pad)])


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """Megatron's BlendedDataset calls torch.distributed.get_rank() when it builds its cache,
    even when no process group exists. Without one we are the only rank: answer 0, only
    while building."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def build_datasets(data_cfg, seq_length, num_samples, tokenizer, is_built_on_rank=None):
    """Build (train, valid, test) through BlendedMegatronDatasetBuilder; None for a split
    with no data. num_samples: samples wanted per split. Must be called on every rank when a
    process group exists: rank 0 builds the index caches first, the others then load them.
    is_built_on_rank: Megatron's callable; default every rank builds."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    per_split = [data_cfg.train_blend, data_cfg.valid_blend, data_cfg.test_blend]
    if any(per_split):
        names = ["data.train_blend", "data.valid_blend", "data.test_blend"]
        blend_per_split = [parse_blend(b, n) for b, n in zip(per_split, names)]
        blend, split = None, None
        first = next(b for b in blend_per_split if b)[0][0]
    elif data_cfg.blend:
        blend, blend_per_split, split = parse_blend(data_cfg.blend), None, data_cfg.split
        first = blend[0][0]
    else:
        raise ValueError("data.blend and data.train_blend are both empty: no data to train on")
    cache = data_cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(first)), "cache")
    config = GPTDatasetConfig(
        random_seed=data_cfg.seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache,
        tokenizer=MegatronTokenizerView(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [int(n) for n in num_samples]
    if blend is not None:
        _check_split_sizes(blend[0], split, sizes)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True),
                                            config)
    with _rank_zero_without_process_group():
        train, valid, test = builder.build()
    return train, valid, test
