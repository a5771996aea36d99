import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def world1():
    """torch.distributed (gloo, world 1) + Megatron's grid in this process."""
    from megapeer.parallel import init_distributed
    init_distributed()
    return True


def torchrun(script, args, nproc, timeout=600, env=None):
    """Run a worker script under torchrun; fail the test with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           os.path.join(ROOT, "tests", "workers", script)] + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
    if p.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-8000:]}")
    return p


# tests/workers/parallel_check.py's model with experts 128 wide (the grouped kernels'
# expert-ordered form)
WIDE = "model.peer.num_experts=[4,4] model.peer.expert_hidden=128"


@pytest.fixture(scope="session")
def wide_reference(tmp_path_factory):
    """A folder with parallel_check.py's single-process reference (initial checkpoint,
    loss, gradients) for the WIDE model, shared by the layout tests that use it (CPU
    checks through the Triton interpreter: skipped on a GPU)."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("CPU check (Triton interpreter)")
    out = tmp_path_factory.mktemp("wide_reference")
    torchrun("parallel_check.py", ["reference", str(out)], 1, env={"PARALLEL_EXTRA": WIDE})
    return out


def use_reference(reference, folder):
    """Copy a parallel_check.py reference into folder (its layouts stage writes there)."""
    import shutil
    shutil.copytree(reference / "ckpt_ref", folder / "ckpt_ref")
    for name in ("ref_grads.pt", "reference.json"):
        shutil.copy(reference / name, folder / name)


def write_indexed(prefix, docs):
    """A Megatron indexed dataset (uint16 tokens) with one document per list in docs."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(np.array(d), [len(d)])
    b.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="session")
def parity_demo(tmp_path_factory):
    """The demo corpus of assert_trains_like_reference (vocabulary 4096, 1 MB), made once
    per test process."""
    from megapeer.data import prepare_demo_data
    return prepare_demo_data(str(tmp_path_factory.mktemp("parity_demo")), vocab_size=4096,
                             max_mb=1.0, quiet=True)


def assert_trains_like_reference(tmp_path, demo, kernel, env=None, steps=4, timeout=900,
                                 base="reference"):
    """bench/kernel_parity.py on the tiny MLA+PEER (experts of width 16, fp32, CPU) over
    demo (the parity_demo fixture): the given model.peer.kernel against `base` (the
    reference path), per-step losses within 1e-6 relative and gradient norms (which include
    the table gradients) within 1e-5."""
    import json
    out = tmp_path / "parity.json"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_parity.py"),
                        "--data", os.path.dirname(demo["prefix"]), "--size", "tiny",
                        "--kernels", f"{base},{kernel}", "--steps", str(steps),
                        "--out", str(tmp_path / "runs"), "--json", str(out)],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.load(open(out))["results"]
    for key, tol in (("loss", 1e-6), ("grad_norm", 1e-5)):
        ref, got = res[base][key], res[kernel][key]
        assert sorted(ref) == [str(s) for s in range(1, steps + 1)] and sorted(got) == sorted(ref)
        for s in ref:
            assert abs(got[s] - ref[s]) <= tol * abs(ref[s]), (key, s, got[s], ref[s])
