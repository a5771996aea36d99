"""Fused PEER ops (megapeer/ops/peer_cuda.py, csrc/peer) against the reference (peer_ref.py).

CPU part (always runs): the torch.library registration (opcheck: schema, fake
impl, autograd registration, AOT dispatch) and the autograd formulas, through the
ops' CPU implementations, against autograd of the reference.

GPU part (skipped without CUDA or without the built extension): forward and every
gradient on fresh random inputs against an fp64 reference; bf16 within twice the
plain PyTorch bf16 error, fp32 tight; awkward shapes; bitwise repeatability of the
deterministic mode.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from megapeer.ops import dispatch, peer_cuda, peer_ref

# ---------------------------------------------------------------------------
# CPU: registration and autograd formulas


def _cpu_case(T=6, h=2, k=3, N=7, d=5, m=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, dtype=dtype, generator=g)
    idx = torch.randint(0, N, (T, h, k), generator=g)
    U = torch.randn(N * m, d, dtype=dtype, generator=g)
    V = torch.randn(N * m, d, dtype=dtype, generator=g)
    w = torch.randn(T, h, k, m, dtype=dtype, generator=g)
    return x, idx, U, V, w


def test_opcheck_cpu():
    from torch.library import opcheck
    x, idx, U, V, w = _cpu_case(dtype=torch.float32)
    m = 2
    opcheck(torch.ops.megapeer.gather_dot.default, (x.requires_grad_(), idx, U.requires_grad_(), m, 0, 4))
    opcheck(torch.ops.megapeer.gather_axpy.default, (w.requires_grad_(), idx, V.requires_grad_(), m))
    for tab in (V.detach(), None):
        opcheck(torch.ops.megapeer.expert_scatter.default, (w.detach(), idx, x.detach(), tab, U.shape[0], m, 0, 4))


@pytest.mark.parametrize("need", ["all", "w_only", "V_only"])
def test_autograd_formulas_cpu_match_reference(need):
    x, idx, U, V, w = _cpu_case()
    m = 2
    req = {"all": (True, True), "w_only": (True, False), "V_only": (False, True)}[need]
    x.requires_grad_(req[0]); U.requires_grad_(req[1]); w.requires_grad_(req[0]); V.requires_grad_(req[1])
    leaves = [t for t in (x, U, w, V) if t.requires_grad]
    gs = torch.randn(*idx.shape, m, dtype=x.dtype)
    go = torch.randn(x.shape[0], V.shape[1], dtype=x.dtype)

    def grads(mod):
        s = mod.gather_dot(x, idx, U, m)
        out = mod.gather_axpy(w, idx, V, m)
        return (s, out) + torch.autograd.grad((s, out), leaves, (gs, go))

    for a, b in zip(grads(peer_ref), grads(peer_cuda)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x_, U_: peer_cuda.gather_dot(x_, idx, U_, m),
                                    (x.detach().requires_grad_(), U.detach().requires_grad_()))
    assert torch.autograd.gradcheck(lambda w_, V_: peer_cuda.gather_axpy(w_, idx, V_, m),
                                    (w.detach().requires_grad_(), V.detach().requires_grad_()))


def test_dispatch_on_cpu_uses_reference():
    x, idx, U, V, w = _cpu_case(dtype=torch.float32)
    torch.testing.assert_close(dispatch.gather_dot(x, idx, U, 2), peer_ref.gather_dot(x, idx, U, 2))
    torch.testing.assert_close(dispatch.gather_axpy(w, idx, V, 2, mode="reference"), peer_ref.gather_axpy(w, idx, V, 2))
    if not torch.cuda.is_available():
        ok, why = dispatch.kernel_status()
        assert not ok and "CUDA" in why
        with pytest.raises(RuntimeError, match="fused"):
            dispatch.gather_dot(x, idx, U, 2, mode="fused")
    with pytest.raises(ValueError):
        dispatch.gather_dot(x, idx, U, 2, mode="fast")


def test_auto_picks_grouped_for_wide_experts_with_many_pairs(monkeypatch):
    """'auto' on CUDA operands: grouped Triton kernels from width 16 and 16 pairs per expert
    on average (the shapes decide; no data is read), the fused kernels otherwise."""
    from types import SimpleNamespace

    from megapeer.ops import peer_grouped
    monkeypatch.setattr(peer_grouped, "available", lambda: (True, "test"))
    monkeypatch.setattr(dispatch, "_use_fused", lambda mode, *t: True)

    def path(T, n_exp, m, hk=8):
        idx = SimpleNamespace(numel=lambda: T * hk)
        tab = SimpleNamespace(is_cuda=True, shape=(n_exp * m, 64))
        return dispatch._path("auto", idx, m, SimpleNamespace(is_cuda=True), tab).__name__

    assert path(T=2 * 64, n_exp=64, m=16) == peer_grouped.__name__      # 16 pairs per expert
    assert path(T=2 * 64 - 1, n_exp=64, m=16) == peer_cuda.__name__     # just below
    assert path(T=4096, n_exp=64, m=8) == peer_cuda.__name__            # too narrow
    monkeypatch.setattr(peer_grouped, "available", lambda: (False, "no Triton"))
    assert path(T=4096, n_exp=64, m=16) == peer_cuda.__name__


def test_other_ranks_pairs_per_path(monkeypatch):
    """Under expert parallelism the pairs of other ranks become -1 for the fused kernels
    (skipped), the sentinel id (the expert count) for the grouped kernels (left out of
    their work), clamped ids for gmm, ids spread over the rows for the reference (whose
    GPU index backward serialises repeated rows)."""
    from megapeer.ops import peer_gmm, peer_grouped
    idx = torch.tensor([[-5, 0, 3, 9]])             # local ids of a rank with 4 experts
    own = (idx >= 0) & (idx < 4)
    x = U = torch.zeros(1)
    for path, want in ((peer_cuda, [[-1, 0, 3, -1]]), (peer_grouped, [[4, 0, 3, 4]]),
                       (peer_gmm, [[0, 0, 3, 3]]), (peer_ref, [[3, 0, 3, 1]])):
        monkeypatch.setattr(dispatch, "_path", lambda *a, p=path: p)
        got = dispatch.foreign_pairs_to_rows("auto", idx, own, 4, 1, x, U)
        assert got.tolist() == want, path.__name__


def test_algorithm_settings():
    st = peer_cuda._settings
    saved = (st.dot, st.scatter, st.chunk, st.deterministic)
    try:
        peer_cuda.set_algorithms(dot="token", scatter="atomic", chunk=8)
        assert peer_cuda.get_algorithms()["scatter"] == "atomic"
        peer_cuda.set_deterministic(True)
        assert peer_cuda.get_algorithms()["scatter"] == "sorted"
        with pytest.raises(ValueError):
            peer_cuda.set_algorithms(dot="bogus")
        peer_cuda.set_algorithms(dot="auto")   # by pairs per expert (T*h*k / N)
        reuse = peer_cuda.AUTO_EXPERT_REUSE
        idx = torch.zeros(64, 4, 8, dtype=torch.long)        # 2048 pairs
        assert peer_cuda._dot_algo(idx, 2048 // reuse * 3, 3) == peer_cuda._DOT["expert"]
        assert peer_cuda._dot_algo(idx, 2048 // reuse * 3 + 3, 3) == peer_cuda._DOT["token"]
        peer_cuda.set_algorithms(dot="token")
        assert peer_cuda._dot_algo(idx, 3, 3) == peer_cuda._DOT["token"]
    finally:
        st.dot, st.scatter, st.chunk, st.deterministic = saved


# ---------------------------------------------------------------------------
# GPU


def _fused_ok():
    try:
        return peer_cuda.available()
    except Exception as e:  # pragma: no cover
        return False, str(e)


_OK, _WHY = _fused_ok()
gpu = pytest.mark.skipif(not _OK, reason=f"fused PEER kernels unavailable: {_WHY}")


@contextlib.contextmanager
def algorithms(dot=None, scatter=None, chunk=None, deterministic=False):
    st = peer_cuda._settings
    saved = (st.dot, st.scatter, st.chunk, st.deterministic)
    peer_cuda.set_algorithms(dot=dot, scatter=scatter, chunk=chunk)
    peer_cuda.set_deterministic(deterministic)
    try:
        yield
    finally:
        st.dot, st.scatter, st.chunk, st.deterministic = saved


@pytest.fixture(autouse=True)
def _poison_allocator():
    """Leave NaNs in the caching allocator's free blocks: an unwritten output shows up."""
    if torch.cuda.is_available():
        junk = torch.full((64 << 20,), float("nan"), device="cuda")
        del junk
    yield


def _relerr(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _make(T, h, k, N, d, m, dtype, idx=None, seed=None, table_view=False):
    g = torch.Generator(device="cuda")
    g.seed() if seed is None else g.manual_seed(seed)
    dev = "cuda"
    if idx is None:
        idx = torch.randint(0, N, (T, h, k), device=dev, generator=g)
    x = torch.randn(T, d, device=dev, generator=g)
    if table_view:   # a d-slice of a wider table, as under tensor parallelism (row stride != d)
        U = torch.randn(N * m, d + 64, device=dev, generator=g)[:, 32:32 + d]
        V = torch.randn(N * m, d + 64, device=dev, generator=g)[:, 32:32 + d]
    else:
        U = torch.randn(N * m, d, device=dev, generator=g)
        V = torch.randn(N * m, d, device=dev, generator=g)
    w = torch.randn(T, h, k, m, device=dev, generator=g)
    gs = torch.randn(T, h, k, m, device=dev, generator=g)
    go = torch.randn(T, d, device=dev, generator=g)
    return dict(x=x, idx=idx, U=U, V=V, w=w, gs=gs, go=go)


def _run(mod, c, dtype, m):
    x = c["x"].to(dtype).requires_grad_()
    U = c["U"].to(dtype).requires_grad_()
    w = c["w"].to(dtype).requires_grad_()
    V = c["V"].to(dtype).requires_grad_()
    s = mod.gather_dot(x, c["idx"], U, m)
    out = mod.gather_axpy(w, c["idx"], V, m)
    gx, gU, gw, gV = torch.autograd.grad((s, out), (x, U, w, V), (c["gs"].to(dtype), c["go"].to(dtype)))
    return {"s": s, "out": out, "grad_x": gx, "grad_U": gU, "grad_w": gw, "grad_V": gV}


def _check(c, dtype, m):
    ref = _run(peer_ref, c, torch.float64, m)
    got = _run(peer_cuda, c, dtype, m)
    base = _run(peer_ref, c, dtype, m) if dtype != torch.float32 else None
    for name in ref:
        assert got[name].dtype == dtype and got[name].shape == ref[name].shape, name
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite (unwritten?)"
        err = _relerr(got[name], ref[name])
        if dtype == torch.float32:
            assert err < 2e-5, f"{name}: fp32 relative error {err:.2e}"
        else:
            plain = _relerr(base[name], ref[name])
            assert err <= 2 * plain + 1e-6, f"{name}: bf16 error {err:.2e} vs plain PyTorch bf16 {plain:.2e}"


ALGOS = [("token", "sorted"), ("expert", "sorted"), ("expert", "atomic"), ("token", "atomic")]


@pytest.fixture(params=["default", "prefetch", "no-prefetch", "staged", "unstaged"])
def walk_variant(request, monkeypatch):
    """The table-row strategies of the expert-major walk (MEGAPEER_PEER_PREFETCH), and the
    table-gradient walks with and without their shared-memory staging (MEGAPEER_PEER_STAGE;
    by default it depends on the pairs per expert)."""
    monkeypatch.delenv("MEGAPEER_PEER_PREFETCH", raising=False)
    monkeypatch.delenv("MEGAPEER_PEER_STAGE", raising=False)
    if request.param in ("prefetch", "no-prefetch"):
        monkeypatch.setenv("MEGAPEER_PEER_PREFETCH", "1" if request.param == "prefetch" else "0")
    elif request.param in ("staged", "unstaged"):
        monkeypatch.setenv("MEGAPEER_PEER_STAGE", "1" if request.param == "staged" else "0")
    return request.param


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dot,scatter", ALGOS, ids=[f"{a}-{b}" for a, b in ALGOS])
def test_fused_matches_reference(dtype, dot, scatter, walk_variant):
    # T not a multiple of the 8 tokens a block handles; d = 1024 (one slice of 4 x 16 B per lane)
    c = _make(T=301, h=4, k=8, N=1024, d=1024, m=1, dtype=dtype)
    with algorithms(dot=dot, scatter=scatter):
        _check(c, dtype, 1)


SHAPES = {
    "m2_d192": dict(T=97, h=2, k=4, N=64, d=192, m=2),          # expert hidden size 2, NV=1
    "d2304_slices": dict(T=67, h=2, k=4, N=300, d=2304, m=1),   # several d-slices: partial sums
    "d100_scalar": dict(T=45, h=3, k=5, N=50, d=100, m=1),      # d not a multiple of 8: scalar path
    "d24_tiny": dict(T=9, h=1, k=3, N=5, d=24, m=3),
    "T1": dict(T=1, h=8, k=16, N=4096, d=512, m=1),
}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dot,scatter", [("expert", "sorted"), ("token", "atomic")], ids=["expert-sorted", "token-atomic"])
def test_awkward_shapes(dtype, shape, dot, scatter, walk_variant):
    c = _make(dtype=dtype, **SHAPES[shape])
    with algorithms(dot=dot, scatter=scatter):
        _check(c, dtype, SHAPES[shape]["m"])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_table_slice_with_row_stride(dtype):
    c = _make(T=64, h=2, k=4, N=128, d=256, m=1, dtype=dtype, table_view=True)
    _check(c, dtype, 1)


def _skewed_idx(T, h, k, N, hot=3, frac=0.6, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, N, (T, h, k), device="cuda", generator=g)
    hot_mask = torch.rand(T, h, k, device="cuda", generator=g) < frac
    idx[hot_mask] = hot
    idx[:, :, 0] = 11          # every head of every token also shares expert 11
    return idx


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [256, 7])
def test_experts_chosen_by_many_tokens_and_heads(dtype, chunk, walk_variant):
    T, h, k, N, d = 200, 4, 8, 97, 256
    c = _make(T=T, h=h, k=k, N=N, d=d, m=1, dtype=dtype, idx=_skewed_idx(T, h, k, N))
    for dot, scatter in (("expert", "sorted"), ("token", "atomic")):
        with algorithms(dot=dot, scatter=scatter, chunk=chunk):
            _check(c, dtype, 1)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dot,scatter", ALGOS, ids=[f"{a}-{b}" for a, b in ALGOS])
@pytest.mark.parametrize("m", [1, 2])
def test_pairs_with_id_minus_one_contribute_nothing(dtype, dot, scatter, m):
    """Expert parallelism gives the fused kernels other ranks' pairs as id -1
    (dispatch.foreign_pairs_to_rows): they must add nothing to out and to the gradients of
    x, U and V, and their s and w-gradient entries must be written as 0. Against the
    reference on the same case with those pairs' w and s-gradient zeroed (any ids there),
    with _check's tolerances."""
    T, h, k, N, d = 301, 4, 8, 512, 256
    c = _make(T=T, h=h, k=k, N=N, d=d, m=m, dtype=dtype)
    own = torch.rand(T, h, k, device="cuda") < 0.5
    keep = own.unsqueeze(-1).to(c["w"].dtype)
    ref_case = dict(c, w=c["w"] * keep, gs=c["gs"] * keep)
    got_case = dict(ref_case, idx=torch.where(own, c["idx"], -1))
    zero_at_foreign = ("s", "grad_w")
    ref = _run(peer_ref, ref_case, torch.float64, m)
    base = _run(peer_ref, ref_case, dtype, m)
    with algorithms(dot=dot, scatter=scatter):
        got = _run(peer_cuda, got_case, dtype, m)
    for name in ref:
        r, b, g = ref[name], base[name], got[name]
        assert torch.isfinite(g).all(), f"{name}: non-finite (unwritten?)"
        if name in zero_at_foreign:
            assert not g[~own].any(), f"{name}: nonzero at pairs with id -1"
            r, b, g = r * keep, b * keep, g * keep.to(dtype)
        err = _relerr(g, r)
        if dtype == torch.float32:
            assert err < 2e-5, f"{name}: fp32 relative error {err:.2e}"
        else:
            plain = _relerr(b, r)
            assert err <= 2 * plain + 1e-6, f"{name}: bf16 error {err:.2e} vs plain {plain:.2e}"


@gpu
def test_sort_pairs_is_stable_argsort():
    ext = peer_cuda._ext()
    N = 1000
    idx = _skewed_idx(64, 4, 8, N)
    perm, offsets = ext.sort_pairs(idx, N, 16)
    flat = idx.flatten()
    expect = torch.sort(flat, stable=True).indices
    assert torch.equal(perm.long(), expect)
    assert torch.equal(offsets.long(), torch.searchsorted(flat.sort().values, torch.arange(N + 1, device="cuda")))


@gpu
def test_table_gradient_passes_share_one_sort_and_never_a_stale_one(monkeypatch):
    """The sorted scatter keeps its sort for the next pass over the same idx (a layer's
    grad_U after its grad_V): the gradients equal those of a fresh sort bitwise, and an
    idx changed in place, or another idx, is sorted again (fp32, against the reference)."""
    ext = peer_cuda._ext()
    T, h, k, N, d = 300, 4, 8, 512, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(0, N, (T, h, k), device="cuda", generator=g)
    other = torch.randint(0, N, (T, h, k), device="cuda", generator=g)
    x = torch.randn(T, d, device="cuda", generator=g)
    coef = torch.randn(T, h, k, 1, device="cuda", generator=g)
    V = torch.randn(N, d, device="cuda", generator=g)

    def scatter(i, tab=None):
        return ext.expert_scatter(coef, i, x, tab, N, 1, ext.SCATTER_SORTED, 64)

    def ref(i):
        return peer_cuda._scatter_ref(coef, i, x, None, N, 1)[0]

    monkeypatch.setenv("MEGAPEER_PEER_SORT_REUSE", "0")
    fresh = scatter(idx, V)
    monkeypatch.setenv("MEGAPEER_PEER_SORT_REUSE", "1")
    first = scatter(idx, V)              # sorts and keeps the sort
    second = scatter(idx)                # takes it
    assert torch.equal(first[0], fresh[0]) and torch.equal(first[1], fresh[1])
    assert torch.equal(second[0], fresh[0])
    scatter(idx)                         # keeps a sort of idx ...
    idx.copy_(other)                     # ... then idx changes in place
    assert _relerr(scatter(idx)[0], ref(other)) < 1e-6
    scatter(idx)
    assert _relerr(scatter(idx.flip(0).contiguous())[0], ref(idx.flip(0))) < 1e-6


@gpu
@pytest.mark.parametrize("name", ["MEGAPEER_PEER_SORT_REUSE", "MEGAPEER_PEER_PREFETCH", "MEGAPEER_PEER_STAGE"])
def test_bad_switch_value_is_named(monkeypatch, name):
    """The kernels' environment switches take 0 or 1; another value is an error naming
    the variable (it was read as 'on' before)."""
    ext = peer_cuda._ext()
    idx = torch.randint(0, 64, (16, 2, 4), device="cuda")
    x, coef = torch.randn(16, 32, device="cuda"), torch.randn(16, 2, 4, 1, device="cuda")
    monkeypatch.setenv(name, "false")
    with pytest.raises(RuntimeError, match=f"{name} must be 0 or 1, got 'false'"):
        ext.expert_scatter(coef, idx, x, None, 64, 1, ext.SCATTER_SORTED, 64)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["d1024", "d2304_slices", "m2_d192", "heavy"])
@pytest.mark.parametrize("chunk", [256, 7])
def test_staged_walks_equal_register_walks_bitwise(monkeypatch, dtype, shape, chunk):
    """The staged table-gradient walks (rows through shared memory) sum the same products
    in the same order as the register walks: grad_U, grad_V and grad_w are bitwise equal,
    with and without fp32 accumulators (gradient-accumulation fusion). chunk 256 walks
    blocks of 64 positions (two index batches each), chunk 7 blocks of 7 and heavy chunks."""
    monkeypatch.setenv("MEGAPEER_PEER_SORT_REUSE", "0")   # each pass sorts, reading the switch
    cases = {"d1024": dict(T=301, h=4, k=8, N=1024, d=1024, m=1),
             "d2304_slices": SHAPES["d2304_slices"], "m2_d192": SHAPES["m2_d192"],
             "heavy": dict(T=200, h=4, k=8, N=97, d=256, m=1)}
    kw = cases[shape]
    idx = _skewed_idx(kw["T"], kw["h"], kw["k"], kw["N"]) if shape == "heavy" else None
    c = _make(**kw, dtype=dtype, idx=idx)
    ext, m, n_rows = peer_cuda._ext(), kw["m"], kw["N"] * kw["m"]
    x, go, V = c["x"].to(dtype), c["go"].to(dtype), c["V"].to(dtype)
    w, gs = c["w"].to(dtype), c["gs"].to(dtype)

    def passes():
        out = {}
        algo = ext.SCATTER_SORTED
        out["grad_V"], out["grad_w"] = ext.expert_scatter(w, c["idx"], go, V, n_rows, m, algo, chunk)
        out["grad_U"], _ = ext.expert_scatter(gs, c["idx"], x, None, n_rows, m, algo, chunk)
        acc = torch.randn(n_rows, kw["d"], device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        _, out["grad_w_acc"] = ext.expert_scatter(w, c["idx"], go, V, n_rows, m, algo, chunk, acc=acc)
        out["acc"] = acc
        return out

    monkeypatch.setenv("MEGAPEER_PEER_STAGE", "0")
    ref = passes()
    monkeypatch.setenv("MEGAPEER_PEER_STAGE", "1")
    got = passes()
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{shape} {name}: staged walk differs"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_mode_is_bitwise_repeatable(dtype, walk_variant):
    T, h, k, N, d = 512, 8, 16, 2048, 512
    c = _make(T=T, h=h, k=k, N=N, d=d, m=1, dtype=dtype, idx=_skewed_idx(T, h, k, N, frac=0.3))
    with algorithms(scatter="atomic", chunk=64, deterministic=True):
        assert peer_cuda.get_algorithms()["scatter"] == "sorted"
        runs = [_run(peer_cuda, c, dtype, 1) for _ in range(3)]
    for name in runs[0]:
        for r in runs[1:]:
            assert torch.equal(r[name], runs[0][name]), f"{name} differs between runs"


@gpu
def test_torch_deterministic_flag_selects_sorted():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        with algorithms(scatter="atomic"):
            torch.use_deterministic_algorithms(True)
            assert peer_cuda.get_algorithms()["scatter"] == "sorted"
    finally:
        torch.use_deterministic_algorithms(before)


@gpu
def test_peer_experts_end_to_end_bf16():
    T, h, k, N, d = 256, 8, 16, 4096, 512
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, d, device="cuda", generator=g)
    idx = torch.randint(0, N, (T, h, k), device="cuda", generator=g)
    scores = torch.randn(T, h, k, device="cuda", generator=g)
    U = torch.randn(N, d, device="cuda", generator=g) * d ** -0.5
    V = torch.randn(N, d, device="cuda", generator=g)
    go = torch.randn(T, d, device="cuda", generator=g)

    def run(mod, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, scores, U, V)]
        xx, sc, UU, VV = leaves
        out = mod.peer_experts(xx, idx, sc.softmax(-1), UU, VV, F.gelu)
        return [out] + list(torch.autograd.grad(out, leaves, go.to(dtype)))

    ref = run(peer_ref, torch.float64)
    got = run(peer_cuda, torch.bfloat16)
    plain = run(peer_ref, torch.bfloat16)
    for name, a, b, r in zip(["out", "x", "scores", "U", "V"], got, plain, ref):
        assert _relerr(a, r) <= 2 * _relerr(b, r) + 1e-6, name


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_no_host_synchronisation(deterministic):
    """The fused expert step, forward + backward (with and without the main_grad
    accumulators), never makes the host wait for the GPU: run under
    torch.cuda.set_sync_debug_mode("error"), which raises at any synchronising call."""
    T, h, k, N, d = 256, 4, 8, 1024, 256
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, N, (T, h, k), device="cuda")
    gates = torch.rand(T, h, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    U, V = (torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    acc = [torch.zeros(N, d, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    peer_cuda.set_deterministic(deterministic)
    torch.cuda.set_sync_debug_mode("error")
    try:
        peer_cuda.peer_experts(x, idx, gates, U, V, F.gelu).sum().backward()
        peer_ref.expert_step(lambda a, i, t, m: peer_cuda.gather_dot(a, i, t, m, acc=acc[0]),
                             lambda a, i, t, m: peer_cuda.gather_axpy(a, i, t, m, acc=acc[1]),
                             x, idx, gates, U, V, F.gelu, 1).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        peer_cuda.set_deterministic(False)


@gpu
def test_dispatch_picks_fused_on_cuda():
    ok, why = dispatch.kernel_status()
    assert ok, why
    c = _make(T=16, h=2, k=4, N=32, d=64, m=1, dtype=torch.bfloat16)
    x, U = c["x"].bfloat16(), c["U"].bfloat16()
    torch.testing.assert_close(dispatch.gather_dot(x, c["idx"], U, 1, mode="fused"),
                               peer_ref.gather_dot(x, c["idx"], U, 1), rtol=2e-2, atol=2e-2)
    # float16 is not a fused dtype: auto falls back, fused refuses
    xh, Uh = c["x"].half(), c["U"].half()
    torch.testing.assert_close(dispatch.gather_dot(xh, c["idx"], Uh, 1), peer_ref.gather_dot(xh, c["idx"], Uh, 1))
    with pytest.raises(RuntimeError, match="bfloat16 or all float32"):
        dispatch.gather_dot(xh, c["idx"], Uh, 1, mode="fused")


@gpu
def test_opcheck_cuda():
    from torch.library import opcheck
    c = _make(T=24, h=2, k=4, N=40, d=64, m=2, dtype=torch.float32)
    x, U, V, w, idx = c["x"], c["U"], c["V"], c["w"], c["idx"]
    opcheck(torch.ops.megapeer.gather_dot.default, (x.requires_grad_(), idx, U.requires_grad_(), 2, 1, 256))
    opcheck(torch.ops.megapeer.gather_axpy.default, (w.requires_grad_(), idx, V.requires_grad_(), 2))
    opcheck(torch.ops.megapeer.expert_scatter.default, (w.detach(), idx, x.detach(), V.detach(), V.shape[0], 2, 0, 256))


def _micro_batches(cfg):
    return cfg.training.global_batch_size // cfg.training.micro_batch_size   # one rank


def test_training_log_names_the_kernel_auto_picks(monkeypatch, caplog):
    """On a GPU with wide experts and many pairs each, the trainer's summary names the
    grouped Triton kernels (what 'auto' runs), not the fused ones."""
    import logging

    from megapeer.config import load_config
    from megapeer.ops import peer_grouped
    from megapeer.training import loop
    wide = load_config(overrides=["model.peer.num_experts=[8,8]", "model.peer.expert_hidden=16",
                                  "training.micro_batch_size=2", "model.seq_length=128"],
                       world_size=1)
    narrow = load_config(overrides=["model.peer.num_experts=[8,8]"], world_size=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(peer_grouped, "available", lambda: (True, "test"))
    import megapeer.ops
    monkeypatch.setattr(megapeer.ops, "kernel_status", lambda: (True, "test"))
    with caplog.at_level(logging.INFO, logger=loop.log.name):
        loop._log_model_summary(wide, None, _micro_batches(wide))
    pairs = 2 * 128 * wide.model.peer.heads * wide.model.peer.topk // 64
    assert f"grouped Triton kernels (experts of width 16, ~{pairs} pairs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=loop.log.name):
        loop._log_model_summary(narrow, None, _micro_batches(narrow))
    assert "PEER expert kernel: fused CUDA" in caplog.text
