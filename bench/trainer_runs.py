"""Short runs of the real trainer on the demo corpus, for the benchmarks that compare runs
(layout_scaling.py, kernel_parity.py): the command line and the logged train records."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(run_dir, data, steps, overrides, nproc=1, timeout=600):
    """Train `steps` steps (torchrun, `nproc` processes, one OpenMP thread each: torchrun
    sets that only when it starts several) on the corpus of `python -m megapeer.data.demo`
    in `data`, logging every step into a fresh `run_dir`. Returns the CompletedProcess."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "megapeer.train",
           "--config", os.path.join(ROOT, "examples", "tiny_cpu.yaml"),
           f"data.tokenizer.path={data}/tokenizer.model",
           f"data.blend=[{data}/stdlib_text_document]", f"training.train_iters={steps}",
           "training.warmup_iters=2", "training.eval_interval=0", "logging.log_interval=1",
           "logging.expert_usage_interval=0", f"logging.run_dir={run_dir}", *overrides,
           "model.vocab_size=4096"]  # the demo tokenizer's, whatever the model overrides say
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def train_records(run_dir):
    """The per-step train records of a run's metrics.jsonl, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if r.get("split") == "train"]
