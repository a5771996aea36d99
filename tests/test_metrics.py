"""Metrics sinks, expert-usage statistics and plots.

Statistics are checked against hand computations; the distributed collection runs
real PEER layers under torchrun (DP, PP and TP layouts, one launch).
"""
import glob
import json
import math
import os
import re

import pytest
import torch

from megapeer.config import LoggingConfig, WandbConfig
from megapeer.training import metrics as metrics_mod
from megapeer.training.expert_usage import usage_stats
from megapeer.training.metrics import MetricsLogger, wandb_run_id
from megapeer.training.plots import plot_expert_usage, plot_run

from conftest import torchrun

CFG = {"training": {"global_batch_size": 8}, "model": {"seq_length": 16}}


def _stats(counts, tokens=1.0, heads=2, score_sum=0.0, score_sq=0.0, gate_max=0.0):
    t = lambda v: torch.tensor(float(v))
    return usage_stats(torch.tensor(counts, dtype=torch.float32), t(tokens), t(score_sum),
                       t(score_sq), t(gate_max), heads)


def test_usage_stats_by_hand():
    # one token, two heads, top-3: scores head0 [1, 2, 3], head1 [0, 0, 3];
    # PEER accumulates per (token, head) the mean over k of s and of s^2, and the max gate.
    s = _stats([3, 0, 1, 0, 0, 2], tokens=1, heads=2, score_sum=2 + 1,
               score_sq=14 / 3 + 9 / 3, gate_max=0.7 + 0.9)
    # p = [1/2, 0, 1/6, 0, 0, 1/3], N = 6: KL = sum p log(p N)
    kl = 0.5 * math.log(3) + (1 / 6) * math.log(1) + (1 / 3) * math.log(2)
    assert s["kl_uniform"] == pytest.approx(kl, rel=1e-6)
    assert s["fraction_used"] == 0.5 and s["dead"] == 3 and s["selections"] == 6
    pooled = torch.tensor([1., 2, 3, 0, 0, 3])
    assert s["score_mean"] == pytest.approx(pooled.mean().item())
    assert s["score_std"] == pytest.approx(pooled.std(unbiased=False).item(), rel=1e-6)
    assert s["gate_max_mean"] == pytest.approx(0.8)
    # the two ends of the scale: uniform use, and every selection on one expert
    assert _stats([5] * 8)["kl_uniform"] == pytest.approx(0.0, abs=1e-7)
    one = _stats([0, 0, 7, 0])
    assert one["kl_uniform"] == pytest.approx(math.log(4)) and one["dead"] == 3


def test_collect_across_ranks(tmp_path):
    torchrun("usage_check.py", [str(tmp_path)], nproc=2, timeout=300)
    rep = json.loads((tmp_path / "usage_check.json").read_text())
    assert rep["phases"] == ["dp2", "pp2", "tp2"]
    assert rep["dp2"]["tokens"] == 48 and 0 < rep["dp2"]["fraction_used"] <= 1


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_jsonl_console_eta_and_truncate(tmp_path, capsys, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(metrics_mod.time, "time", clock)
    run = str(tmp_path / "run")
    log = MetricsLogger(LoggingConfig(run_dir=run, tensorboard=True), run, CFG, 100, True)
    m = {"loss": 4.0, "lr": 3e-4, "grad_norm": 0.85, "tokens_per_s": 12345.0, "mfu": 0.012}
    for step, t in [(10, 0), (20, 10), (30, 30)]:   # 1 s/step, then 2 s/step
        clock.t = 1000.0 + t
        log.log_step(step, dict(m, loss=torch.tensor(5.0 - step / 10)))
    log.log_eval(20, {"loss": 2.0})
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 20/100 \(20%\) \| loss 3\.000 \| lr 3\.0e-04 \| grad 0\.85 \| "
                        r"12\.3k tok/s \| mfu 1\.2% \| mem [\d.]+ GiB \| eta 1m20s", out[1]), out[1]
    # smoothed: 0.3 * 2 + 0.7 * 1 = 1.3 s/step, 70 steps left
    assert out[2].endswith("eta 1m31s"), out[2]
    assert out[0].endswith("eta ?")
    assert out[3] == "valid step 20/100 | loss 2.000 | ppl 7.39", out[3]
    log.close()
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [(r["step"], r["split"]) for r in lines] == [(10, "train"), (20, "train"),
                                                        (30, "train"), (20, "valid")]
    assert lines[1]["loss"] == 3.0 and lines[1]["tokens"] == 20 * 8 * 16
    assert all(k in lines[0] for k in ("time", "lr", "grad_norm", "tokens_per_s", "mfu",
                                       "mem_gib"))
    assert lines[3]["ppl"] == pytest.approx(math.exp(2.0))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(os.path.join(run, "tensorboard"))
    ev.Reload()
    assert [(e.step, e.value) for e in ev.Scalars("train/loss")] == [(10, 4.0), (20, 3.0),
                                                                    (30, 2.0)]
    assert ev.Scalars("valid/ppl")[0].value == pytest.approx(math.exp(2.0), rel=1e-6)

    # a crashed attempt got to step 50 and died mid-line; the resume is from step 20
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 50, "split": "train", "loss": 9.0}) + "\n")
        f.write('{"step": 60, "los')
    log = MetricsLogger(LoggingConfig(run_dir=run), run, CFG, 100, True)
    log.truncate_after(20)
    log.log_step(30, {"loss": 1.5})
    log.close()
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [(r["step"], r["split"], r["loss"]) for r in lines] == [
        (10, "train", 4.0), (20, "train", 3.0), (20, "valid", 2.0), (30, "train", 1.5)]
    assert not os.path.exists(os.path.join(run, "metrics.jsonl.tmp"))

    off = str(tmp_path / "off")
    quiet = MetricsLogger(LoggingConfig(run_dir=off), off, CFG, 100, False)
    quiet.log_step(1, m)
    quiet.log_eval(1, {"loss": 1.0})
    quiet.truncate_after(0)
    quiet.close()
    assert not os.path.exists(off)


def _usage():
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer, n in [(2, 256), (4, 1024)]:
        # skewed use: a Zipf-like draw leaves some experts unused
        w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** (1.0 if layer == 2 else 0.5)
        picks = torch.multinomial(w, 4000, replacement=True, generator=g)
        counts = torch.bincount(picks, minlength=n).float()
        out[layer] = _stats(counts.tolist(), tokens=500, heads=2, score_sum=300.0,
                            score_sq=500.0, gate_max=400.0)
    return out


def test_wandb_offline_in_run_dir(tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg"),
                 "WANDB_CACHE_DIR": str(tmp_path / "wbcache"),
                 "WANDB_DATA_DIR": str(tmp_path / "wbdata")}.items():
        monkeypatch.setenv(k, v)
    run = str(tmp_path / "wb_run")
    cfg = LoggingConfig(run_dir=run, wandb=WandbConfig(enabled=True, mode="offline",
                                                       project="megapeer-test", name="t"))
    log = MetricsLogger(cfg, run, CFG, 10, True)
    log.log_step(1, {"loss": 3.5, "lr": 1e-3})
    log.log_eval(1, {"loss": 3.0})
    log.log_expert_usage(1, _usage())
    log.close()
    rid = wandb_run_id(run)
    files = glob.glob(os.path.join(run, "wandb", f"offline-run-*-{rid}", f"run-{rid}.wandb"))
    assert len(files) == 1, os.listdir(os.path.join(run, "wandb"))
    data = open(files[0], "rb").read()
    for key in (b"train/loss", b"valid/ppl", b"peer/layer4/kl_uniform", b"peer/layer2/counts"):
        assert key in data, key
    assert wandb_run_id(run) == wandb_run_id(run + "/") != wandb_run_id(str(tmp_path / "other"))


def test_plots(tmp_path):
    run = str(tmp_path / "plot_run")
    log = MetricsLogger(LoggingConfig(run_dir=run), run, CFG, 200, True)
    for step in range(10, 201, 10):
        log.log_step(step, {"loss": 2 + 6 * math.exp(-step / 40), "lr": 3e-4 * min(1, step / 50),
                            "grad_norm": 1 + 1 / step, "tokens_per_s": 9000.0 + step,
                            "mfu": 0.01})
        if step % 50 == 0:
            log.log_eval(step, {"loss": 2.1 + 6 * math.exp(-step / 40)})
    log.log_expert_usage(200, _usage())
    log.close()
    usage_png = os.path.join(run, "expert_usage", "step_000200.png")
    assert os.path.getsize(usage_png) > 20_000
    assert open(usage_png, "rb").read() == open(os.path.join(run, "expert_usage", "latest.png"),
                                                "rb").read()
    path = plot_run(run)
    assert path == os.path.join(run, "plots", "training.png") and os.path.getsize(path) > 30_000

    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "plot_run_cli", os.path.join(os.path.dirname(__file__), "..", "tools", "plot_run.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    other = str(tmp_path / "x.png")
    assert cli.main([run, "--out", other]) == 0 and os.path.getsize(other) > 30_000
    with pytest.raises(ValueError):
        plot_expert_usage({}, str(tmp_path / "none.png"))


def test_plot_worker_draws_in_another_process_and_reports_failures(tmp_path, caplog):
    """The trainer's figures come from the plot worker (a spawned process): close() waits
    for each queued figure; a figure that cannot be drawn is a warning naming it, and the
    figures queued after it are still drawn."""
    from megapeer.training.plot_worker import PlotWorker
    run = str(tmp_path / "run")
    log = MetricsLogger(LoggingConfig(run_dir=run), run, CFG, 20, True)
    for step in (10, 20):
        log.log_step(step, {"loss": 3.0 - step / 20, "lr": 1e-3})
    log.log_expert_usage(20, _usage())
    worker = log._plots._proc
    assert worker is not None and worker.pid != os.getpid()
    log._plot("plot_run", str(tmp_path / "no_such_run"))    # no metrics.jsonl: fails
    log.plot_run()
    with caplog.at_level("WARNING", logger="megapeer.train"):
        log.close()
    assert not worker.is_alive()
    assert os.path.getsize(os.path.join(run, "expert_usage", "step_000020.png")) > 20_000
    assert os.path.getsize(os.path.join(run, "plots", "training.png")) > 30_000
    bad = [r.getMessage() for r in caplog.records if "could not plot" in r.getMessage()]
    assert len(bad) == 1 and "no_such_run" in bad[0] and "metrics.jsonl" in bad[0], bad
    with pytest.raises(ValueError, match="unknown plot job"):
        PlotWorker().submit("rm_rf", run)
