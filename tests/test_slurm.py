"""slurm/pretrain_h100.sh and tools/ablate.py --slurm on a real Slurm cluster.

Runs only where `sinfo` answers: CI starts a one-node cluster on localhost with
tests/slurm/start_cluster.sh (and stops it with stop_cluster.sh). Jobs run the tiny
CPU model with 2 tasks (data parallel 2 over gloo).
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "slurm", "pretrain_h100.sh")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _slurm_missing():
    """Why Slurm cannot run jobs here, or None when it can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client (sinfo/sbatch not found)"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                           timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if p.returncode:
        return f"sinfo failed: {(p.stderr or p.stdout).strip()}"
    states = [s.rstrip("*~#$@+-^!%") for s in p.stdout.split()]
    if not any(s in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no node able to run jobs (sinfo states: {states})"
    return None


_MISSING = _slurm_missing()
pytestmark = pytest.mark.skipif(
    _MISSING is not None,
    reason=f"needs a running Slurm cluster ({_MISSING}); start one with "
           "tests/slurm/start_cluster.sh")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megapeer.data.demo import prepare_demo_data
    return prepare_demo_data(str(tmp_path_factory.mktemp("slurm_data")), vocab_size=512,
                             max_mb=0.3, quiet=True)


def tiny_overrides(data, run_dir, train_iters=200):
    """examples/tiny_cpu.yaml, smaller: ~40 ms a step at data parallel 2 on 2 cores. The
    small demo corpus has 11 documents: 10 % of them (one) make the validation split."""
    return ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
            "model.ffn_hidden_size=128", "model.seq_length=64", "model.vocab_size=512",
            "model.peer.num_experts=[16,16]", "training.micro_batch_size=4",
            "training.global_batch_size=8", f"training.train_iters={train_iters}",
            "training.warmup_iters=5", "training.eval_interval=50", "training.eval_iters=2",
            "logging.log_interval=1", "logging.expert_usage_interval=0",
            "checkpoint.save_interval=20", f"data.tokenizer.path={data['tokenizer']}",
            f"data.blend=[{data['prefix']}]", "data.split=90,10,0",
            f"logging.run_dir={run_dir}"]


def cpu_sbatch_args(name, out_dir):
    return ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--time=20",
            f"--job-name={name}", f"--output={out_dir}/%x-%j.out"]


def job_env():
    return dict(os.environ, MEGAPEER_PYTHON=sys.executable, PYTHONUNBUFFERED="1")


def sbatch(args):
    p = subprocess.run(["sbatch", "--parsable"] + args, capture_output=True, text=True,
                       cwd=ROOT, env=job_env(), timeout=60)
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return p.stdout.strip().split(";")[0]


def job_info(job):
    p = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                       text=True, timeout=30)
    if p.returncode:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


_PENDING_SINCE = {}


def nudge(job):
    """Job info; a requeued job waiting for its begin time is told to start now.

    Slurm holds a requeued job for ~2 minutes before it may run again; starting it at
    once changes nothing else about it.
    """
    info = job_info(job)
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        # Not at once: a requeued job started within milliseconds of the requeue can
        # meet its previous instance's credential still being revoked on the node
        # ("Killing non-startable batch job: Job credential revoked" -> FAILED).
        first = _PENDING_SINCE.setdefault(job, time.time())
        if time.time() - first >= 5:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                           capture_output=True, timeout=30)
            _PENDING_SINCE.pop(job, None)
    return info


def wait_job(job, restarts=0, timeout=300):
    """Wait until `job` has ended after at least `restarts` requeues."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = nudge(job)
        if info.get("JobState") in TERMINAL and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end within {timeout} s: {job_info(job)}")


def wait_for(pred, job, what, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if nudge(job).get("JobState") in TERMINAL:
            raise AssertionError(f"job {job} ended while waiting for {what}: {job_info(job)}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s (job {job}: {job_info(job)})")


def latest_step(run_dir):
    from megapeer.ablate.progress import checkpoint_step
    return checkpoint_step(os.path.join(run_dir, "checkpoints"))


def read_metrics(run_dir):
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in recs if r["split"] == "train"], [r for r in recs if r["split"] == "valid"]


def logs_of(out_dir, run_dir):
    """Batch and rank-0 logs, for assertion messages."""
    text = []
    for base in (out_dir, os.path.join(run_dir, "logs")):
        for dirpath, _, files in os.walk(base):
            for f in sorted(files):
                if f.endswith((".out", "rank-0.log")):
                    text.append(f"==> {f}\n" + open(os.path.join(dirpath, f)).read()[-3000:])
    return "\n".join(text)


def cancel(*jobs):
    subprocess.run(["scancel"] + list(jobs), capture_output=True, timeout=30)


def rank0_log(run_dir, job):
    path = os.path.join(run_dir, "logs", f"mp-requeue-{job}", "rank-0.log")
    return open(path).read() if os.path.exists(path) else ""


def test_requeue_and_time_limit_signal_resume_exactly(data, tmp_path):
    """Attempt 1 is requeued from outside (`scontrol requeue`: SIGTERM to the ranks);
    attempt 2 gets the time-limit signal (--signal=B:USR1, sent here to the batch shell
    as Slurm would) and requeues itself; attempt 3 finishes. Every attempt resumes from
    the checkpoint saved when the signal arrived, and the losses equal an uninterrupted
    run's step for step."""
    run, ref = str(tmp_path / "run"), str(tmp_path / "reference")
    out = str(tmp_path / "batch")
    os.makedirs(out)
    job = sbatch(cpu_sbatch_args("mp-requeue", out) + [SCRIPT, "examples/tiny_cpu.yaml"]
                 + tiny_overrides(data, run))
    ref_job = sbatch(cpu_sbatch_args("mp-reference", out) + [SCRIPT, "examples/tiny_cpu.yaml"]
                     + tiny_overrides(data, ref))
    try:
        wait_for(lambda: latest_step(run) > 0, job, "first checkpoint")
        t_term = time.time()
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        wait_for(lambda: int(job_info(job).get("Restarts", 0)) >= 1
                 and job_info(job).get("JobState") == "RUNNING"
                 and "resumed from" in rank0_log(run, job), job, "the second attempt's resume",
                 timeout=240)
        s1 = latest_step(run)
        wait_for(lambda: latest_step(run) > s1, job, "a checkpoint after the resume")
        t_usr1 = time.time()
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        info = wait_job(job, restarts=2)
        ref_info = wait_job(ref_job)
    finally:
        cancel(job, ref_job)
    logs = logs_of(out, run)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "2", logs
    assert ref_info["JobState"] == "COMPLETED" and ref_info["Restarts"] == "0", logs

    rank0 = rank0_log(run, job)
    saved = [(int(s), int(sig)) for sig, s in
             re.findall(r"signal (\d+) received: saving at step (\d+)", rank0)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+iter_0*(\d+) at step \d+", rank0)]
    assert [sig for _, sig in saved] == [15, 10], logs
    assert resumed == [s for s, _ in saved], logs   # each attempt resumed where it was told
    assert 0 < resumed[0] < resumed[1] < 200, logs
    batch = open(os.path.join(out, f"mp-requeue-{job}.out")).read()
    assert "attempt 3" in batch and "requeueing job" in batch and "run finished" in batch

    train, valid = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, 201)), "steps lost or repeated"
    by_step = {r["step"]: r for r in train}
    for s, t_sig in zip(resumed, (t_term, t_usr1)):
        # step s+1 was written by the next attempt, after a restart gap (steps take ~40 ms)
        assert by_step[s + 1]["time"] > t_sig
        assert by_step[s + 1]["time"] - by_step[s]["time"] > 3.0
    ref_train, ref_valid = read_metrics(ref)
    assert len(ref_train) == len(train) and len(ref_valid) == len(valid)
    for a, b in zip(train + valid, ref_train + ref_valid):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5), \
            (a, b)
    assert train[-1]["loss"] < train[0]["loss"] - 1.0          # it learned
    assert len(valid) == len(ref_valid) == 4

    from megapeer.ablate.progress import main as progress
    assert progress(["--config", os.path.join(ROOT, "examples/tiny_cpu.yaml")]
                    + tiny_overrides(data, run)) == 0


def test_failures_are_not_requeued(data, tmp_path):
    """A bad config stops before srun; ranks that fail (here: non-finite losses) end the
    job as FAILED with their status. Neither is requeued: no crash loops."""
    out = str(tmp_path / "batch")
    os.makedirs(out)
    bad = sbatch(cpu_sbatch_args("mp-badconfig", out) + [SCRIPT, "examples/tiny_cpu.yaml"]
                 + tiny_overrides(data, str(tmp_path / "bad")) + ["model.nope=1"])
    os.environ["MEGAPEER_FAULT_NAN_STEPS"] = "3,4,5,6,7"
    try:
        nan = sbatch(cpu_sbatch_args("mp-nan", out) + [SCRIPT, "examples/tiny_cpu.yaml"]
                     + tiny_overrides(data, str(tmp_path / "nan"), train_iters=20))
    finally:
        del os.environ["MEGAPEER_FAULT_NAN_STEPS"]
    try:
        bad_info, nan_info = wait_job(bad), wait_job(nan)
    finally:
        cancel(bad, nan)
    logs = logs_of(out, str(tmp_path / "nan"))
    assert bad_info["JobState"] == "FAILED" and bad_info["ExitCode"] == "2:0", logs
    assert "unknown key 'model.nope'" in open(os.path.join(out, f"mp-badconfig-{bad}.out")).read()
    assert not os.path.exists(tmp_path / "bad")                      # nothing started
    # the failing rank exits 3; srun reports the largest status, which may be that of a
    # rank that --kill-on-bad-exit terminated (143)
    assert nan_info["JobState"] == "FAILED" and nan_info["ExitCode"] in ("3:0", "143:0"), logs
    assert bad_info["Restarts"] == nan_info["Restarts"] == "0", logs
    batch = open(os.path.join(out, f"mp-nan-{nan}.out")).read()
    assert "before the run finished: not requeueing" in batch, batch
    rank_logs = os.path.join(tmp_path, "nan", "logs", f"mp-nan-{nan}")
    text = "".join(open(os.path.join(rank_logs, f)).read() for f in os.listdir(rank_logs))
    assert "5 consecutive non-finite steps" in text, logs


def test_ablation_runs_as_a_job_array(data, tmp_path):
    """examples/ablations/tiny_cpu.yaml through --slurm --wait: one array, two tasks,
    results collected; a second call skips both finished variants."""
    out = str(tmp_path / "sweep")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablate.py"),
           os.path.join(ROOT, "examples", "ablations", "tiny_cpu.yaml"), "--slurm", "--wait",
           "--poll", "1", "--out", out, f"data.tokenizer.path={data['tokenizer']}",
           f"data.blend=[{data['prefix']}]", "data.split=90,10,0"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=job_env(),
                       timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    (array,) = json.load(open(os.path.join(out, "slurm", "jobs.json")))
    p2 = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True,
                        text=True, timeout=30)
    tasks = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in p2.stdout.splitlines()]
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert all(t["ArrayJobId"] == array and t["JobState"] == "COMPLETED" for t in tasks)
    assert all(t["NumTasks"] == "2" for t in tasks)

    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert [(r["variant"], r["status"]) for r in rows] == [("dense--dp2", "finished"),
                                                           ("peer--dp2", "finished")]
    for r in rows:
        run_dir = os.path.join(out, "runs", r["variant"])
        train, valid = read_metrics(run_dir)
        assert int(r["steps"]) == train[-1]["step"] == int(r["train_iters"])
        assert float(r["final_valid_loss"]) == pytest.approx(valid[-1]["loss"])
        job_logs = os.listdir(os.path.join(run_dir, "logs"))
        assert len(job_logs) == 1 and job_logs[0].startswith("tiny_cpu-")
        assert {"rank-0.log", "rank-1.log"} <= set(os.listdir(
            os.path.join(run_dir, "logs", job_logs[0])))
    for f in ("results.md", "loss_vs_flops.png", "throughput.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0

    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=job_env(),
                       timeout=120)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("finished already, skipped") == 2
    assert json.load(open(os.path.join(out, "slurm", "jobs.json"))) == [array]
