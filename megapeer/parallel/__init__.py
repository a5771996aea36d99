"""Process groups and the CPU shims for Megatron-Core."""
from .state import destroy, device, init_distributed, init_model_parallel, on_cpu

__all__ = ["destroy", "device", "init_distributed", "init_model_parallel", "on_cpu"]
