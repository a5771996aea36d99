"""training.compile on a GPU: per-step losses of eager, compiled and CUDA-graph runs.

The same model (same seed), the same random batches, a few full training steps per
mode; prints each mode's losses and the largest relative difference from eager.
A correctness check for the compiled paths on the device (CPU runs are covered by
tests/test_train.py); bf16 runs agree to about 1e-2 relative.

  python bench/compile_check.py [--size 100m] [--steps 8]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_throughput import GPU_100M, GPU_100M_PEER, TINY, TINY_PEER  # noqa: E402


def losses(overrides, mode, steps):
    from megapeer.config import load_config
    from megapeer.models import build_model_chunks, compile_layers
    from megapeer.models.gpt import param_dtype, transformer_config
    from megapeer.parallel import init_model_parallel
    from megapeer.training.optimizer import build_optimizer, optimizer_step
    from megapeer.training.step import forward_backward, wrap_ddp
    cfg = load_config(overrides=overrides, world_size=1)
    init_model_parallel(cfg.parallel, 1234)
    m, t = cfg.model, cfg.training
    tcfg = transformer_config(m, cfg.parallel, t)
    chunks = build_model_chunks(cfg, tcfg)
    if mode != "eager":
        compile_layers(chunks, mode)
    ddp = wrap_ddp(chunks, tcfg, triton_grad_add=t.triton_grad_add)
    opt = build_optimizer(ddp, t, param_dtype(t))
    S, B = m.seq_length, t.micro_batch_size
    n_micro = t.global_batch_size // B
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        batches = []
        for _ in range(n_micro):
            toks = torch.randint(0, m.vocab_size, (B, S + 1), generator=g)
            batches.append({"tokens": toks[:, :-1], "labels": toks[:, 1:],
                            "loss_mask": torch.ones(B, S),
                            "position_ids": torch.arange(S).expand(B, S)})
        for c in ddp:
            c.zero_grad_buffer()
        opt.zero_grad()
        loss = forward_backward(ddp, [iter(batches)], n_micro, S, B)
        optimizer_step(opt, t.clip_grad)
        out.append(float(loss))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="100m", choices=["100m", "tiny"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="eager,default,reduce-overhead")
    a = ap.parse_args()
    from megapeer.parallel import init_distributed
    init_distributed()
    ov = (GPU_100M + GPU_100M_PEER + ["training.micro_batch_size=2",
                                      "training.global_batch_size=4", "training.lr=1e-3"]
          if a.size == "100m" else TINY + TINY_PEER)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    res = {mode: losses(ov, mode, a.steps) for mode in a.modes.split(",")}
    print(f"# {card}, {a.size} MLA+PEER, {a.steps} steps")
    ref = res.get("eager")
    for mode, ls in res.items():
        d = max(abs(x - y) / abs(y) for x, y in zip(ls, ref)) if ref else float("nan")
        print(f"{mode:16s} max rel diff vs eager {d:.2e}  " + " ".join(f"{x:.4f}" for x in ls))


if __name__ == "__main__":
    main()
