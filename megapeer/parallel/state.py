"""Process groups: torch.distributed plus Megatron-Core's rank grid, from ParallelConfig."""
import datetime
import os
import socket

import torch
import torch.distributed as dist

from . import cpu_shims


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun/SLURM environment variables.

    Without them (a plain `python` run) a world of one is created. gloo on CPU,
    NCCL on GPU.
    """
    cpu_shims.apply()
    if dist.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in env:
        # A world of one, without touching os.environ (child processes must not
        # inherit a rank or a port that is already taken).
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend=backend, timeout=timeout)


def init_model_parallel(parallel, seed: int) -> None:
    """Megatron-Core's rank grid for `parallel` (a ParallelConfig) and the TP RNG seeds.

    Expert parallelism for PEER tables uses Megatron's expert groups with the
    expert tensor-parallel size equal to the tensor-parallel size: an expert
    group holds ranks with the same tensor rank and different data.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.tensor,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def on_cpu() -> bool:
    return not torch.cuda.is_available()
