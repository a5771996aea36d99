"""How far a run got: the newest complete checkpoint's step against training.train_iters.

    python -m megapeer.ablate.progress --config X.yaml [dotted.key=value ...]

prints `STEP TRAIN_ITERS RUN_DIR` (STEP is 0 without a checkpoint) and exits 0 when
the run has finished, 10 when it has not, 2 on a bad config. slurm/pretrain_h100.sh
uses it to decide whether to requeue itself; tools/ablate.py to skip finished runs.
A run has finished when its latest checkpoint is at train_iters: the trainer always
saves after the last step.
"""
import argparse
import json
import os
import sys

LATEST = "latest"                 # megapeer/training/checkpointing.py layout
STATE_NAME = "train_state.json"
UNFINISHED = 10                   # exit status of main() for a run that has not finished


def checkpoint_root(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.logging.run_dir, "checkpoints")


def checkpoint_step(ckpt_root: str) -> int:
    """Iteration of the checkpoint that `<ckpt_root>/latest` names, or 0 if none."""
    marker = os.path.join(ckpt_root, LATEST)
    if not os.path.isfile(marker):
        return 0
    with open(marker) as f:
        name = f.read().strip()
    state = os.path.join(ckpt_root, name, STATE_NAME)
    if not os.path.isfile(state):
        return 0
    with open(state) as f:
        return int(json.load(f)["iteration"])


def run_progress(config_path: str, overrides=()) -> dict:
    """{'step', 'train_iters', 'run_dir', 'finished'} for a config plus overrides."""
    from ..config import load_config
    cfg = load_config(config_path, list(overrides), validate=False)
    step = checkpoint_step(checkpoint_root(cfg))
    total = cfg.training.train_iters
    return {"step": step, "train_iters": total, "run_dir": cfg.logging.run_dir,
            "finished": step >= total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megapeer.ablate.progress",
                                description="Has this run finished? (exit 0: yes, 10: no)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from ..config import ConfigError
    try:
        r = run_progress(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(r["step"], r["train_iters"], r["run_dir"])
    return 0 if r["finished"] else UNFINISHED


if __name__ == "__main__":
    sys.exit(main())
