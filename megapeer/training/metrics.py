"""Metrics sinks: console, run_dir/metrics.jsonl, Weights & Biases, TensorBoard.

One MetricsLogger per run, enabled on the logging rank only (elsewhere every method
does nothing). metrics.jsonl holds one JSON object per line:
  {"step", "time", "split": "train", loss, lr, grad_norm, tokens_per_s, mfu, mem_gib, tokens, ...}
  {"step", "time", "split": "valid", "loss", "ppl", ...}
  {"step", "time", "split": "expert_usage", "peer/layer3/fraction_used", ...}
`mfu` is a fraction (0.012 = 1.2 %). See docs/metrics.md.
"""
import hashlib
import json
import logging
import math
import os
import re
import time

import torch

from .plot_worker import PlotWorker

log = logging.getLogger("megapeer.train")

_EMA = 0.3  # weight of the newest step time in the smoothed step time


def memory_gib():
    """Peak CUDA memory allocated (GiB) on GPU, else this process's resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil
    return psutil.Process().memory_info().rss / 2**30


def wandb_run_id(run_dir):
    """A W&B run id that is the same for every attempt of one run directory."""
    path = os.path.abspath(run_dir)
    base = re.sub(r"[^A-Za-z0-9_-]", "-", os.path.basename(path))[:40] or "run"
    return f"{base}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def format_duration(seconds):
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _num(v):
    if torch.is_tensor(v):
        v = v.item()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class MetricsLogger:
    def __init__(self, logging_cfg, run_dir: str, config_dict: dict, total_steps: int,
                 enabled: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb = self._tb = None
        self._last = None            # (step, wall time) of the previous log_step
        self._step_time = None       # smoothed seconds per step
        tr, md = config_dict.get("training", {}), config_dict.get("model", {})
        gbs, seq = tr.get("global_batch_size"), md.get("seq_length")
        self._tokens_per_step = gbs * seq if gbs and seq else None
        self._plots = PlotWorker()
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if logging_cfg.wandb.enabled and logging_cfg.wandb.mode != "disabled":
            import wandb
            w = logging_cfg.wandb
            self._wandb = wandb.init(mode=w.mode, project=w.project, entity=w.entity,
                                     name=w.name, dir=run_dir, config=config_dict,
                                     resume="allow", id=wandb_run_id(run_dir))
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    # ------------------------------------------------------------------ sinks
    def _write(self, step, split, metrics):
        rec = {"step": int(step), "time": time.time(), "split": split}
        rec.update({k: _num(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def _scalars(self, step, prefix, metrics):
        vals = {f"{prefix}{k}": v for k, v in metrics.items()
                if isinstance(v, float) and math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(vals, step=int(step))
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, int(step))

    # ------------------------------------------------------------------ API
    def log_step(self, step: int, metrics: dict):
        """One training step: jsonl line, console line, W&B and TensorBoard scalars."""
        if not self.enabled:
            return
        metrics = {k: _num(v) for k, v in metrics.items()}
        metrics.setdefault("mem_gib", memory_gib())
        if "tokens" not in metrics and self._tokens_per_step:
            metrics["tokens"] = float(step * self._tokens_per_step)
        now = time.time()
        if self._last is not None and step > self._last[0]:
            dt = (now - self._last[1]) / (step - self._last[0])
            self._step_time = dt if self._step_time is None else (
                _EMA * dt + (1 - _EMA) * self._step_time)
        self._last = (step, now)
        self._write(step, "train", metrics)
        print(self.console_line(step, metrics), flush=True)
        self._scalars(step, "train/", metrics)

    def console_line(self, step, m):
        total = self.total_steps
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        if "loss" in m:
            parts.append(f"loss {m['loss']:.3f}")
        if "lr" in m:
            parts.append(f"lr {m['lr']:.1e}")
        if "grad_norm" in m:
            parts.append(f"grad {m['grad_norm']:.2f}")
        if "tokens_per_s" in m:
            t = m["tokens_per_s"]
            parts.append(f"{t / 1e6:.2f}M tok/s" if t >= 1e6 else f"{t / 1e3:.1f}k tok/s")
        if m.get("mfu") is not None:  # None on CPU: no meaningful peak rate
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if "mem_gib" in m:
            parts.append(f"mem {m['mem_gib']:.1f} GiB")
        if self._step_time is not None and total:
            parts.append(f"eta {format_duration(max(total - step, 0) * self._step_time)}")
        else:
            parts.append("eta ?")
        return " | ".join(parts)

    def log_eval(self, step: int, metrics: dict):
        """Validation metrics (loss; ppl added from loss when absent)."""
        if not self.enabled:
            return
        metrics = {k: _num(v) for k, v in metrics.items()}
        if "loss" in metrics and "ppl" not in metrics:
            metrics["ppl"] = math.exp(min(metrics["loss"], 700.0))
        self._write(step, "valid", metrics)
        fmt = {"loss": ".3f", "ppl": ".2f"}
        line = " | ".join(f"{k} {v:{fmt.get(k, '.4g')}}" for k, v in metrics.items()
                          if isinstance(v, float))
        print(f"valid step {step}/{self.total_steps} | {line}", flush=True)
        self._scalars(step, "valid/", metrics)

    def log_expert_usage(self, step: int, usage: dict):
        """`usage` from collect_expert_usage: scalars, histograms and a PNG per call."""
        if not self.enabled or not usage:
            return
        flat = {}
        for layer, s in sorted(usage.items()):
            for k in ("fraction_used", "kl_uniform", "dead", "selections", "score_mean",
                      "score_std", "gate_max_mean"):
                flat[f"peer/layer{layer}/{k}"] = float(s[k])
        self._write(step, "expert_usage", flat)
        self._scalars(step, "", flat)
        for layer, s in usage.items():
            counts = s["counts"].float().cpu()
            if self._wandb is not None:
                import wandb
                self._wandb.log({f"peer/layer{layer}/counts":
                                 wandb.Histogram(counts.numpy(), num_bins=64)}, step=int(step))
            if self._tb is not None:
                self._tb.add_histogram(f"peer/layer{layer}/counts", counts, int(step))
        figure = {layer: {k: (v.float().cpu().numpy() if torch.is_tensor(v) else v)
                          for k, v in stats.items()} for layer, stats in usage.items()}
        self._plot("save_usage_plots", figure, self.run_dir, step)
        path = os.path.join(self.run_dir, "expert_usage", f"step_{step:06d}.png")
        summary = ", ".join(f"L{layer} used {s['fraction_used']:.0%} kl {s['kl_uniform']:.2f}"
                            for layer, s in sorted(usage.items()))
        print(f"expert usage step {step} | {summary} | {path}", flush=True)

    def truncate_after(self, step: int):
        """Keep only metrics.jsonl lines with step <= `step` (call on resume). Atomic."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue                 # a line cut short by a crash
                if rec.get("step", step + 1) <= step:
                    keep.append(json.dumps(rec) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def plot_run(self):
        """Queue run_dir/plots/training.png (drawn by the plot worker; close() waits)."""
        if self.enabled:
            self._plot("plot_run", self.run_dir)

    def _plot(self, name, *args):
        try:
            self._plots.submit(name, *args)
        except Exception as e:  # figures must never fail a run
            log.warning("could not plot (%s): %s", name, e)

    def close(self):
        """Close the W&B and TensorBoard sinks, then wait for the queued figures."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            import wandb
            self._wandb.finish()
            self._wandb = None
            # finish() can return before the service has written the run's file; teardown
            # waits for it (wandb's own atexit hook is unreliable under torchrun workers).
            wandb.teardown()
        self._plots.close()
