"""One training (or evaluation) step through Megatron-Core's schedules.

Used by the train loop, evaluation and the parallel-correctness tests alike, so
that what the tests prove is what training runs.
"""
import contextlib
import functools

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.cuda_graphs import is_graph_capturing

from ..ops import grad_add, table_grads
from ..ops.grad_accum import prepare_accumulators
from ..parallel import device


def loss_func(loss_mask, output_tensor):
    """Mean token loss of a micro-batch; the schedule averages over micro-batches."""
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator) if data_iterator is not None else None
    dev = device()
    if batch is None:  # middle pipeline stage: no data needed
        batch = {}
    tokens = batch["tokens"].to(dev, non_blocking=True) if "tokens" in batch else None
    pos = batch["position_ids"].to(dev, non_blocking=True) if "position_ids" in batch else None
    labels = batch["labels"].to(dev, non_blocking=True) if "labels" in batch else None
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True) if "loss_mask" in batch else None
    output = model(tokens, pos, None, labels=labels)

    def _loss(output_tensor):
        return loss_func(loss_mask, output_tensor)
    return output, _loss


class GradAddDDP(DDP):
    """Megatron's DDP whose backward hook adds a parameter's gradient to its main_grad with
    ops/grad_add.py's kernel (training.triton_grad_add), then lets Megatron's own hook run
    (it sees the add done, drops the gradient and marks the bucket ready as before)."""

    def _make_backward_post_hook(self, param):
        megatron_hook = super()._make_backward_post_hook(param)

        def hook(*unused):
            g = param.grad
            if (g is None or param.grad_added_to_main_grad or is_graph_capturing()
                    or getattr(param, "zero_out_wgrad", False)
                    or param not in self.param_to_bucket_group
                    or not grad_add.takes(param.main_grad, g)):
                return megatron_hook(*unused)
            grad_add.add_(param.main_grad, g)
            param.grad_added_to_main_grad = True
            try:
                return megatron_hook(*unused)
            finally:
                param.grad_added_to_main_grad = False
        return hook


def wrap_ddp(chunks, tcfg, use_distributed_optimizer=False, overlap_grad_reduce=False,
             triton_grad_add=True):
    """Megatron DDP around each chunk; sets the config hooks the schedules call.
    triton_grad_add: main_grad += grad by ops/grad_add.py where it can run (GradAddDDP)."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    cls = GradAddDDP if triton_grad_add and grad_add.available() else DDP
    wrapped = [cls(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
               for i, c in enumerate(chunks)]
    for m in wrapped:   # PEER tables' gradients straight into main_grad (ops/grad_accum.py)
        prepare_accumulators(m.module, enabled=not overlap_grad_reduce)
        _deferred_tables(m, overlap_grad_reduce)
    tcfg.no_sync_func = [m.no_sync for m in wrapped]
    if len(wrapped) == 1:
        tcfg.no_sync_func = tcfg.no_sync_func[0]
    if overlap_grad_reduce:
        tcfg.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if len(wrapped) == 1:
            tcfg.grad_sync_func = tcfg.grad_sync_func[0]
    tcfg.finalize_model_grads_func = _finalize_grads
    return wrapped


def _deferred_tables(ddp, overlap_grad_reduce):
    """Deferred PEER table gradients (ops/table_grads.py) reach main_grad outside autograd,
    so DDP's hook never runs for them: under an overlapped reduction each such table tells
    its bucket itself (as the hook would, once per gradient). DDP's zero_grad_buffer also
    tells table_grads that their main_grads are zero (the first deferred gradient of a step
    is then stored rather than added), and skips the tables whose whole main_grad the last
    step's first write stored (table_grads.stored_whole; LAZY_TABLE_ZEROING): that store
    overwrites it again, and table_grads zeroes it if another kind of write comes first
    or none comes."""
    tables = [p for p in ddp.module.parameters() if table_grads.tracked(p)]
    for p in tables:
        p._defer_ready = (functools.partial(_register_ready, ddp, p) if overlap_grad_reduce
                          and p in ddp.param_to_bucket_group else None)
    if tables:
        zero = ddp.zero_grad_buffer

        def zero_grad_buffer(*args, **kwargs):
            keep = [p for p in tables if LAZY_TABLE_ZEROING and table_grads.stored_whole(p)]
            with _zeroing_skips(ddp, keep):
                zero(*args, **kwargs)
            table_grads.zeroed(tables, stale=keep)
        ddp.zero_grad_buffer = zero_grad_buffer


# The PEER tables' main_grads hold most of a PEER model's gradient buffer (the 1.3B
# benchmark model: 12.9 GB of fp32); their zeroing is skipped where a store follows.
LAZY_TABLE_ZEROING = True


@contextlib.contextmanager
def _zeroing_skips(ddp, params):
    """Inside: each of ddp's gradient buffers' reset zeroes all but params' main_grads."""
    patched = []
    for buf in ddp.buffers + ddp.expert_parallel_buffers:
        spans = sorted(buf.param_index_map[p][:2] for p in params if p in buf.param_index_map)
        if spans:
            buf.reset = functools.partial(_zero_outside, buf.grad_data, spans)
            patched.append(buf)
    try:
        yield
    finally:
        for buf in patched:
            del buf.reset   # the class's reset again


def _zero_outside(data, spans):
    start = 0
    for a, b in spans:
        if a > start:
            data[start:a].zero_()
        start = max(start, b)
    if start < data.numel():
        data[start:].zero_()


def _register_ready(ddp, p):
    ddp.param_to_bucket_group[p].register_grad_ready(p, ddp.force_all_reduce)


def _finalize_grads(*args, **kwargs):
    # labelled so that profiles can tell the gradient reduction apart (profiling.py)
    with torch.profiler.record_function("grad_sync"):
        table_grads.settle()   # stale table main_grads no gradient reached: zeroed now
        return finalize_model_grads(*args, **kwargs)


def forward_backward(chunks, data_iterators, num_microbatches, seq_length, micro_batch_size,
                     forward_only=False):
    """Run the schedule; returns the mean loss over micro-batches (on every rank)."""
    fb = get_forward_backward_func()
    iters = data_iterators if len(chunks) > 1 else data_iterators[0]
    # deferred PEER table gradients (model.peer.defer_table_grads) complete inside the step
    with contextlib.nullcontext() if forward_only else table_grads.step(num_microbatches):
        losses = fb(forward_step_func=forward_step, data_iterator=iters,
                    model=chunks if len(chunks) > 1 else chunks[0],
                    num_microbatches=num_microbatches, seq_length=seq_length,
                    micro_batch_size=micro_batch_size, forward_only=forward_only)
    dev = device()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        val = torch.stack([x["lm loss"] for x in losses]).mean().to(dev) if losses else \
            torch.zeros((), device=dev)
    else:
        val = torch.zeros((), device=dev)
    # last stage -> all stages (sum over the pipeline group; only the last is non-zero)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(val, group=ps.get_pipeline_model_parallel_group())
    dp = ps.get_data_parallel_world_size()
    if dp > 1:  # global batch loss = mean over data-parallel ranks
        torch.distributed.all_reduce(val, group=ps.get_data_parallel_group())
        val /= dp
    return val
