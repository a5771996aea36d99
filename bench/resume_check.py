"""Resume check for the trainer on any device: train N steps saving at N/2, then resume
from N/2 in a copy of the run and compare the per-step losses of the second half.

  python bench/resume_check.py --data DIR [--steps 8] [key=value overrides ...]
Used on the GPU machine to check the DistributedOptimizer's state round trip (bf16).
"""
import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.trainer_runs import train_records  # noqa: E402


def losses(run):
    return {r["step"]: r["loss"] for r in train_records(run)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder from python -m megapeer.data.demo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--run", default="/tmp/resume_check")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    half = a.steps // 2
    base = [sys.executable, "-m", "megapeer.train", "--config",
            os.path.join(ROOT, "examples", "tiny_cpu.yaml"),
            f"data.tokenizer.path={a.data}/tokenizer.model",
            f"data.blend=[{a.data}/stdlib_text_document]", f"training.train_iters={a.steps}",
            f"checkpoint.save_interval={half}", "logging.log_interval=1",
            "training.warmup_iters=1",
            f"training.eval_interval={a.steps}", *a.overrides]
    shutil.rmtree(a.run, ignore_errors=True)
    full_run, resumed_run = a.run + "/full", a.run + "/resumed"
    r = subprocess.run(base + [f"logging.run_dir={full_run}"], capture_output=True, text=True)
    if r.returncode:
        print(r.stdout[-2000:], r.stderr[-4000:])
        print(f"UNINTERRUPTED RUN FAILED (exit {r.returncode})")
        return 1
    shutil.copytree(full_run, resumed_run)
    ck = os.path.join(resumed_run, "checkpoints")
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write(f"iter_{half:07d}")
    shutil.rmtree(os.path.join(ck, f"iter_{a.steps:07d}"))
    r = subprocess.run(base + [f"logging.run_dir={resumed_run}"], capture_output=True,
                       text=True)
    print(r.stdout[-2000:], r.stderr[-3000:] if r.returncode else "")
    if r.returncode:
        print(f"RESUME FAILED (exit {r.returncode})")
        return 1
    f, g = losses(full_run), losses(resumed_run)
    worst = 0.0
    for s in range(half + 1, a.steps + 1):
        d = abs(f[s] - g[s])
        worst = max(worst, d / abs(f[s]))
        print(f"step {s}: uninterrupted {f[s]:.6f}  resumed {g[s]:.6f}  diff {d:.2e}")
    print(f"resume check: max relative loss difference {worst:.2e} "
          f"({'bitwise equal' if worst == 0 else 'not bitwise'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
