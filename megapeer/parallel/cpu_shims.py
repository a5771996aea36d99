"""Megatron-Core on a machine without CUDA: every workaround, in one place.

Megatron-Core 0.16.1 assumes CUDA in a few dozen places (device='cuda' literals,
torch.cuda.current_device(), CUDA RNG state, CUDA streams and events, CUDA tensor
type names). `apply()` makes those work on CPU tensors. It is applied only when
CUDA is absent, and is idempotent; `applied()` says whether it ran.

Two traps that give wrong results silently rather than crash (see
docs/architecture.md): interleaved pipeline schedules with batched p2p on gloo
(handled in parallel/state.py by turning batch_p2p_comm off on CPU), and the
MLA module believing Transformer Engine is present (HAVE_TE forced false here).
Each item has a test in tests/test_cpu_shims.py.
"""
import contextlib
import importlib

import torch

_APPLIED = False
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}

# Modules that create tensors with a literal device='cuda'; their `torch` is
# replaced by a proxy that maps that device to the CPU.
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # moves its inverse frequencies to torch.cuda.current_device() in every forward
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
              "empty_like", "zeros_like", "ones_like")


def _map_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")) or (
            isinstance(dev, torch.device) and dev.type == "cuda"):
        return torch.device("cpu")
    return dev


class _CpuTorch:
    """Forwards to `torch`, mapping device='cuda' of tensor factories to the CPU."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name == "cuda":
            return _CPU_CUDA
        attr = getattr(self._real, name)
        if name in _FACTORIES:
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _map_device(kwargs["device"])
                return attr(*args, **kwargs)
            return factory
        return attr


class _CpuCuda:
    """torch.cuda as the proxied modules see it: current_device() is a plain method, which
    torch.compile traces as a constant (the patched torch.cuda.current_device it treats as
    a torch op returning a non-tensor, and breaks the graph). Keep it a function of its
    own: given the patched function object itself, Dynamo broke the graph again."""

    def current_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_CPU_CUDA = _CpuCuda()


class _InertStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertEvent()

    def synchronize(self):
        pass


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def _null_stream_ctx(*args, **kwargs):
    yield


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    # Megatron asserts grad/param types by CUDA type name; report CUDA names for CPU
    # float tensors. Only reached on builds where no CUDA tensor can exist.
    if dtype is None and not kwargs:
        if self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return _ORIG_TYPE(self)
    return _ORIG_TYPE(self, dtype, non_blocking, **kwargs)


_ORIG_TYPE = torch.Tensor.type


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = _null_stream_ctx
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all (a no-op here): leave that one.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _tensor_type


def _patch_megatron():
    from megatron.core.tensor_parallel import random as mrandom
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # CUDA RNG and CPU RNG are one generator here: the tracker's "CPU RNG changed
    # inside a GPU RNG context" warning is expected, not a bug.
    import logging
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)

    for name in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(name)
        if not isinstance(mod.torch, _CpuTorch):
            mod.torch = _CpuTorch(torch)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except Exception:
        return False


def applied() -> bool:
    return _APPLIED


def apply() -> bool:
    """Install the CPU workarounds if CUDA is absent. Returns True if applied."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    _APPLIED = True
    return True
