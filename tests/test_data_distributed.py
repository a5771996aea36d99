"""Two gloo ranks: rank 0 builds the index caches, rank 1 only loads them, and each rank's
micro-batches are its slice of the single-process global stream."""
import multiprocessing as mp
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import write_indexed
from megapeer.config import DataConfig
from megapeer.data import BatchIterator, build_datasets

TOK = SimpleNamespace(vocab_size=512, eod=0, pad=None)
MBS, STEPS = 2, 5



def _cfg(a, b, cache):
    return DataConfig(blend=["30", a, "70", b], split="90,10,0", cache_dir=cache, seed=5)


def _rank(rank, init_file, a, b, cache, out):
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                             rank=rank, world_size=2)
        saved = []
        real_save = np.save
        np.save = lambda path, *x, **k: (saved.append(path), real_save(path, *x, **k))
        train, valid, _ = build_datasets(_cfg(a, b, cache), 16, (200, 20, 0), TOK)
        np.save = real_save
        it = BatchIterator(train, MBS, 0, rank, 2)
        toks = [next(it)["tokens"] for _ in range(STEPS)]
        torch.save({"tokens": toks, "saved": len(saved), "valid0": valid[0]["tokens"]},
                   f"{out}/rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(f"{out}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.timeout(120)
def test_two_gloo_ranks_share_the_cache_and_split_the_stream(tmp_path):
    rng = np.random.default_rng(1)
    a = write_indexed(str(tmp_path / "a"),
                      [list(rng.integers(10, 100, 40)) + [0] for _ in range(30)])
    b = write_indexed(str(tmp_path / "b"),
                      [list(rng.integers(200, 300, 40)) + [0] for _ in range(50)])
    # Single-process reference, with its own cache.
    ref, ref_valid, _ = build_datasets(_cfg(a, b, str(tmp_path / "ref")), 16, (200, 20, 0), TOK)
    it = BatchIterator(ref, 2 * MBS)
    want = [next(it)["tokens"] for _ in range(STEPS)]

    ctx = mp.get_context("spawn")  # clean children, even if this process has a process group
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), a, b,
                                             str(tmp_path / "cache"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=100)
    errors = [f.read_text() for f in tmp_path.glob("rank*.err")]
    assert not errors, errors[0]
    assert [p.exitcode for p in procs] == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got[0]["saved"] > 0 and got[1]["saved"] == 0   # rank 1 loaded rank 0's cache
    for k in range(STEPS):
        assert torch.equal(got[0]["tokens"][k], want[k][:MBS])
        assert torch.equal(got[1]["tokens"][k], want[k][MBS:])
    assert torch.equal(got[1]["valid0"], ref_valid[0]["tokens"])
