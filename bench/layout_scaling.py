"""Parallel layouts on several GPUs: same losses as one GPU, throughput, scaling.

Each layout trains the same ~100M-active MLA+PEER model (128^2 experts per PEER layer) on the same data for --steps steps
through the real trainer (torchrun). Equal-batch runs compare per-step losses with
the 1-GPU run (bf16); weak-scaling runs keep 8 sequences per GPU and report tokens/s
per GPU against 1 GPU.

  python bench/layout_scaling.py --data DIR [--gpus 4] [--steps 20]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.train_throughput import GPU_100M, GPU_100M_PEER  # noqa: E402

EQUAL = [("1 GPU", 1, []), ("DP2", 2, []), ("TP2", 2, ["parallel.tensor=2"]),
         ("PP2", 2, ["parallel.pipeline=2"]), ("EP2 (DP2)", 2, ["parallel.expert=2"]),
         ("DP4", 4, []), ("TP2 x EP2", 4, ["parallel.tensor=2", "parallel.expert=2"])]


def run(name, nproc, extra, data, steps, out):
    run_dir = os.path.join(out, name.replace(" ", "_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "megapeer.train", "--config",
           os.path.join(ROOT, "examples", "tiny_cpu.yaml"), *GPU_100M, *GPU_100M_PEER,
           f"data.tokenizer.path={data}/tokenizer.model", f"data.blend=[{data}/stdlib_text_document]",
           "model.vocab_size=4096", f"training.train_iters={steps}", "training.warmup_iters=2",
           "training.eval_interval=0", "logging.log_interval=1", "checkpoint.save_interval=0",
           "checkpoint.resume=none", "logging.expert_usage_interval=0",
           "model.peer.num_experts=[128,128]", f"logging.run_dir={run_dir}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode:
        print(f"{name}: FAILED\n{p.stderr[-1500:]}", flush=True)
        return None
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    recs = [r for r in recs if r.get("split") == "train"]
    tps = sorted(r["tokens_per_s"] for r in recs[3:])
    return {"loss": {r["step"]: r["loss"] for r in recs}, "tokens_per_s": tps[len(tps) // 2],
            "mem_gib": max(r.get("mem_gib") or 0 for r in recs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="/tmp/layouts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--weak", action="store_true", help="also run DP weak scaling")
    a = ap.parse_args()
    import torch
    card = torch.cuda.get_device_name()
    res = {}
    gb = ["training.global_batch_size=16", "training.micro_batch_size=4"]
    for name, n, extra in EQUAL:
        if n <= a.gpus:
            res[name] = run(name, n, gb + extra, a.data, a.steps, a.out)
            print(name, json.dumps(res[name] and {k: v for k, v in res[name].items()
                                                   if k != "loss"}), flush=True)
    weak = {}
    for n in ((1, 2, 4) if a.weak else ()):
        if n <= a.gpus:
            r = run(f"weak{n}", n, [f"training.global_batch_size={8 * n}",
                                    "training.micro_batch_size=8"], a.data, 8, a.out)
            weak[n] = r and r["tokens_per_s"]
    ref = res.get("1 GPU")
    print(f"\n{card}, {a.steps} steps, global batch 16 x 2048 tokens, bf16")
    print(f"{'layout':12s} {'GPUs':>4s} {'final loss':>10s} {'max |dloss|':>11s} "
          f"{'tok/s':>9s} {'tok/s/GPU':>9s} {'mem GiB':>7s}")
    for name, n, _ in EQUAL:
        r = res.get(name)
        if not r:
            continue
        d = max(abs(r["loss"][s] - ref["loss"][s]) for s in ref["loss"]) if ref else float("nan")
        print(f"{name:12s} {n:4d} {r['loss'][a.steps]:10.4f} {d:11.4f} "
              f"{r['tokens_per_s']:9.0f} {r['tokens_per_s'] / n:9.0f} {r['mem_gib']:7.1f}")
    if weak.get(1):
        print("\nweak scaling (8 x 2048 tokens per GPU per step):")
        for n, t in weak.items():
            if t:
                print(f"  DP{n}: {t:9.0f} tok/s, efficiency {t / (n * weak[1]):.1%}")
    if a.json:
        json.dump({"card": card, "equal": res, "weak": weak}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
