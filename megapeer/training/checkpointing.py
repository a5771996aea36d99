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


# ---------------------------------------------------------------- layout on disk
# <checkpoint dir>/iter_0000100/    dist_checkpointing folder (model, optimizer, rng, ...)
#                  megapeer.yaml    the run's full config
#                  train_state.json iteration, consumed samples, ...
# <checkpoint dir>/latest           name of the newest complete iteration folder
LATEST = "latest"
CONFIG_NAME = "megapeer.yaml"
STATE_NAME = "train_state.json"


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve_checkpoint(path: str) -> str:
    """An iteration folder from: an iteration folder, a checkpoint dir (its `latest`),
    or a run dir holding `checkpoints/`. Raises FileNotFoundError naming the path."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    for base in (path, os.path.join(path, "checkpoints")):
        marker = os.path.join(base, LATEST)
        if os.path.isfile(marker):
            with open(marker) as f:
                name = f.read().strip()
            it = os.path.join(base, name)
            if not os.path.isfile(os.path.join(it, CONFIG_NAME)):
                raise FileNotFoundError(f"{marker} names {name}, which is not a complete "
                                        f"checkpoint (no {CONFIG_NAME})")
            return it
    raise FileNotFoundError(f"no megapeer checkpoint at {path} (expected {CONFIG_NAME} or a "
                            f"'{LATEST}' marker)")


def load_checkpoint_config(iter_dir: str):
    from ..config import load_config
    return load_config(os.path.join(iter_dir, CONFIG_NAME), validate=False)


def load_model_single_process(path: str, overrides=()):
    """(config, model) with weights from any checkpoint, in this process's layout (TP=PP=EP=1).

    Needs an initialised process group (megapeer.parallel.init_distributed()).
    """
    from ..config import load_config
    from ..models import build_model_chunks
    from ..parallel import init_model_parallel
    it = resolve_checkpoint(path)
    cfg = load_config(os.path.join(it, CONFIG_NAME), validate=False,
                      overrides=["parallel.tensor=1", "parallel.pipeline=1",
                                 "parallel.virtual_pipeline=null", "parallel.expert=1",
                                 "training.precision=fp32", *overrides])
    init_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = build_model_chunks(cfg)
    load_model(chunks, it)
    return cfg, chunks[0]


# ----------------------------------------------------------- training checkpoints
def _layout():
    from megatron.core import parallel_state as ps
    return {"world": torch.distributed.get_world_size(),
            "tensor": ps.get_tensor_model_parallel_world_size(),
            "pipeline": ps.get_pipeline_model_parallel_world_size(),
            "expert": ps.get_expert_model_parallel_world_size()}


def _rng_object():
    import random

    import numpy as np
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng(state):
    import random

    import numpy as np
    from megatron.core import tensor_parallel
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_root, iteration, chunks, optimizer, scheduler, train_state, cfg,
                    keep_last=3):
    """Save everything needed to resume; `latest` moves only once the save is complete."""
    import json
    import shutil

    from ..config import save_config
    wait_for_writer_helper()
    rank = torch.distributed.get_rank()
    it_dir = os.path.join(ckpt_root, iter_name(iteration))
    if rank == 0:
        if os.path.isdir(it_dir):  # a stale, incomplete save of the same step
            shutil.rmtree(it_dir)
        os.makedirs(it_dir)
    torch.distributed.barrier()
    model_sd = model_sharded_state_dict(chunks)
    sd = dict(model_sd)
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False)
    sd["rng"] = _rng_object()
    dist_checkpointing.save(sd, it_dir)
    if os.environ.get("MEGAPEER_FAULT_KILL_IN_SAVE") == str(iteration):
        import signal  # test hook: die between writing the tensors and the metadata,
        import psutil  # like a node going down (helper processes included)
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.distributed.barrier()
    if rank == 0:
        state = dict(train_state, iteration=iteration, layout=_layout(),
                     scheduler=scheduler.state_dict())
        _atomic_write(os.path.join(it_dir, STATE_NAME), json.dumps(state, indent=1))
        save_config(cfg, os.path.join(it_dir, CONFIG_NAME))
        _atomic_write(os.path.join(ckpt_root, LATEST), iter_name(iteration))
        _prune(ckpt_root, keep_last)
    torch.distributed.barrier()
    return it_dir


def _prune(ckpt_root, keep_last):
    import shutil
    names = sorted(n for n in os.listdir(ckpt_root) if n.startswith("iter_")
                   and os.path.isdir(os.path.join(ckpt_root, n)))
    with open(os.path.join(ckpt_root, LATEST)) as f:
        latest = f.read().strip()
    complete = [n for n in names if os.path.isfile(os.path.join(ckpt_root, n, CONFIG_NAME))]
    keep = set(complete[-keep_last:]) | {latest}
    for n in names:
        if n not in keep and n < latest:  # also removes incomplete older saves
            shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)


def load_checkpoint(it_dir, chunks, optimizer, scheduler):
    """Restore model, optimizer, scheduler (and RNG when the layout is unchanged).

    Returns the saved train_state dict.
    """
    import json
    with open(os.path.join(it_dir, STATE_NAME)) as f:
        state = json.load(f)
    if state.get("model_only"):  # e.g. imported from Hugging Face: weights only
        load_model(chunks, it_dir)
        state["rng_restored"] = False
        return state
    model_sd = model_sharded_state_dict(chunks)
    sd = dict(model_sd)
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    same_layout = state.get("layout") == _layout()
    if same_layout:
        sd["rng"] = _rng_object()
    loaded = dist_checkpointing.load(sd, it_dir)
    chunks_u = [unwrap(c) for c in chunks]
    if len(chunks_u) == 1:
        chunks_u[0].load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(chunks_u):
            c.load_state_dict(loaded[f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _set_rng(loaded["rng"])
    state["rng_restored"] = same_layout
    return state


def find_resume_point(ckpt_cfg, ckpt_root):
    """Iteration folder to resume from, or None for a fresh start."""
    mode = ckpt_cfg.resume
    if mode == "none":
        return None
    if mode == "auto":
        if not os.path.isfile(os.path.join(ckpt_root, LATEST)):
            return None
        return resolve_checkpoint(ckpt_root)
    return resolve_checkpoint(mode)


_WRITER_MANAGER = None
_WRITER_START = None    # the Future of a start in the background


def start_signal_proof_writer_helper(background=False):
    """Start Megatron's persistent checkpoint-writer helper ourselves, with SIGTERM and
    SIGUSR1 blocked in it.

    megatron-core 0.16.1 (filesystem_async._get_write_results_queue) keeps a spawned
    multiprocessing Manager alive from the first save on. Slurm signals every process of
    a job step, so on requeue/pre-emption that helper would die and the very save the
    signal asked for would fail (BrokenPipeError). The helper exits by itself once the
    trainer process is gone (killed with SIGKILL, for instance).

    background=True returns at once; save_checkpoint waits for the start
    (wait_for_writer_helper) before its first write. The start runs on an executor
    thread, which the interpreter joins before the atexit handlers: multiprocessing's
    exit handler joins the manager process, and only a finished start registers the
    finalizer that shuts it down (an exit during the start hung without the join).
    """
    global _WRITER_START
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if (_WRITER_MANAGER is not None or _WRITER_START is not None
            or filesystem_async._results_queue is not None):
        return
    if not background:
        _start_writer_helper()
        return
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1, thread_name_prefix="start-checkpoint-writer")
    _WRITER_START = pool.submit(_start_writer_helper)
    pool.shutdown(wait=False)


def wait_for_writer_helper():
    """Block until a background start of the writer helper is done (no-op otherwise)."""
    global _WRITER_START
    start, _WRITER_START = _WRITER_START, None
    if start is None:
        return
    try:
        start.result()
    except BaseException as e:
        raise RuntimeError(f"the checkpoint-writer helper did not start: {e!r}") from e


def _start_writer_helper():
    global _WRITER_MANAGER
    import multiprocessing as mp
    import signal
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from .helper_process import guard
    manager = SyncManager(ctx=mp.get_context("spawn"))
    # the helper unpickles the write results (torch.distributed.checkpoint types) at the
    # first save: import them while the trainer builds its model and data
    manager.start(guard, ({signal.SIGTERM, signal.SIGUSR1}, os.getpid(),
                          ("torch.distributed.checkpoint",)))
    filesystem_async._results_queue = manager.Queue()
    _WRITER_MANAGER = manager
