"""ops/product_topk.py: PEER's product-key top-k, reference and Triton kernel.

CPU: the reference against an exhaustive top-k of all n0 * n1 sums and against a
brute-force statement of the tie rule; argument checks; which sizes the kernel takes.
Interpreter: this file, run as a script in a subprocess with TRITON_INTERPRET=1 (set before
Triton is imported), runs the kernel on fresh random inputs (sizes below: non-powers of
two, k > ck, k = ck * ck, ragged last block, strided views, ties, inf / NaN / -0) and the
tests compare it with the reference: the same ids, the same sums, valid distinct pairs.
GPU (skipped without CUDA): the kernel at the shapes PEER uses, without a host sync.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megapeer.ops import product_topk as pt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (R, n0, n1, ck, k, dtype, layout, values); some R not a multiple of BLOCK_R; stage 2
# on the full ck x ck grid (k_eq_ck2, non_pow2_k_gt_ck, transposed, ties_int, special) or on
# the two strips (the others)
CASES = {
    "pow2_fp32": (67, 16, 16, 8, 8, "float32", "contig", "randn"),
    "non_pow2_k_gt_ck_bf16": (37, 24, 100, 8, 16, "bfloat16", "contig", "randn"),
    "k_eq_ck2": (9, 16, 13, 4, 16, "float32", "contig", "randn"),
    "ck32_bf16": (7, 64, 64, 32, 32, "bfloat16", "contig", "randn"),
    "n1024": (5, 1024, 1000, 16, 16, "float32", "contig", "randn"),
    "ck64_k_lt_ck": (3, 64, 100, 64, 40, "bfloat16", "contig", "randn"),
    "smallest": (6, 2, 3, 1, 1, "float32", "contig", "randn"),
    "n2_k4": (6, 2, 2, 2, 4, "float16", "contig", "randn"),
    "strided_fp16": (21, 48, 40, 8, 12, "float16", "strided", "randn"),
    "transposed": (19, 33, 17, 5, 25, "float32", "transposed", "randn"),
    "ties_int": (45, 24, 20, 8, 20, "float32", "contig", "ints"),
    "ties_int_bf16": (33, 100, 64, 16, 16, "bfloat16", "contig", "ints"),
    "all_equal": (5, 16, 16, 8, 16, "float32", "contig", "zeros"),
    "all_equal_strips": (5, 16, 16, 8, 6, "float32", "contig", "zeros"),
    "special": (40, 12, 12, 6, 9, "float32", "contig", "special"),
    "special_strips": (40, 24, 20, 16, 8, "float32", "contig", "special"),
    "ck128_small_k": (3, 256, 130, 128, 10, "bfloat16", "contig", "randn"),
}


def _values(R, n, dtype, values, g):
    if values == "randn":
        x = torch.randn(R, n, generator=g)
    elif values == "ints":                          # many ties, exact fp32 sums
        x = torch.randint(-2, 3, (R, n), generator=g).float()
    elif values == "zeros":
        x = torch.zeros(R, n)
    else:                                           # +-inf, NaN, +-0 and a few values
        pool = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1.0, -1.0])
        x = pool[torch.randint(0, len(pool), (R, n), generator=g)]
    return x.to(getattr(torch, dtype))


def _layout(x, how):
    """x itself or a non-contiguous view holding the same values."""
    if how == "strided":                            # column stride 2
        big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if how == "transposed":                         # row stride 1
        return x.t().contiguous().t()
    return x


def _brute(s0, s1, ck, k):
    """The tie rule stated directly: sub-keys by (score desc, index asc), top ck; pairs by
    (fp32 sum desc, a * ck + b asc) over the two sorted lists, top k."""
    out0, out1 = [], []
    for x0, x1 in zip(s0.float().tolist(), s1.float().tolist()):
        a = sorted(range(len(x0)), key=lambda j: (-x0[j], j))[:ck]
        b = sorted(range(len(x1)), key=lambda j: (-x1[j], j))[:ck]
        v = (torch.tensor([x0[j] for j in a])[:, None]
             + torch.tensor([x1[j] for j in b])[None, :]).flatten().tolist()
        pos = sorted(range(ck * ck), key=lambda p: (-v[p], p))[:k]
        out0.append([a[p // ck] for p in pos])
        out1.append([b[p % ck] for p in pos])
    return torch.tensor(out0), torch.tensor(out1)


def _f32(x):
    """fp32 scores as ranked: NaN as -inf."""
    return x.float().nan_to_num(nan=-float("inf"), posinf=float("inf"), neginf=-float("inf"))


def _sums(s0, s1, i0, i1):
    return _f32(_f32(s0).gather(-1, i0) + _f32(s1).gather(-1, i1))


def _assert_topk(s0, s1, ck, k, i0, i1):
    """(i0, i1) is a valid product top-k equal to the reference's."""
    R, n0 = s0.shape
    n1 = s1.shape[1]
    assert i0.shape == i1.shape == (R, k) and i0.dtype == i1.dtype == torch.int64
    assert ((i0 >= 0) & (i0 < n0) & (i1 >= 0) & (i1 < n1)).all()
    pairs = (i0 * n1 + i1).sort(-1).values
    assert (pairs[:, 1:] != pairs[:, :-1]).all(), "repeated (i0, i1) pair"
    # each side's ids among its top ck (by score; any of a tied group will do)
    for s, i in ((_f32(s0), i0), (_f32(s1), i1)):
        kth = s.sort(-1, descending=True).values[:, ck - 1:ck]
        assert (s.gather(-1, i) >= kth).all()
    r0, r1 = pt.product_topk_ref(s0, s1, ck, k)
    got = _sums(s0, s1, i0, i1)
    assert torch.equal(got, _sums(s0, s1, r0, r1)), "selected sums differ"
    assert (got[:, 1:] <= got[:, :-1]).all(), "not sorted by descending sum"
    # ids: rows whose ck * ck candidate sums are all distinct first (any top-k agrees there)
    v0 = _f32(s0).sort(-1, descending=True).values[:, :ck]
    v1 = _f32(s1).sort(-1, descending=True).values[:, :ck]
    comb = _f32(v0[:, :, None] + v1[:, None, :]).flatten(1).sort(-1).values
    untied = (comb[:, 1:] != comb[:, :-1]).all(-1)
    assert torch.equal(i0[untied], r0[untied]) and torch.equal(i1[untied], r1[untied])
    # and everywhere: the kernel's tie rule is the reference's
    assert torch.equal(i0, r0) and torch.equal(i1, r1), "tie order differs from the reference"


# ------------------------------------------------------------------ reference, CPU
@pytest.mark.parametrize("n0,n1,ck,k", [(16, 16, 8, 8), (24, 100, 12, 10), (64, 64, 32, 32),
                                        (256, 200, 16, 16), (7, 5, 5, 3), (3, 2, 2, 1)])
def test_reference_is_the_exhaustive_topk(n0, n1, ck, k):
    g = torch.Generator().manual_seed(n0 * 1000 + n1)
    s0, s1 = torch.randn(40, n0, generator=g), torch.randn(40, n1, generator=g)
    i0, i1 = pt.product_topk_ref(s0, s1, ck, k)
    got = _sums(s0, s1, i0, i1)
    full = (s0[:, :, None] + s1[:, None, :]).flatten(1)          # all n0 * n1 sums, fp32
    assert torch.equal(got, full.topk(k, -1).values)             # exact, since ck >= k
    assert torch.equal(i0 * n1 + i1, full.topk(k, -1).indices)   # random: no ties


def test_reference_with_k_above_ck_and_ties():
    g = torch.Generator().manual_seed(1)
    s0, s1 = torch.randn(30, 16, generator=g), torch.randn(30, 16, generator=g)
    i0, i1 = pt.product_topk_ref(s0, s1, 4, 16)       # k = ck * ck: every candidate
    assert torch.equal(_sums(s0, s1, i0, i1),
                       (s0.topk(4).values[:, :, None] + s1.topk(4).values[:, None, :])
                       .flatten(1).sort(-1, descending=True).values)
    for x0, x1 in ((torch.randint(-2, 3, (30, 24), generator=g).float(),
                    torch.randint(-2, 3, (30, 20), generator=g).float()),
                   (torch.zeros(3, 9), torch.zeros(3, 9))):
        for ck, k in ((8, 8), (8, 20), (5, 25)):
            r = pt.product_topk_ref(x0, x1, ck, k)
            b = _brute(x0, x1, ck, k)
            assert torch.equal(r[0], b[0]) and torch.equal(r[1], b[1]), (ck, k)


def test_bad_inputs_name_the_argument():
    s0, s1 = torch.randn(4, 16), torch.randn(4, 12)
    bad = [((s0, s1, 0, 1), "ck"), ((s0, s1, 13, 4), "ck"), ((s0, s1, 4, 17), "k must"),
           ((s0, s1, 4, 0), "k must"), ((s0, torch.randn(5, 12), 4, 4), "same number of rows"),
           ((s0[0], s1, 4, 4), "s0 must be a 2-D"), ((s0, s1.long(), 4, 4), "s1 must be floating"),
           ((s0, s1, 4.0, 4), "ck")]
    for fn in (pt.product_topk, pt.product_topk_ref):
        for args, msg in bad:
            with pytest.raises(ValueError, match=msg):
                fn(*args)


def _fits(n0, n1, ck, k):
    """Whether the kernel takes these sizes (else the reference runs; never a wrong answer)."""
    return pt._config(n0, n1, ck, k) is not None


def test_which_sizes_the_kernel_takes(monkeypatch):
    assert _fits(1024, 1024, 64, 64) and _fits(16, 16, 8, 8) and _fits(2, 2, 1, 1)
    assert _fits(4096, 4096, 16, 16) and _fits(100, 24, 8, 64)
    assert _fits(64, 64, 64, 4096)              # 64 * 64 candidates
    assert _fits(256, 256, 128, 16)             # strips: 2 * 4 * 128 candidates
    assert not _fits(8192, 16, 4, 4)            # row too long to sort in one program
    assert not _fits(128, 128, 128, 2000)       # 128 * 128 candidates
    assert not _fits(4096, 4096, 32, 32)        # 34 bits of low key
    assert not _fits(1024, 1024, 128, 16)
    assert pt._config(64, 64, 32, 32)["SP"] == 8 and pt._config(16, 16, 8, 8)["SP"] == 2
    assert pt._config(16, 16, 8, 16)["SP"] == 8    # k = 16: strips 4 wide would be all
    s = torch.randn(3, 16)
    # (TRITON_INTERPRET itself is left alone: Triton reads it once, when imported here)
    monkeypatch.setattr(pt, "interpret", lambda: False)
    assert not pt.uses_kernel(s, s, 4, 4)           # CPU without the interpreter
    monkeypatch.setattr(pt, "interpret", lambda: True)
    assert pt.uses_kernel(s, s, 4, 4) == pt.available()
    assert not pt.uses_kernel(s.double(), s, 4, 4)
    assert not pt.uses_kernel(torch.randn(3, 8192), s, 4, 4)
    monkeypatch.setattr(pt, "interpret", lambda: False)
    i0, i1 = pt.product_topk(s, s.flip(-1), 4, 6)   # the reference serves
    r0, r1 = pt.product_topk_ref(s, s.flip(-1), 4, 6)
    assert torch.equal(i0, r0) and torch.equal(i1, r1)


# ------------------------------------------------------------------ kernel, interpreter
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    d = tmp_path_factory.mktemp("product_topk")
    seed = int.from_bytes(os.urandom(4), "little")   # fresh inputs each run
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, (R, n0, n1, ck, k, dtype, layout, values) in CASES.items():
        inputs[name] = (_values(R, n0, dtype, values, g), _values(R, n1, dtype, values, g))
    torch.save(inputs, d / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), str(d)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return seed, inputs, torch.load(d / "out.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_interpreted(interpreted, name):
    seed, inputs, outputs = interpreted
    R, n0, n1, ck, k, dtype, layout, values = CASES[name]
    s0, s1 = inputs[name]
    used, i0, i1 = outputs[name]
    assert used, "the kernel did not run"
    try:
        _assert_topk(s0, s1, ck, k, i0, i1)
        if values in ("ints", "zeros"):             # the tie rule, stated independently
            b0, b1 = _brute(s0, s1, ck, k)
            assert torch.equal(i0, b0) and torch.equal(i1, b1)
        if values == "zeros":
            assert torch.equal(i0, (torch.arange(k) // ck).expand(R, k))
            assert torch.equal(i1, (torch.arange(k) % ck).expand(R, k))
    except AssertionError as e:
        raise AssertionError(f"{name}, input seed {seed}: {e}") from e


# ------------------------------------------------------------------ kernel, GPU
BF16, FP32 = torch.bfloat16, torch.float32
GPU_CASES = [(32768, 16, 16, 8, 8, BF16), (65536, 64, 64, 32, 32, BF16),
             (131072, 256, 256, 16, 16, BF16), (16384, 1024, 1024, 16, 16, BF16),
             (4099, 1024, 1000, 64, 64, BF16), (5000, 24, 100, 8, 16, BF16),
             (65536, 64, 64, 32, 32, FP32), (3000, 100, 100, 10, 100, FP32)]


@pytest.mark.skipif(not torch.cuda.is_available() or pt.interpret(),
                    reason="needs CUDA (and no TRITON_INTERPRET)")
def test_kernel_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    for R, n0, n1, ck, k, dtype in GPU_CASES:
        s0 = torch.randn(R, n0, device="cuda", generator=g).to(dtype)
        s1 = torch.randn(R, 2 * n1, device="cuda", generator=g).to(dtype)[:, ::2]   # strided
        if k == 100:                                  # and inf, -inf, NaN
            s0[::7, ::3], s0[::5, 1::4], s1[::3, ::5] = float("inf"), -float("inf"), float("nan")
        assert pt.uses_kernel(s0, s1, ck, k)
        torch.cuda.set_sync_debug_mode("error")
        try:
            i0, i1 = pt.product_topk(s0, s1, ck, k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        r0, r1 = pt.product_topk_ref(s0, s1, ck, k)
        assert torch.equal(i0, r0) and torch.equal(i1, r1), (R, n0, n1, ck, k, dtype)
        sub = slice(0, 512)     # the full checks on a slice (they loop on the host)
        _assert_topk(s0[sub].cpu(), s1[sub].cpu(), ck, k, i0[sub].cpu(), i1[sub].cpu())


def _worker(d):
    """Subprocess (TRITON_INTERPRET=1): run the kernel on in.pt's inputs, write out.pt."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {}
    for name, (s0, s1) in torch.load(os.path.join(d, "in.pt")).items():
        R, n0, n1, ck, k, dtype, layout, values = CASES[name]
        v0, v1 = _layout(s0, layout), _layout(s1, layout)
        assert torch.equal(v0.nan_to_num(), s0.nan_to_num())
        assert layout == "contig" or not (v0.is_contiguous() or v1.is_contiguous())
        out[name] = (pt.uses_kernel(v0, v1, ck, k), *pt.product_topk(v0, v1, ck, k))
    torch.save(out, os.path.join(d, "out.pt"))


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_model_trains_the_same_with_the_kernel():
    """The tiny MLA+PEER (fp32, two sub-key sets of 16) with model.peer.topk_kernel=triton
    gives the torch top-k's per-step losses (1e-6 relative; fp32 scores: the same experts),
    eager and compiled (the op stays one call in the layer's graph), with the kernel
    running (interpreted on a CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers",
                                                     "topk_train_check.py"), "eager,default"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    for mode in ("eager", "default"):
        ref, got = r[f"{mode}_torch"], r[f"{mode}_triton"]
        assert ref["kernel"] == 0 and got["kernel"] > 0, r
        assert len(got["losses"]) == 3 and ref["losses"][0] != ref["losses"][-1], r
        for a, b in zip(got["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-6 * abs(b), r
