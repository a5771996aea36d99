"""Run variants: one after another on this machine, or as SLURM job arrays."""
import json
import os
import subprocess
import sys
import time

from .spec import SpecError
from .variants import prepare_run_dir


def train_command(v, python=sys.executable):
    """The trainer command line for a variant: plain python for one process, else
    torchrun on this machine."""
    train = ["-m", "megapeer.train", "--config", v.config, "--resume", "auto"] + v.overrides
    if v.world_size == 1:
        return [python] + train
    return [python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={v.world_size}"] + train


def run_local(variants, log=print, env=None):
    """Run each unfinished variant to completion, one at a time. Returns the failed names.

    Output goes to <run_dir>/train.log; an interrupted variant resumes on the next call.
    """
    failed = []
    for i, v in enumerate(variants, 1):
        head = f"[{i}/{len(variants)}] {v.name}"
        if v.finished():
            log(f"{head}: finished already, skipped")
            continue
        prepare_run_dir(v)
        log(f"{head}: {v.train_iters} steps on {v.world_size} process(es), log "
            f"{os.path.join(v.run_dir, 'train.log')}")
        t0 = time.time()
        with open(os.path.join(v.run_dir, "train.log"), "a") as out:
            rc = subprocess.call(train_command(v), stdout=out, stderr=subprocess.STDOUT,
                                 env=env)
        ok = rc == 0 and v.finished()
        log(f"{head}: {'done' if ok else f'FAILED (exit status {rc})'} in "
            f"{time.time() - t0:.0f} s")
        if not ok:
            failed.append(v.name)
    return failed


def sbatch_commands(spec, variants, out_dir):
    """[(array file, sbatch argv)] : one job array per world size of the unfinished variants."""
    sl = spec.slurm
    slurm_dir = os.path.join(out_dir, "slurm")
    os.makedirs(slurm_dir, exist_ok=True)
    by_world = {}
    for v in variants:
        by_world.setdefault(v.world_size, []).append(v)
    cmds = []
    for world, group in sorted(by_world.items()):
        if world % sl["nodes"]:
            raise SpecError(f"{spec.path}: 'slurm.nodes' = {sl['nodes']} does not divide the "
                            f"world size {world} of {group[0].name}")
        per_node = world // sl["nodes"]
        if sl["gpus_per_node"] and per_node > sl["gpus_per_node"]:
            raise SpecError(f"{spec.path}: {group[0].name} needs {per_node} ranks per node "
                            f"but 'slurm.gpus_per_node' = {sl['gpus_per_node']}")
        array_file = os.path.join(slurm_dir, f"array-world{world}.txt")
        with open(array_file, "w") as f:
            f.write("\n".join(prepare_run_dir(v) for v in group) + "\n")
        with open(array_file + ".names", "w") as f:
            f.write("\n".join(v.name for v in group) + "\n")
        argv = ["sbatch", "--parsable", f"--array=0-{len(group) - 1}",
                f"--job-name={spec.name}", f"--nodes={sl['nodes']}",
                f"--ntasks-per-node={per_node}", f"--gpus-per-node={sl['gpus_per_node']}",
                f"--output={os.path.join(slurm_dir, '%x-%A_%a.out')}"]
        if sl["partition"]:
            argv.append(f"--partition={sl['partition']}")
        if sl["time"]:
            argv.append(f"--time={sl['time']}")
        argv += list(sl["sbatch_args"]) + [os.path.abspath(sl["script"]), "--array-file",
                                          array_file]
        cmds.append((array_file, argv))
    return cmds


def submit_slurm(spec, variants, out_dir, log=print, python=sys.executable):
    """Submit the unfinished variants; returns the job ids (also in <out>/slurm/jobs.json)."""
    todo = []
    for v in variants:
        if v.finished():
            log(f"{v.name}: finished already, skipped")
        else:
            todo.append(v)
    if not todo:
        return []
    env = dict(os.environ, MEGAPEER_PYTHON=os.environ.get("MEGAPEER_PYTHON", python))
    ids = []
    for array_file, argv in sbatch_commands(spec, todo, out_dir):
        p = subprocess.run(argv, capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"sbatch failed ({p.returncode}): {p.stderr.strip()}\n"
                               f"command: {' '.join(argv)}")
        job = p.stdout.strip().split(";")[0]
        ids.append(job)
        names = open(array_file + ".names").read().split()
        log(f"job array {job}: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)))
    path = os.path.join(out_dir, "slurm", "jobs.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    with open(path, "w") as f:
        json.dump(old + ids, f)
    return ids


def _queued(job):
    p = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job], capture_output=True, text=True)
    if p.returncode:
        if "Invalid job id" in p.stderr:   # ended long enough ago to be forgotten
            return False
        raise RuntimeError(f"squeue failed: {p.stderr.strip()}")
    return bool(p.stdout.strip())


def wait_slurm(job_ids, poll=5.0, log=print):
    """Block until none of the jobs (array tasks included, requeued ones too) is queued."""
    pending = list(job_ids)
    while pending:
        pending = [j for j in pending if _queued(j)]
        if pending:
            time.sleep(poll)
    log("all jobs have left the queue")
