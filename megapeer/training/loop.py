"""The train loop: one code path for 1 CPU process, torchrun on GPUs, and SLURM."""
import logging
import math
import os
import signal
import time

import torch
from megatron.core import parallel_state as ps

from ..config import config_to_dict, layer_kinds
from ..models import (build_model_chunks, compile_layers, flops_per_token, padded_vocab_size,
                      peer_modules)
from ..models.gpt import fused_cross_entropy_impl, param_dtype, transformer_config
from ..parallel import device, init_distributed, init_model_parallel
from . import checkpointing as ckpt
from .profiling import StepProfiler
from .optimizer import build_optimizer, build_scheduler, current_lr, optimizer_step
from .step import forward_backward, wrap_ddp

log = logging.getLogger("megapeer.train")

# Peak dense bf16 FLOP/s per device, for MFU when logging.peak_tflops is not set.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "GH200": 989.0}


class NonFiniteError(RuntimeError):
    pass


def _peak_flops(cfg):
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tf in _PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None  # CPU: MFU is not meaningful


class _SignalFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self, enabled):
        self.signum = 0
        self._pending = None
        if enabled:
            for s in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def any_rank(self) -> int:
        """The largest signal any rank received: the same answer on every rank. With
        several ranks it is the answer of the previous call (one step late): this step's
        all-reduce is read at the next, so that reading it never makes the host wait for
        the GPU (on GPUs the result comes back by an asynchronous copy)."""
        if torch.distributed.get_world_size() == 1:
            return self.signum
        seen = 0
        if self._pending is not None:
            host, done = self._pending
            if done is not None:
                done.synchronize()   # recorded a step ago: long passed
            seen = int(host[0])
        t = torch.full((1,), self.signum, dtype=torch.int64, device=device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if t.is_cuda:
            host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done)
        else:
            self._pending = (t, None)   # gloo's all-reduce has finished
        return seen


def _fault_steps():
    """Test hook: MEGAPEER_FAULT_NAN_STEPS="5,6" makes those steps' loss NaN."""
    raw = os.environ.get("MEGAPEER_FAULT_NAN_STEPS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def _setup_logging():
    rank = torch.distributed.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore", module="megatron")


def _build_data(cfg, tokenizer, consumed_train, consumed_valid, n_chunks):
    from ..data import BatchIterator, build_datasets
    t = cfg.training
    n_evals = t.train_iters // t.eval_interval + 2 if t.eval_interval > 0 else 0
    samples = (t.train_iters * t.global_batch_size, n_evals * t.eval_iters * t.global_batch_size,
               0)
    train_ds, valid_ds, _ = build_datasets(cfg.data, cfg.model.seq_length, samples, tokenizer)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mk = lambda ds, c: [BatchIterator(ds, t.micro_batch_size, c, r, dp, cfg.data.num_workers)
                        for _ in range(n_chunks)]
    valid = mk(valid_ds, consumed_valid) if (valid_ds is not None and n_evals) else None
    return mk(train_ds, consumed_train), valid


def _deterministic():
    """training.deterministic: torch's deterministic algorithms everywhere (on the CPU the
    reference PEER backward's index_put sums in a fixed order; on a GPU the PEER kernels
    switch to their deterministic forms and cuBLAS gets a fixed workspace)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def train(cfg):
    """Train according to `cfg` (a validated Config). Returns the final train state."""
    init_distributed()
    _setup_logging()
    rank = torch.distributed.get_rank()
    if cfg.training.deterministic:
        _deterministic()
    init_model_parallel(cfg.parallel, cfg.training.seed)
    t, m = cfg.training, cfg.model
    run_dir = cfg.logging.run_dir
    ckpt_root = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)

    from ..data import build_tokenizer
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer.path} has {tokenizer.vocab_size} "
                         f"tokens but model.vocab_size is {m.vocab_size}")

    tcfg = transformer_config(m, cfg.parallel, t)
    chunks = build_model_chunks(cfg, tcfg)
    if t.compile:
        log.info("training.compile: %d transformer layers compiled with torch.compile, "
                 "mode %s (the first steps include compilation)",
                 compile_layers(chunks, t.compile_mode), t.compile_mode)
    dist_opt = t.use_distributed_optimizer
    if dist_opt:
        # Measured on an H200 and on CPU (2026-11-28): megatron-core 0.16.1 cannot save
        # the DistributedOptimizer's state through dist_checkpointing ("ShardedTensor.
        # flattened_range is not supported"), so a run using it could not resume.
        log.warning("training.use_distributed_optimizer: the DistributedOptimizer's state "
                    "cannot be checkpointed with megatron-core 0.16.1; using the standard "
                    "(replicated) optimizer instead")
        dist_opt = False
    ddp = wrap_ddp(chunks, tcfg, dist_opt, t.overlap_grad_reduce, t.triton_grad_add)
    dtype = param_dtype(t)
    optimizer = build_optimizer(ddp, t, dtype, distributed=dist_opt)
    scheduler = build_scheduler(optimizer, t)

    state = {"iteration": 0, "consumed_train": 0, "consumed_valid": 0, "skipped_steps": 0}
    resume_dir = ckpt.find_resume_point(cfg.checkpoint, ckpt_root)
    if resume_dir:
        saved = ckpt.load_checkpoint(resume_dir, ddp, optimizer, scheduler)
        state.update({k: saved[k] for k in state if k in saved})
        if saved.get("model_only"):
            log.info("initialised weights from %s (model only: fresh optimizer and data "
                     "stream)", resume_dir)
        else:
            log.info("resumed from %s at step %d (rng %s)", resume_dir, state["iteration"],
                     "restored" if saved["rng_restored"] else "not restored: layout changed")

    from .expert_usage import collect_expert_usage
    from .metrics import MetricsLogger, memory_gib
    metrics = MetricsLogger(cfg.logging, run_dir, config_to_dict(cfg), t.train_iters,
                            enabled=rank == 0)
    dp = ps.get_data_parallel_world_size()
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if rank == 0:
        metrics.truncate_after(state["iteration"])
        _log_model_summary(cfg, chunks, n_micro)

    train_iters, valid_iters = _build_data(cfg, tokenizer, state["consumed_train"],
                                           state["consumed_valid"], len(ddp))
    peers = peer_modules(chunks)
    for p in peers:
        p.track_usage(True)
    flops_tok = flops_per_token(m, vocab_size=padded_vocab_size(m, cfg.parallel.tensor))
    peak = _peak_flops(cfg)
    world = torch.distributed.get_world_size()
    tokens_per_step = t.global_batch_size * m.seq_length
    flag = _SignalFlag(cfg.checkpoint.save_on_signal)
    if cfg.checkpoint.save and cfg.checkpoint.save_on_signal:  # the first save waits for it
        ckpt.start_signal_proof_writer_helper(background=True)
    faults = _fault_steps()
    nonfinite_run = 0
    last_saved = state["iteration"] if resume_dir else -1

    def save(it):
        nonlocal last_saved
        if last_saved == it or not cfg.checkpoint.save:
            return
        state["consumed_train"] = train_iters[0].consumed_samples
        state["consumed_valid"] = valid_iters[0].consumed_samples if valid_iters else 0
        ckpt.save_checkpoint(ckpt_root, it, ddp, optimizer, scheduler, state, cfg,
                             cfg.checkpoint.keep_last)
        last_saved = it
        log.info("saved checkpoint at step %d", it)

    for c in ddp:
        c.train()
    window_t0, window_steps = time.time(), 0
    it = state["iteration"]
    prof = StepProfiler(cfg.logging.profile_steps, os.path.join(run_dir, "profile"), rank)
    while it < t.train_iters:
        with prof.step(it + 1):
            for c in ddp:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            loss = forward_backward(ddp, train_iters, n_micro, m.seq_length,
                                    t.micro_batch_size)
            if (it + 1) in faults:
                _poison_grads(ddp)
            # Skipped when the gradient norm is not finite (a NaN / Inf loss makes NaN
            # gradients). The loss stays on the device until it is logged: reading it
            # every step made the host wait for the GPU (bench/sync_check.py).
            stepped, grad_norm = optimizer_step(optimizer, t.clip_grad)
        if stepped:
            scheduler.step(increment=1)
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            state["skipped_steps"] += 1
            log.warning("step %d: non-finite loss %.4g or grad norm %.4g: update skipped "
                        "(%d in a row)", it + 1, float(loss), grad_norm, nonfinite_run)
            if nonfinite_run >= t.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{nonfinite_run} consecutive non-finite steps (training."
                    f"max_consecutive_nonfinite={t.max_consecutive_nonfinite}); stopping at step "
                    f"{it + 1}. The last good checkpoint is kept in {ckpt_root}.")
        it += 1
        state["iteration"] = it
        window_steps += 1

        if it % cfg.logging.log_interval == 0 or it == t.train_iters:
            dt = (time.time() - window_t0) / window_steps
            tps = tokens_per_step / dt
            metrics.log_step(it, {
                "loss": float(loss), "lr": current_lr(optimizer), "grad_norm": grad_norm,
                "tokens_per_s": tps, "step_time_s": dt,
                "mfu": (flops_tok * tps / (world * peak)) if peak else None,
                "tokens": it * tokens_per_step, "skipped_steps": state["skipped_steps"],
                "mem_gib": memory_gib()})
            window_t0, window_steps = time.time(), 0
        if peers and cfg.logging.expert_usage_interval > 0 and \
                it % cfg.logging.expert_usage_interval == 0:
            usage = collect_expert_usage(peers, ps.get_data_parallel_group())
            if rank == 0 and usage:
                metrics.log_expert_usage(it, usage)
        if valid_iters and t.eval_interval > 0 and (it % t.eval_interval == 0
                                                    or it == t.train_iters):
            vloss = evaluate(ddp, valid_iters, t.eval_iters, n_micro, m.seq_length,
                             t.micro_batch_size)
            metrics.log_eval(it, {"loss": vloss, "ppl": math.exp(min(vloss, 50.0))})
        if cfg.checkpoint.save_interval > 0 and it % cfg.checkpoint.save_interval == 0:
            save(it)
        if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
            log.info("training.exit_interval=%d: saving at step %d and stopping",
                     t.exit_interval, it)
            save(it)
            metrics.close()
            state["exited_at"] = it
            return state
        sig = flag.any_rank()
        if sig:
            log.info("signal %d received: saving at step %d and stopping", sig, it)
            save(it)
            metrics.close()
            state["stopped_by_signal"] = sig
            return state
    metrics.plot_run()  # drawn by the plot worker while the last checkpoint is written
    save(it)
    metrics.close()     # waits for the figures
    return state


def _poison_grads(ddp):
    for c in ddp:
        for p in c.parameters():
            g = getattr(p, "main_grad", None)
            (g if g is not None else p.grad).fill_(float("nan"))
            return


def evaluate(ddp, iters, eval_iters, n_micro, seq, mbs):
    """Mean validation loss over eval_iters global batches."""
    for c in ddp:
        c.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(eval_iters):
            total += float(forward_backward(ddp, iters, n_micro, seq, mbs, forward_only=True))
    for c in ddp:
        c.train()
    return total / eval_iters


def _log_model_summary(cfg, chunks, n_micro):
    from ..models import param_counts
    from .. models.layer_specs import attention_backend
    m = cfg.model
    ce = fused_cross_entropy_impl(cfg.training)
    if ce:
        log.info("cross-entropy: fused (%s, training.fused_cross_entropy)",
                 "Transformer Engine" if ce == "te" else "Megatron's native kernel")
    pc = param_counts(m, padded_vocab_size(m, 1))
    log.info("model: %d layers (%s), %.2fM params total, %.2fM active per token, "
             "%.2fM in PEER tables; attention: %s", m.num_layers, "".join(layer_kinds(m)),
             pc["total"] / 1e6, pc["active"] / 1e6, pc["peer_tables"] / 1e6,
             "Transformer Engine" if attention_backend(m) == "te" else "torch SDPA (local spec)")
    from ..ops import kernel_status
    ok, why = kernel_status()
    if m.peer.kernel == "grouped":
        what = "grouped Triton kernels"
    elif m.peer.kernel == "gmm":
        what = "torch grouped GEMM (torch._grouped_mm)"
    elif m.peer.kernel == "reference":
        what = "reference (forced)"
    else:
        what = "fused CUDA" if ok else f"reference ({why})"
        if torch.cuda.is_available():   # auto: the shapes may pick the grouped kernels
            from ..ops import peer_grouped
            from ..ops.dispatch import prefers_grouped
            n_exp, w = math.prod(m.peer.num_experts), m.peer.expert_hidden
            pairs = cfg.training.micro_batch_size * m.seq_length * m.peer.heads * m.peer.topk
            if prefers_grouped(pairs, n_exp * w, w) and peer_grouped.available()[0]:
                what = (f"grouped Triton kernels (experts of width {w}, ~{pairs / n_exp:.0f} "
                        f"pairs each per micro-batch)")
    log.info("PEER expert kernel: %s (model.peer.kernel=%s)", what, m.peer.kernel)
    if "P" in "".join(layer_kinds(m)):
        if not m.peer.grad_accum_fusion or cfg.training.overlap_grad_reduce:
            acc = "plain (DDP adds them to main_grad)"
        elif cfg.training.compile:
            acc = "plain (compiled layers do not fuse the accumulation)"
        elif what.startswith(("fused", "reference")):
            acc = "added to the fp32 main_grad inside the expert ops (model.peer.grad_accum_fusion)"
        else:
            acc = "plain (the grouped and gmm paths do not fuse the accumulation)"
        if m.peer.defer_table_grads > 1:
            off = _defer_unused(chunks, what, n_micro)
            n = min(m.peer.defer_table_grads, n_micro)
            acc += (f"; model.peer.defer_table_grads={m.peer.defer_table_grads} has no effect "
                    f"here: {off}" if off else f"; computed once per {m.peer.defer_table_grads} "
                    f"micro-batches (model.peer.defer_table_grads; their inputs held meanwhile: "
                    f"~{_defer_buffer_gib(chunks, cfg, n):.1f} GiB on this rank)")
        log.info("PEER table gradients: %s", acc)


def _defer_buffer_gib(chunks, cfg, n):
    """The deferral's pass buffers on this rank (ops/table_grads.py): per PEER layer and
    micro-batch, for U and V, the coefficients [pairs, m] and token rows [tokens, d]."""
    total = 0
    for layer in peer_modules(chunks):
        tokens = cfg.training.micro_batch_size * cfg.model.seq_length * layer.ep_size
        pairs = tokens * layer.peer.heads * layer.peer.topk
        total += 2 * (pairs * layer.m + tokens * layer.d_local) * layer.U.element_size()
    return n * total / 2 ** 30


def _defer_unused(chunks, kernel_what, n_micro):
    """Why deferred table gradients would not run in this setup (None when they do)."""
    from ..ops import peer_grouped
    if n_micro < 2:
        return "one micro-batch per step"
    if not kernel_what.startswith("grouped"):
        return "they need the grouped Triton kernels (model.peer.kernel)"
    layer = next(iter(peer_modules(chunks)), None)
    if layer is not None and not peer_grouped.takes_expert_order(layer.U, layer.U, layer.m):
        return ("they need the expert-ordered form: experts at least 65 wide "
                "(model.peer.expert_hidden) in bf16 with 16-byte rows")
    return None
