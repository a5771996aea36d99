"""Parallel layouts on several GPUs: same losses as one GPU, throughput, scaling.

Each layout trains the same ~100M-active MLA+PEER model (128^2 experts per PEER layer) on the same data for --steps steps
through the real trainer (torchrun). Equal-batch runs (global batch 16 x 2048) compare
per-step losses with the 1-GPU run (bf16); weak-scaling runs keep 16 sequences per GPU
(DPn at global batch 16n) and report tokens/s per GPU against 1 GPU. The last two steps of
every run are profiled (logging.profile_steps): NCCL time per step, PEER's own
collectives, forward and backward (the 'peer.comm' spans; rank 0's kernel time, which
includes waiting for the other ranks, and 'no wait': per collective the shortest kernel
over the ranks, i.e. the last rank to arrive), and the data-parallel gradient reduction
('grad_sync'), as a share of rank 0's step.

  python bench/layout_scaling.py --data DIR [--gpus 4] [--steps 12]
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.train_throughput import GPU_100M, GPU_100M_PEER, TINY, TINY_PEER  # noqa: E402
from bench.trainer_runs import train, train_records  # noqa: E402
from megapeer.training.profiling import comm_without_waiting  # noqa: E402

SIZES = {"100m": GPU_100M + GPU_100M_PEER + ["model.peer.num_experts=[128,128]"],
         "tiny": TINY + TINY_PEER}  # tiny: a CPU smoke run of this script (gloo)

EQUAL = [("1 GPU", 1, []), ("DP2", 2, []), ("TP2", 2, ["parallel.tensor=2"]),
         ("TP2 SP", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
         ("PP2", 2, ["parallel.pipeline=2"]), ("EP2 (DP2)", 2, ["parallel.expert=2"]),
         ("DP4", 4, []), ("TP2 x EP2", 4, ["parallel.tensor=2", "parallel.expert=2"])]


def run(name, nproc, extra, data, steps, out, size="100m", init=None, common=()):
    """Train `steps` steps under one layout; init: checkpoint folder every layout starts from;
    common: overrides for every run (--set)."""
    run_dir = os.path.join(out, name.replace(" ", "_").replace("(", "").replace(")", ""))
    p = train(run_dir, data, steps, [
        *SIZES[size], "checkpoint.save_interval=0", f"logging.profile_steps=[{steps - 1},{steps}]",
        *([f"checkpoint.resume={init}", "checkpoint.save=false"] if init else
          ["checkpoint.resume=none", "training.exit_interval=1"]), *common, *extra],
        nproc=nproc, timeout=300)
    print(f"{name}: exit {p.returncode}", flush=True)
    if p.returncode:
        print(f"{name}: FAILED\n{p.stderr[-1500:]}", flush=True)
        return None
    recs = train_records(run_dir)
    if not init:
        return os.path.join(run_dir, "checkpoints", "iter_0000001")
    tps = sorted(r["tokens_per_s"] for r in recs[3:-2])  # not the warm-up or profiled steps
    profs = [json.load(open(os.path.join(run_dir, "profile", f"summary_rank{r}.json")))
             for r in range(nproc)]
    prof, w = profs[0], profs[0]["wall_ms"]
    nowait = comm_without_waiting(profs, "peer.comm")
    return {"loss": {r["step"]: r["loss"] for r in recs}, "tokens_per_s": tps[len(tps) // 2],
            "mem_gib": max(r.get("mem_gib") or 0 for r in recs),
            "nccl_frac": prof["categories_ms"]["communication (NCCL)"] / w,
            "peer_comm_frac": prof["labels_ms"]["peer.comm"] / w,
            "peer_comm_nowait_frac": None if nowait is None else nowait / w,
            "grad_sync_frac": prof["labels_ms"]["grad_sync"] / w, "profile": prof}


def _pct(x):
    return "-" if x is None else f"{x:.1%}"


def _counts(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU counts like 2,4, got {text!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help=">= 7 (3 warm-up, 2 profiled)")
    ap.add_argument("--out", default="/tmp/layouts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--size", default="100m", choices=sorted(SIZES))
    ap.add_argument("--only", default=None, help="comma-separated layout names to run (_ for spaces)")
    ap.add_argument("--no-weak", action="store_true", help="skip the weak-scaling runs")
    ap.add_argument("--weak", default="2,4,8", type=_counts,
                    help="GPU counts of the weak-scaling runs, e.g. 2,4")
    ap.add_argument("--overlap", action="store_true",
                    help="weak scaling also with training.overlap_grad_reduce=true")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    a = ap.parse_args()
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    res = {}
    gb = ["training.global_batch_size=16", "training.micro_batch_size=4"]
    only = a.only.replace("_", " ").split(",") if a.only else None  # "TP2_x_EP2" = "TP2 x EP2"
    unknown = set(only or ()) - {name for name, _, _ in EQUAL}
    if unknown:
        sys.exit(f"--only: unknown layout(s) {sorted(unknown)}; known: "
                 + ", ".join(name.replace(" ", "_") for name, _, _ in EQUAL))
    # Every layout resumes from one checkpoint taken after step 1 on one GPU, so that all
    # start from the same weights (fresh TP/EP/PP ranks would initialise tables differently).
    init = run("init", 1, gb, a.data, a.steps, a.out, a.size, common=a.set)
    if not init:
        sys.exit("the 1-GPU initial run failed")
    for name, n, extra in EQUAL:
        if n <= a.gpus and (only is None or name in only):
            res[name] = run(name, n, gb + extra, a.data, a.steps, a.out, a.size, init, a.set)
            print(name, json.dumps(res[name] and {k: v for k, v in res[name].items()
                                                   if k not in ("loss", "profile")}), flush=True)
    weak = {"DP1": res.get("1 GPU") and res["1 GPU"]["tokens_per_s"]}
    modes = [("", [])] + ([(" overlap", ["training.overlap_grad_reduce=true"])]
                          if a.overlap else [])
    for n in (() if a.no_weak else a.weak):
        for tag, extra in (modes if n <= a.gpus else ()):
            r = run(f"weak DP{n}{tag}", n, [f"training.global_batch_size={16 * n}",
                                            "training.micro_batch_size=4", *extra],
                    a.data, a.steps, a.out, a.size, init, a.set)
            weak[f"DP{n}{tag}"] = r and r["tokens_per_s"]
    ref = res.get("1 GPU")
    print(f"\n{card}, {a.size}, {a.steps} steps, global batch 16 sequences")
    print(f"{'layout':12s} {'GPUs':>4s} {'final loss':>10s} {'max |dloss|':>11s} "
          f"{'tok/s':>9s} {'tok/s/GPU':>9s} {'mem GiB':>7s} {'NCCL':>6s} {'PEER comm':>9s} "
          f"{'no wait':>7s} {'grad sync':>9s}")
    for name, n, _ in EQUAL:
        r = res.get(name)
        if not r:
            continue
        d = max(abs(r["loss"][s] - ref["loss"][s]) for s in ref["loss"]) if ref else float("nan")
        print(f"{name:12s} {n:4d} {r['loss'][a.steps]:10.4f} {d:11.2e} "
              f"{r['tokens_per_s']:9.0f} {r['tokens_per_s'] / n:9.0f} {r['mem_gib']:7.1f} "
              f"{r['nccl_frac']:6.1%} {r['peer_comm_frac']:9.1%} {_pct(r['peer_comm_nowait_frac']):>7s} "
              f"{r['grad_sync_frac']:9.1%}")
    if any(weak.values()):
        print("\nweak scaling (16 sequences per GPU per step; efficiency against the 1 GPU run):")
        for key, t in weak.items():
            n = int(key[2:].split()[0])
            if t:
                eff = f", efficiency {t / (n * weak['DP1']):.1%}" if weak["DP1"] else ""
                print(f"  {key:11s} {t:9.0f} tok/s{eff}")
    if a.json:
        json.dump({"card": card, "equal": res, "weak": weak}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
