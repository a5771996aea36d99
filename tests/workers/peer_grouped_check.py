"""Worker for tests/test_peer_grouped.py: the grouped Triton path against the reference.

Run with TRITON_INTERPRET=1 on a CPU (the Triton interpreter), or on a GPU. Prints one
JSON object: for each case, the max error of the output and of every gradient relative
to the largest magnitude of the reference, in fp32.
"""
import json
from unittest import mock

import torch
import torch.nn.functional as F

from megapeer.ops import dispatch, peer_grouped, peer_ref

CASES = {  # name: (T, d, experts, m, heads, k)
    "m16": (45, 80, 12, 16, 2, 8),      # T, d not multiples of the tiles; empty experts likely
    "m4_padded": (33, 64, 9, 4, 3, 4),
    "m32_hot": (40, 48, 3, 32, 2, 6),   # 3 experts: many pairs each, several blocks
    "m1": (20, 32, 40, 1, 2, 4),        # single-neuron experts
    "m100_chunked": (30, 40, 3, 100, 2, 3),   # padded to 128: axpy loops over 2 chunks
    "m300_chunked": (12, 24, 2, 300, 1, 2),   # padded to 512: 4 column chunks everywhere
}


def run(case, dev, foreign=False):
    """foreign: ~40% of the pairs belong to another expert-parallel rank, as the model
    hands them over (dispatch.foreign_pairs_to_rows: the sentinel id n, their gates
    zeroed); the reference gets them spread over its rows (its form) with the same zero
    gates."""
    T, d, n, m, h, k = CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 1000)
    idx = torch.randint(0, n, (T, h, k), generator=g)
    if case == "m16":
        idx[0, :, :] = 5                # one token choosing the same expert in every slot
        idx[:, 0, 0] = 7                # one expert chosen by every token
    own = torch.rand(T, h, k, generator=g) > (0.4 if foreign else -1)
    x = torch.randn(T, d + 8, generator=g)[:, 4:4 + d]   # a column slice, as under TP
    U, V = torch.randn(n * m, d, generator=g), torch.randn(n * m, d, generator=g)
    gates = torch.randn(T, h, k, generator=g).softmax(-1)
    go = torch.randn(T, d, generator=g)
    out = {}
    for name, mod in (("ref", peer_ref), ("grp", peer_grouped)):
        leaves = [t.clone().to(dev).requires_grad_() for t in (x, U, V, gates)]
        ids = dispatch.foreign_pairs_to_rows("reference" if mod is peer_ref else "grouped",
                                             idx, own, n, m, x, U).to(dev)
        y = mod.peer_experts(leaves[0], ids, leaves[3] * own.to(dev), leaves[1], leaves[2],
                             F.gelu, m)
        y.backward(go.to(dev))
        out[name] = [y.detach()] + [t.grad for t in leaves]
    errs = {}
    for i, nm in enumerate(["out", "x", "U", "V", "gates"]):
        r, a = out["ref"][i].cpu(), out["grp"][i].cpu()
        errs[nm] = float((a - r).abs().max() / r.abs().max().clamp(min=1e-30))
    errs["expert_order"] = float(peer_grouped.takes_expert_order(x.to(dev), U.to(dev), m))
    return errs


def bf16_errors(dev, T=512, d=256, n=64, m=16, h=4, k=16):
    """{grad: (grouped bf16 error, reference bf16 error)}, both against fp32."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, n, (T, h, k), generator=g).to(dev)
    base = [torch.randn(T, d, generator=g), torch.randn(n * m, d, generator=g) * d ** -0.5,
            torch.randn(n * m, d, generator=g) * d ** -0.5,
            torch.randn(T, h, k, generator=g).softmax(-1)]
    go = torch.randn(T, d, generator=g).to(dev)
    out = {}
    for name, mod, dt in (("f32", peer_ref, torch.float32), ("ref", peer_ref, torch.bfloat16),
                          ("grp", peer_grouped, torch.bfloat16)):
        leaves = [t.to(dev, dt).requires_grad_() for t in base]
        y = mod.peer_experts(leaves[0], idx, leaves[3], leaves[1], leaves[2], F.gelu, m)
        y.backward(go.to(dt))
        out[name] = [y.detach().float()] + [t.grad.float() for t in leaves]
    res = {}
    for i, nm in enumerate(["out", "x", "U", "V", "gates"]):
        r = out["f32"][i]
        s = r.abs().max()
        res[nm] = (float((out["grp"][i] - r).abs().max() / s),
                   float((out["ref"][i] - r).abs().max() / s))
    return res


def _repeats(dev, shape, seed, foreign=False):
    """Reference, then the grouped path twice, on fresh inputs of `shape`: per output, the
    error against the reference and the largest difference between the two repeats.
    foreign: a third of the pairs as other EP ranks' (the sentinel id, gates zeroed)."""
    T, d, n, m, h, k = shape
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (T, h, k), generator=g).to(dev)
    base = [torch.randn(T, d, generator=g), torch.randn(n * m, d, generator=g),
            torch.randn(n * m, d, generator=g), torch.randn(T, h, k, generator=g).softmax(-1)]
    go = torch.randn(T, d, generator=g).to(dev)
    own = (torch.rand(T, h, k, generator=g) > (1 / 3 if foreign else -1)).to(dev)
    runs = []
    for mod in (peer_ref, peer_grouped, peer_grouped):
        leaves = [t.to(dev).requires_grad_() for t in base]
        ids = idx if mod is peer_ref else dispatch.foreign_pairs_to_rows(
            "grouped", idx, own, n, m, leaves[0], leaves[1])
        y = mod.peer_experts(leaves[0], ids, leaves[3] * own, leaves[1], leaves[2], F.gelu, m)
        y.backward(go)
        runs.append([y.detach()] + [t.grad for t in leaves])
    res = {}
    for i, nm in enumerate(["out", "x", "U", "V", "gates"]):
        r, a, b = (run[i].cpu() for run in runs)
        res[nm] = float((a - r).abs().max() / r.abs().max())
        res[nm + "_repeat"] = float((a - b).abs().max())   # must be exactly 0
    return res


def deterministic(dev):
    """Deterministic mode: the per-pair axpy (several column passes, the last one narrower)
    against the reference, and bitwise repeatability of every output (on a GPU the atomic
    axpy would not repeat)."""
    from megapeer.ops import peer_cuda
    saved = peer_grouped.DET_COLS
    peer_cuda.set_deterministic(True)
    peer_grouped.DET_COLS = 32
    try:   # 80 columns: passes of 32, 32 and 16; then with other EP ranks' pairs
        res = _repeats(dev, (64, 80, 4, 16, 4, 8), 11)
        res.update({f"foreign_{k}": v for k, v in
                    _repeats(dev, (64, 80, 4, 16, 4, 8), 12, foreign=True).items()})
        return res
    finally:
        peer_cuda.set_deterministic(False)
        peer_grouped.DET_COLS = saved


def wide_rows(dev, expert_order=True):
    """Experts >= 128 wide: the axpy writes one row per pair in column passes (ROWS_BYTES
    made tiny: passes of 256, 256 and 88 columns in the token-ordered form, 64-column
    passes in the expert-ordered one), outside deterministic mode: reference values and
    bitwise-equal repeats."""
    with mock.patch.multiple(peer_grouped, ROWS_BYTES=1, SORTED_FORM=expert_order):
        return _repeats(dev, (24, 600, 3, 128, 2, 2), 13)


def other_settings(dev):
    """The axpy and scatter in the grid order before LOCAL, the scatter with its pair ids
    loaded a step ahead (PREFETCH; benchmarks' comparisons) and with 64-bit offsets (what
    inputs past 2**31 elements take): the same values, narrow and chunked wide experts."""
    res = {}
    for name, change in (("unlocal", {"LOCAL": False}), ("prefetch", {"PREFETCH": True}),
                         ("offsets64", {"I32": False})):
        with peer_grouped.tiles_changed(**change):
            for c in ("m16", "m32_hot", "m100_chunked"):
                res[f"{name}_{c}"] = run(c, dev)
    with mock.patch.object(peer_grouped, "SORTED_FORM", False):   # the token-ordered form
        for c in ("m100_chunked", "m300_chunked"):
            res[f"token_order_{c}"] = run(c, dev)
    res["token_order_wide_rows"] = wide_rows(dev, expert_order=False)
    return res


def compiled(dev):
    """The expert step under torch.compile (as compiled layers run it): wide experts (the
    expert-ordered form where the dtype takes it) and narrow ones, against the reference."""
    res = {}
    for case in ("m16", "m100_chunked"):
        T, d, n, m, h, k = CASES[case]
        g = torch.Generator().manual_seed(5)
        idx = torch.randint(0, n, (T, h, k), generator=g).to(dev)
        base = [torch.randn(T, d, generator=g), torch.randn(n * m, d, generator=g),
                torch.randn(n * m, d, generator=g), torch.randn(T, h, k, generator=g).softmax(-1)]
        go = torch.randn(T, d, generator=g).to(dev)
        outs = []
        for fn in (peer_ref.peer_experts, torch.compile(peer_grouped.peer_experts)):
            leaves = [t.to(dev).requires_grad_() for t in base]
            y = fn(leaves[0], idx, leaves[3], leaves[1], leaves[2], F.gelu, m)
            y.backward(go)
            outs.append([y.detach()] + [t.grad for t in leaves])
        res[f"compiled_{case}"] = {
            nm: float((a - r).abs().max() / r.abs().max())
            for nm, a, r in zip(["out", "x", "U", "V", "gates"], outs[1], outs[0])}
    return res


def host_syncs(dev, shape=CASES["m16"], dtype=torch.float32):
    """A forward + backward under torch.cuda.set_sync_debug_mode("error"): the error text
    of the first operation that would wait for the GPU, or "" (no host sync)."""
    T, d, n, m, h, k = shape
    kw = dict(device=dev, dtype=dtype, requires_grad=True)
    leaves = [torch.randn(T, d, **kw), *(torch.randn(n * m, d, **kw) for _ in range(2)),
              torch.rand(T, h, k, **kw)]
    idx = torch.randint(0, n, (T, h, k), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = peer_grouped.peer_experts(leaves[0], idx, leaves[3], leaves[1], leaves[2], F.gelu, m)
        y.backward(torch.ones_like(y))
        return ""
    except RuntimeError as e:
        return str(e)[:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def foreign_zeros(dev):
    """The dot's outputs of sentinel pairs are exactly zero (both forms), in memory that
    held NaNs just before (the kernels must write them, not leave them): 1.0 if so."""
    T, d, n, m, h, k = 24, 32, 4, 16, 2, 3
    idx = torch.randint(0, n, (T, h, k), device=dev)
    idx[::2, :, 1] = n
    x, U = torch.randn(T, d, device=dev), torch.randn(n * m, d, device=dev)
    ok = True
    for srt in (False, True):
        torch.full((T * h * k * m,), float("nan"), device=dev)   # freed at once: reused next
        lay = peer_grouped.layout(idx, n, m)
        s = peer_grouped.gather_dot(x, idx, U, m, srt, lay).reshape(-1, m)
        sent = (idx.reshape(-1) == n)
        rows = lay[5][sent].long() if srt else sent.nonzero()[:, 0]
        ok &= bool((s[rows] == 0).all()) and bool(s.isfinite().all())
    return {"ok": float(ok)}


def layout_kernels(dev):
    """The layout's Triton kernels against layout_torch, exactly: random ids, other ranks'
    pairs (the sentinel), a hot expert over many blocks, experts left empty (also past the
    last id), more groups than one chunk of the per-group kernel, blocks of 1, no pairs.
    1.0 if every output is equal (values and dtype), else the first mismatch's case."""
    g = torch.Generator().manual_seed(7)
    for T, h, k, n, bm in [(37, 2, 3, 8, 64), (300, 4, 8, 256, 128), (700, 2, 4, 3000, 64),
                           (50, 2, 2, 2100, 1), (0, 2, 2, 5, 64)]:
        rnd = torch.randint(0, n, (T, h, k), generator=g)
        coin = torch.rand(T, h, k, generator=g)
        for name, idx in (("random", rnd), ("sentinel", torch.where(coin < 0.4, n, rnd)),
                          ("hot", torch.where(coin < 0.9, n // 2, rnd)),
                          ("sparse", rnd // 7 * 7), ("low", rnd // max(1, n // 3))):
            idx = idx.to(dev)
            with mock.patch.object(peer_grouped, "LAYOUT_KERNELS", True):
                a = peer_grouped._layout_op(idx, n, bm)
            b = peer_grouped.layout_torch(idx, n, bm)
            if not peer_grouped._layout_kernels(idx, n) or not all(
                    x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b)):
                return {"mismatch": f"{name} T={T} n={n} bm={bm}"}
    return {"ok": 1.0}


def layout_calls(dev):
    """How often one forward + backward of the expert step sorts its pairs (should be 1)."""
    from torch.profiler import profile
    T, d, n, m, h, k = CASES["m16"]
    x = torch.randn(T, d, device=dev, requires_grad=True)
    U, V = (torch.randn(n * m, d, device=dev, requires_grad=True) for _ in range(2))
    gates = torch.rand(T, h, k, device=dev, requires_grad=True)
    idx = torch.randint(0, n, (T, h, k), device=dev)
    with profile() as prof:
        peer_grouped.peer_experts(x, idx, gates, U, V, F.gelu, m).sum().backward()
    return sum(e.count for e in prof.key_averages() if e.key == "megapeer::grouped_layout")


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok, why = peer_grouped.available()
    if not ok:
        print(json.dumps({"unavailable": why}))
        return 0
    res = {c: run(c, dev) for c in CASES}
    # other expert-parallel ranks' pairs as the sentinel id: narrow (atomic axpy), wide in
    # expert order (grouped GEMM + gather-sum) and in token order (row-form axpy)
    res.update({f"foreign_{c}": run(c, dev, foreign=True) for c in ("m16", "m100_chunked")})
    with mock.patch.object(peer_grouped, "SORTED_FORM", False):
        res["foreign_token_order_m100"] = run("m100_chunked", dev, foreign=True)
    res["foreign_zeros"] = foreign_zeros(dev)
    # through the model's dispatch, as model.peer.kernel=grouped uses it
    x = torch.randn(16, 32, device=dev)
    idx = torch.randint(0, 8, (16, 2, 4), device=dev)
    U = torch.randn(8 * 16, 32, device=dev)
    a = dispatch.gather_dot(x, idx, U, 16, mode="grouped")
    b = peer_ref.gather_dot(x, idx, U, 16)
    res["dispatch"] = {"out": float((a - b).abs().max() / b.abs().max())}
    res["layout_calls"] = layout_calls(dev)
    res["layout_kernels"] = layout_kernels(dev)
    res["deterministic"] = deterministic(dev)
    res["wide_rows"] = wide_rows(dev)
    res.update(other_settings(dev))
    res.update(compiled(dev))
    if dev == "cuda":
        res["host_syncs"] = host_syncs(dev)
        res["host_syncs_expert_order"] = host_syncs(dev, (64, 256, 4, 128, 2, 4), torch.bfloat16)
        res["bf16"] = bf16_errors(dev)
        # experts 128 wide (the row-form axpy, 128-pair blocks), ~512 pairs per expert
        res["bf16_wide"] = bf16_errors(dev, T=512, d=512, n=8, m=128, h=2, k=4)
        # the same in 64-column passes (strided table slices)
        with mock.patch.object(peer_grouped, "ROWS_BYTES", 1):
            res["bf16_wide_passes"] = bf16_errors(dev, T=512, d=512, n=8, m=128, h=2, k=4)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
