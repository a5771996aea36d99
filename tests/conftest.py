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


def write_indexed(prefix, docs):
    """A Megatron indexed dataset (uint16 tokens) with one document per list in docs."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(np.array(d), [len(d)])
    b.finalize(prefix + ".idx")
    return prefix
