"""PEER expert-step ops: reference (peer_ref) and fused CUDA (peer_cuda), chosen by `select`."""
from .dispatch import gather_axpy, gather_dot, kernel_status

__all__ = ["gather_axpy", "gather_dot", "kernel_status"]
