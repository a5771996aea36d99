"""Model checkpoints through Megatron-Core dist_checkpointing (torch_dist format).

Each parameter records its sharding in `sharded_state_dict`, so a checkpoint saved
under one tensor/pipeline/expert layout loads under another.
"""
import os

import torch
from megatron.core import dist_checkpointing


def unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks) -> dict:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks, ckpt_dir: str, extra: dict = None) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sd = model_sharded_state_dict(chunks)
    if extra:
        sd.update(extra)
    dist_checkpointing.save(sd, ckpt_dir)


def load_model(chunks, ckpt_dir: str, strict: bool = True) -> None:
    sd = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sd, ckpt_dir)
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=strict)


def sharded_tensors(chunks):
    """Yield (key, ShardedTensor) for every parameter of the given chunks."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    for sh in nested_values(model_sharded_state_dict(chunks)):
        if isinstance(sh, ShardedTensor):
            yield sh.key, sh


def global_slices(sh):
    """Index of this shard inside the global tensor."""
    return tuple(slice(off, off + n) for off, n in
                 zip(sh.global_offset[sh.prepend_axis_num:], sh.local_shape))


@torch.no_grad()
def gather_full(chunks, values="param"):
    """Full (unsharded) tensors by checkpoint key, assembled on every rank.

    values: 'param' for weights, 'grad' for Megatron DDP's main_grad (or .grad).
    Shards are summed into zeros over all ranks; replicas are counted once.
    """
    by_ptr = {}
    for c in chunks:
        for p in c.parameters():
            by_ptr[p.data_ptr()] = p
    out = {}
    for key, sh in sharded_tensors(chunks):
        full = torch.zeros(sh.global_shape[sh.prepend_axis_num:], dtype=torch.float32)
        main = all(r == 0 for r in (sh.replica_id if isinstance(sh.replica_id, tuple)
                                    else (sh.replica_id,)))
        if main:
            t = sh.data
            if values == "grad":
                p = by_ptr[t.data_ptr()]
                t = getattr(p, "main_grad", None)
                t = p.grad if t is None else t
            full[global_slices(sh)] = t.detach().float().cpu()
        out[key] = full
    keys = sorted(out)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # ranks may hold different key sets (pipeline stages): agree on the union
        allkeys = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(allkeys, {k: tuple(v.shape) for k, v in out.items()})
        union = {}
        for d in allkeys:
            union.update(d)
        keys = sorted(union)
        for k in keys:
            t = out.get(k, torch.zeros(union[k]))
            torch.distributed.all_reduce(t)
            out[k] = t
    return {k: out[k] for k in keys}
