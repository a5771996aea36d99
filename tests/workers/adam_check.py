"""ops/adam.py against torch's AdamW, op and trainer level (tests/test_adam.py).

Run with TRITON_INTERPRET=1 on a CPU (the Triton interpreter), or on a GPU. Prints one
JSON line: per op case the largest relative differences of p, m, v from torch's AdamW
(fresh random tensors and state) and whether the written model copy is p rounded; then
the tiny MLA+PEER (bf16 parameters) trained with training.triton_adam on (every tensor on
the kernel: MIN_NUMEL 0) and off: per-step losses, kernel calls, whether every model
parameter equalled its rounded main parameter after every step, and the largest relative
difference of the main parameters and their Adam moments after the first step.
  adam_check.py CLIP_GRAD FUSED [RESUME_DIR]   (FUSED 1: torch's fused Adam groups on a CPU
  as well; RESUME_DIR: instead, 6 steps straight against 3, a checkpoint there, a fresh
  build loading it and 3 more, all with the kernel)
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.train_throughput import TINY, TINY_PEER  # noqa: E402
from megapeer.ops import adam  # noqa: E402


def _rel(a, b, scale=None):
    """max |a - b| over the largest |b|, or over the largest of `scale` where the update's
    terms cancel (a moment's new value can be far smaller than the terms that make it)."""
    s = (b if scale is None else scale).double().abs().max().clamp_min(1e-30)
    return float((a.double() - b.double()).abs().max() / s)


def op_cases(dev, g):
    out = {}
    for n in (1, 1000, adam.BLOCK, 3 * adam.BLOCK + 5):
        for wd, gmul, t in ((0.0, 1.0, 1), (0.1, 1.0, 7), (0.1, 0.3, 3)):
            p = torch.randn(n, generator=g)
            grad = torch.randn(n, generator=g)
            m = torch.randn(n, generator=g) * 0.1
            v = torch.rand(n, generator=g) * 0.01
            lr, b1, b2, eps = float(torch.rand((), generator=g)) * 1e-2, 0.9, 0.95, 1e-8
            ref = torch.nn.Parameter(p.clone())
            opt = torch.optim.AdamW([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                                    foreach=False)
            opt.state[ref] = {"step": torch.tensor(float(t - 1)), "exp_avg": m.clone(),
                              "exp_avg_sq": v.clone()}
            ref.grad = grad * gmul
            opt.step()
            P, G, M, Vv = (x.clone().to(dev) for x in (p, grad, m, v))
            out16 = torch.empty(n, dtype=torch.bfloat16, device=dev)
            step = torch.tensor(float(t), device=dev)
            adam.adamw_copy_(P, G, M, Vv, out16, step, lr, b1, b2, eps, wd, gmul)
            st = opt.state[ref]
            out[f"n{n}_wd{wd}_g{gmul}_t{t}"] = {
                "p": _rel(P.cpu(), ref.detach()),
                "m": _rel(M.cpu(), st["exp_avg"], b1 * m.abs() + (1 - b1) * (grad * gmul).abs()),
                "v": _rel(Vv.cpu(), st["exp_avg_sq"]),
                "copy": bool(torch.equal(out16, P.to(torch.bfloat16))),
                "grad_kept": bool(torch.equal(G.cpu(), grad))}
    return out


def _batches(m, t, steps, seed):
    g = torch.Generator().manual_seed(seed)
    S, B = m.seq_length, t.micro_batch_size
    out = []
    for _ in range(steps):
        toks = torch.randint(0, m.vocab_size, (B, S + 1), generator=g)
        out.append({"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": torch.ones(B, S),
                    "position_ids": torch.arange(S).expand(B, S)})
    return out


def _build(cfg):
    """(DDP chunks, Megatron optimizer) of cfg's model, seeded the same every time."""
    from megapeer.models import build_model_chunks
    from megapeer.models.gpt import param_dtype, transformer_config
    from megapeer.parallel import init_model_parallel
    from megapeer.training.optimizer import build_optimizer
    from megapeer.training.step import wrap_ddp
    init_model_parallel(cfg.parallel, 1234)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.training)
    ddp = wrap_ddp(build_model_chunks(cfg, tcfg), tcfg)
    return ddp, build_optimizer(ddp, cfg.training, param_dtype(cfg.training))


def _step(cfg, ddp, opt, batch):
    """One training step as the trainer runs it; returns the loss."""
    from megapeer.training.optimizer import optimizer_step
    from megapeer.training.step import forward_backward
    for c in ddp:
        c.zero_grad_buffer()
    opt.zero_grad()
    loss = forward_backward(ddp, [iter([batch])], 1, cfg.model.seq_length,
                            cfg.training.micro_batch_size)
    optimizer_step(opt, cfg.training.clip_grad)
    return float(loss)


def _subs(opt):
    return getattr(opt, "chained_optimizers", [opt])


def train(overrides, steps, on):
    from megapeer.config import load_config
    cfg = load_config(overrides=overrides + [f"training.triton_adam={str(on).lower()}"],
                      world_size=1)
    ddp, opt = _build(cfg)
    losses, copies_equal, first = [], True, None
    for it, batch in enumerate(_batches(cfg.model, cfg.training, steps, 0)):
        losses.append(_step(cfg, ddp, opt, batch))
        for sub in _subs(opt):
            for models, mains in zip(sub.float16_groups, sub.fp32_from_float16_groups):
                for a, b in zip(models, mains):
                    copies_equal &= bool(torch.equal(a, b.to(a.dtype)))
        if it == 0:   # main parameters and their Adam moments
            first = [x.detach().clone() for sub in _subs(opt)
                     for grp in sub.fp32_from_float16_groups for b in grp
                     for x in (b, sub.optimizer.state[b]["exp_avg"],
                               sub.optimizer.state[b]["exp_avg_sq"])]
    return losses, copies_equal, first


def resume(overrides, steps, cut, root):
    """training.triton_adam through a checkpoint: `steps` steps straight, and the same run
    saved after `cut` steps (training/checkpointing.py), rebuilt, loaded and continued.
    Returns (losses straight, losses after the load, whether every main parameter ends
    bitwise equal, kernel calls after the load)."""
    from megapeer.config import load_config
    from megapeer.training import checkpointing as ckpt
    from megapeer.training.optimizer import build_scheduler
    cfg = load_config(overrides=overrides + ["training.triton_adam=true"], world_size=1)
    batches = _batches(cfg.model, cfg.training, steps, 1)

    def build():
        ddp, opt = _build(cfg)
        return ddp, opt, build_scheduler(opt, cfg.training)

    def run(ddp, opt, sched, its):
        losses = []
        for it in its:
            losses.append(_step(cfg, ddp, opt, batches[it]))
            sched.step(increment=1)
        return losses

    def mains(opt):
        return [b.detach().clone() for sub in _subs(opt)
                for grp in sub.fp32_from_float16_groups for b in grp]

    ddp, opt, sched = build()
    straight = run(ddp, opt, sched, range(steps))
    end = mains(opt)
    ddp, opt, sched = build()
    run(ddp, opt, sched, range(cut))
    ckpt.save_checkpoint(root, cut, ddp, opt, sched, {}, cfg)
    ddp, opt, sched = build()
    ckpt.load_checkpoint(os.path.join(root, ckpt.iter_name(cut)), ddp, opt, sched)
    n0 = len(CALLS)
    after = run(ddp, opt, sched, range(cut, steps))
    same = all(torch.equal(a, b) for a, b in zip(mains(opt), end))
    return straight, after, same, len(CALLS) - n0


CALLS = []   # the clip factor of each kernel call (main's spy)


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    resume_dir = sys.argv[3] if len(sys.argv) > 3 else None
    small_taken = adam.takes(torch.zeros(adam.MIN_NUMEL - 1, device=dev),
                             torch.zeros(adam.MIN_NUMEL - 1, device=dev, dtype=torch.bfloat16))
    ops = None if resume_dir else op_cases(dev, g)
    from megapeer.parallel import init_distributed
    init_distributed()
    adam.MIN_NUMEL = 0   # every size here (the tiny model's parameters included)
    calls = CALLS
    real = adam.adamw_copy_

    def spy(*a, **k):
        calls.append(a[11])   # the clip factor gmul
        return real(*a, **k)

    adam.adamw_copy_ = spy
    if sys.argv[2] == "1":   # torch's fused Adam groups on the CPU too: clipping by the
        from megapeer.training import optimizer as O   # clip factor (gmul) in the kernel
        O._fusable = lambda p: True
    ov = TINY + TINY_PEER + ["training.precision=bf16", "training.global_batch_size=2",
                             "training.lr=3e-3", "training.clip_grad=" + sys.argv[1]]
    if resume_dir:   # the checkpoint round trip only
        straight, after, same, n = resume(ov + ["training.train_iters=6",
                                                "training.warmup_iters=2"], 6, 3, resume_dir)
        print(json.dumps({"straight": straight, "after": after, "mains_equal": same,
                          "kernel_calls_after": n}))
        return
    fast, fast_eq, fast1 = train(ov, 4, True)
    n_fast = len(calls)
    plain, plain_eq, plain1 = train(ov, 4, False)
    print(json.dumps({"ops": ops, "small_taken": small_taken, "fast": fast, "plain": plain,
                      "kernel_calls": n_fast, "plain_calls": len(calls) - n_fast,
                      "gmul_below_1": sum(1 for x in calls[:n_fast] if x < 1.0),
                      "copies_equal": fast_eq and plain_eq,
                      "first_step_main_rel": max(_rel(a, b) for a, b in zip(fast1, plain1))}))


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
