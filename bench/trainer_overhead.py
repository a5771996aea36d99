#!/usr/bin/env python
"""What a short CPU run of the trainer spends outside its steps, against another checkout.

Runs `python -m megapeer.train` on the tiny MLA+PEER of tests/test_train.py (16 steps,
checkpoints every 4, expert usage and validation every 8) from each checkout in turn, R
times, and prints per checkout the median wall time of the process, its start (process
start to the first step's line), its steps (first to last step line) and its end (last
step line to exit). Then times the figures in this process: the expert-usage figure for 2
and 12 layers of 256 experts, and the training curves.

    python bench/trainer_overhead.py --data DIR [--baseline OTHER_CHECKOUT] [--repeat 3]

DIR holds `python -m megapeer.data.demo --out DIR --max-mb 1 --vocab-size 512`'s corpus.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fixed here, not imported from the tests: every checkout compared runs the same settings
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.ffn_hidden_size=128", "model.seq_length=32", "model.layer_pattern=DP",
        "model.peer.num_experts=[16,16]", "model.peer.heads=2", "model.peer.topk=4",
        "model.peer.key_dim=16", "training.micro_batch_size=2", "training.global_batch_size=4",
        "training.train_iters=16", "training.warmup_iters=2", "training.lr=3e-3",
        "training.eval_interval=8", "training.eval_iters=1", "logging.log_interval=1",
        "logging.expert_usage_interval=8", "checkpoint.save_interval=4", "checkpoint.keep_last=2"]
STEP = re.compile(r"^step (\d+)/")


def one_run(checkout, data, run_dir):
    """(wall, start, steps, end) seconds of one trainer process."""
    cmd = [sys.executable, "-u", "-m", "megapeer.train",
           "--config", os.path.join(checkout, "examples", "tiny_cpu.yaml"), *TINY,
           f"data.tokenizer.path={data}/tokenizer.model",
           f"data.blend=[{data}/stdlib_text_document]", "model.vocab_size=512",
           f"logging.run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=checkout)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    first = last = None
    for line in p.stdout:
        if STEP.match(line):
            now = time.monotonic()
            first = first or now
            last = now
    if p.wait() != 0 or first is None:
        raise SystemExit(f"{checkout}: the trainer failed (exit {p.returncode})")
    end = time.monotonic()
    return end - t0, first - t0, last - first, end - last


def time_figures():
    import numpy as np

    sys.path.insert(0, ROOT)
    from megapeer.training.plots import plot_expert_usage, plot_run
    rng = np.random.default_rng(0)

    def usage(layers):
        out = {}
        for layer in range(layers):
            c = rng.integers(0, 50, 256).astype(np.float32)
            out[layer] = dict(counts=c, selections=float(c.sum()), dead=int((c == 0).sum()),
                              fraction_used=float((c > 0).mean()), kl_uniform=0.3,
                              score_mean=0.1, score_std=0.2, gate_max_mean=0.5)
        return out
    res = {}
    with tempfile.TemporaryDirectory() as d:
        plot_expert_usage(usage(2), os.path.join(d, "warm.png"))   # fonts, caches
        for layers in (2, 12):
            t = time.perf_counter()
            plot_expert_usage(usage(layers), os.path.join(d, f"u{layers}.png"), step=8)
            res[f"usage figure, {layers} layers"] = time.perf_counter() - t
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            for s in range(1, 201):
                f.write(json.dumps({"step": s, "split": "train", "loss": 5 - s / 100,
                                    "lr": 1e-3, "grad_norm": 1.0, "tokens": s * 128.0,
                                    "tokens_per_s": 5000.0, "mem_gib": 0.5}) + "\n")
        t = time.perf_counter()
        plot_run(d, os.path.join(d, "training.png"))
        res["training curves"] = time.perf_counter() - t
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--baseline", help="another checkout of megapeer to compare against")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    checkouts = {"this": ROOT}
    if a.baseline:
        checkouts["baseline"] = os.path.abspath(a.baseline)
    runs = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeat):            # alternate, so that both see the same load
            for name, path in checkouts.items():
                runs[name].append(one_run(path, os.path.abspath(a.data),
                                          os.path.join(tmp, f"{name}{r}")))
                print(f"{name} run {r + 1}/{a.repeat}: {runs[name][-1][0]:.2f} s", flush=True)
    cols = ("wall", "start", "steps", "end")
    out = {"runs": runs, "median": {}, "figures": time_figures()}
    print(f"\n| checkout | {' | '.join(c + ' s' for c in cols)} |\n|---|{'---|' * len(cols)}")
    for name, rs in runs.items():
        med = [statistics.median(r[i] for r in rs) for i in range(len(cols))]
        out["median"][name] = dict(zip(cols, med))
        print(f"| {name} ({checkouts[name]}) | {' | '.join(f'{v:.2f}' for v in med)} |")
    print()
    for k, v in out["figures"].items():
        print(f"{k}: {v:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
