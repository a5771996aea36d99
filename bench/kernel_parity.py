"""PEER kernel paths in real training: the same run (same data, seed and weights) with each
model.peer.kernel, through the trainer; per-step losses and gradient norms against the
first path, and tokens/s of each.

  python bench/kernel_parity.py --data DIR [--kernels fused,grouped] [--steps 20] [k=v ...]

A kernel named twice (grouped,grouped#2) is run twice: how far one path drifts from itself.
A name ending in +nofuse runs that kernel with model.peer.grad_accum_fusion=false (the table
gradients added to Megatron's main_grad by its hook, not by the PEER ops).

Default model (GPU): the ~100M MLA+PEER of bench/train_throughput.py with experts of
width 16 (64^2 per PEER layer, h=16, k=32: hundreds of tokens per expert, the regime of
the grouped kernels), bf16. --size tiny: a CPU smoke run (reference vs grouped with
TRITON_INTERPRET=1).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.train_throughput import GPU_100M, TINY, TINY_PEER  # noqa: E402
from bench.trainer_runs import train, train_records  # noqa: E402

WIDE_PEER = ["model.layer_pattern=DP", "model.peer.num_experts=[64,64]",
             "model.peer.expert_hidden=16", "model.peer.heads=16", "model.peer.topk=32",
             "model.peer.key_dim=128"]
SIZES = {"100m": GPU_100M + WIDE_PEER + ["training.global_batch_size=16",
                                         "training.micro_batch_size=4"],
         "tiny": TINY + TINY_PEER + ["model.peer.expert_hidden=16"]}


def run(name, a):
    """name: a model.peer.kernel value, value#n for a repeat of it, value+nofuse without
    gradient-accumulation fusion."""
    kernel = name.split("#")[0]
    fuse = not kernel.endswith("+nofuse")
    kernel = kernel.removesuffix("+nofuse")
    run_dir = os.path.join(a.out, name.replace("#", "_").replace("+", "_"))
    p = train(run_dir, a.data, a.steps, [
        *SIZES[a.size], "checkpoint.save=false", "checkpoint.resume=none",
        f"model.peer.kernel={kernel}", f"model.peer.grad_accum_fusion={str(fuse).lower()}",
        *a.overrides], timeout=a.timeout)
    if p.returncode:
        print(f"{kernel}: FAILED ({p.returncode})\n{p.stderr[-2000:]}", flush=True)
        return None
    recs = train_records(run_dir)
    tps = sorted(r["tokens_per_s"] for r in (recs[3:] or recs))   # after warm-up steps
    return {"loss": {r["step"]: r["loss"] for r in recs},
            "grad_norm": {r["step"]: r["grad_norm"] for r in recs},
            "tokens_per_s": tps[len(tps) // 2]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder from python -m megapeer.data.demo")
    ap.add_argument("--kernels", default="fused,grouped")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", default="100m", choices=sorted(SIZES))
    ap.add_argument("--out", default="/tmp/kernel_parity")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    res = {k: run(k, a) for k in a.kernels.split(",")}
    first = a.kernels.split(",")[0]
    ref = res[first]
    print(f"\n{card}, {a.size}, {a.steps} steps; losses against {first}")
    print(f"{'kernel':10s} {'loss[1]':>8s} {'loss[end]':>9s} {'max |dloss|':>11s} "
          f"{'max rel':>8s} {'grad norm rel':>13s} {'tok/s':>9s}")
    for k, r in res.items():
        if not r or not ref:
            continue
        d = [abs(r["loss"][s] - ref["loss"][s]) for s in ref["loss"]]
        rel = max(x / abs(ref["loss"][s]) for x, s in zip(d, ref["loss"]))
        gn = max(abs(r["grad_norm"][s] - g) / abs(g) for s, g in ref["grad_norm"].items())
        print(f"{k:10s} {r['loss'][1]:8.4f} {r['loss'][a.steps]:9.4f} {max(d):11.2e} "
              f"{rel:8.1e} {gn:13.1e} {r['tokens_per_s']:9.0f}")
    if a.json:
        json.dump({"card": card, "size": a.size, "results": res}, open(a.json, "w"), indent=1)
    sys.exit(0 if all(res.values()) else 1)


if __name__ == "__main__":
    main()
