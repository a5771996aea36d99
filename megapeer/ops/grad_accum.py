"""Gradient-accumulation fusion for PEER's expert tables.

Megatron's DDP keeps an fp32 `main_grad` per parameter and, after each micro-batch's
backward, adds the parameter's bf16 `.grad` into it. PEER's tables hold most of a PEER
model's parameters, so that add (and the dense bf16 gradient before it: written, zeros for
unchosen experts included, then read back) is a large share of a step. With an accumulator
(an alias of `table.main_grad`), the fused CUDA ops add the table gradient to it in fp32
inside their backward instead: the sorted walks read-modify-write the rows of the chosen
experts (each row has one writer, so no atomics and the same bits every run) and leave the
rows of experts nobody chose untouched. The table gets no gradient (None), so no bf16 table
gradient exists and DDP's hook adds nothing. The reference path routes its gradient the
same way with RouteGrad (the same result, unfused: what the tests compare). The grouped
Triton and gmm paths take plain gradients: their experts are all chosen, and fusing the
grouped scatter's read-modify-write measured slower than the separate add (H200,
docs/kernels.md).

Eager layers only: under torch.compile the accumulator (an alias of DDP's flat buffer) went
wrong in inductor (on an H200 under TP2 a generated copy ran from it to the end of the
buffer: an illegal memory access; on the CPU an alias over exactly its own bytes corrupted
the heap), so compiled layers take plain gradients.

`prepare_accumulators` (once, when the trainer wraps the model in DDP) sets up the
accumulators. Not with `overlap_grad_reduce`: there DDP's hook, which still runs after the
table's (missing) gradient, requires a gradient to mark the bucket ready; the tables then
take the plain path.
"""
import torch


class RouteGrad(torch.autograd.Function):
    """Identity on the table; its gradient is added to acc (fp32), the table gets none."""

    @staticmethod
    def forward(ctx, table, acc):
        ctx.save_for_backward(acc)
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):
        (acc,) = ctx.saved_tensors
        acc.add_(grad.to(acc.dtype))
        return None, None


def accumulator(table: torch.Tensor):
    """The fp32 accumulator of `table` for this forward (an alias of its main_grad, made by
    the hook of prepare_accumulators), when autograd will run in eager code; else None
    (plain gradients)."""
    acc = getattr(table, "_peer_acc", None)
    if (acc is None or not torch.is_grad_enabled() or not table.requires_grad
            or torch.compiler.is_compiling()):
        return None
    return acc


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory with its own version counter. main_grad is a view of
    DDP's flat buffer, whose version changes whenever any parameter's gradient is added
    between a layer's forward and backward, so autograd would reject it as a saved tensor.
    A fresh alias per forward also keeps pipelined micro-batches (several forwards before
    their backwards) apart: each changes only when its own backward adds to it."""
    a = torch.empty(0, dtype=t.dtype, device=t.device)
    return a.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def usable_main_grad(p) -> bool:
    """p has a main_grad a kernel can write in place: fp32, p's shape, contiguous."""
    g = getattr(p, "main_grad", None)
    return (g is not None and g.dtype == torch.float32 and g.shape == p.shape
            and g.is_contiguous())


def _refresh(tables):
    def hook(module, args, kwargs=None):
        for p in tables:
            p._peer_acc = _alias(p.main_grad)
    return hook


def prepare_accumulators(module: torch.nn.Module, enabled: bool = True) -> int:
    """Give each PEER table with model.peer.grad_accum_fusion and a usable main_grad (fp32,
    contiguous, the table's shape) an accumulator, renewed by a forward pre-hook on
    `module` (eager code, once per micro-batch; compiled layers see a new input, not a new
    graph). enabled=False removes them. Call after DDP set main_grad (training/step.py:
    wrap_ddp). Returns how many tables take the fusion."""
    old = getattr(module, "_peer_acc_hook", None)
    if old is not None:
        old.remove()
        module._peer_acc_hook = None
    # a compiled layer's PEER never reads its accumulator (see accumulator()): skip its
    # tables, so that the hook does not renew aliases nobody uses
    compiled = tuple(name + "." for name, sub in module.named_modules()
                     if getattr(sub, "_compiled_call_impl", None) is not None)
    tables = []
    for name, p in module.named_parameters():
        p._peer_acc = None
        if (enabled and not (compiled and name.startswith(compiled))
                and getattr(p, "peer_fused_accum", False) and usable_main_grad(p)):
            tables.append(p)
    if tables:
        module._peer_acc_hook = module.register_forward_pre_hook(_refresh(tables))
    return len(tables)
