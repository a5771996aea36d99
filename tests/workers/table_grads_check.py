"""Worker for tests/test_table_grads.py: deferred table gradients (ops/table_grads.py).

Run with TRITON_INTERPRET=1 on a CPU, or on a GPU (bf16 there as well). Prints one JSON
object of errors (relative to the largest magnitude of the expected value) and counts.
"""
import json
from unittest import mock

import torch
import torch.nn.functional as F

from megapeer.ops import peer_grouped, table_grads

T, D, N_EXP, H, K = 24, 40, 3, 2, 3
M = 100   # set by main(): 100 (padded to 128) in the interpreter, 128 on a GPU


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def merged_case(dev, dt):
    """scatter_merged over three micro-batches of different sizes against the sum of one
    scatter each (accumulated in fp64); some pairs carry the sentinel id N_EXP (other
    expert-parallel ranks' pairs), which neither form may add anywhere."""
    g = torch.Generator().manual_seed(1)
    want = torch.zeros(N_EXP * M, D, dtype=torch.float64)
    coefs, srcs, lays = [], [], []
    for T_i in (24, 17, 31):
        idx = torch.randint(0, N_EXP, (T_i, H, K), generator=g).to(dev)
        idx[::3, 0] = N_EXP
        lay = peer_grouped._layout(idx, N_EXP, M)
        coef = torch.randn(idx.numel(), M, generator=g).to(dev, dt)   # expert order
        src = torch.randn(T_i, D + 6, generator=g).to(dev, dt)[:, 3:3 + D]   # strided rows
        one = torch.ops.megapeer.grouped_scatter(coef, idx, src, N_EXP * M, M, *lay,
                                                 coef_sorted=True)
        want += one.double().cpu()
        coefs.append(coef[lay[5].long()])   # token order
        srcs.append(src)
        lays.append((lay[0], lay[3], lay[4]))
    got = peer_grouped.scatter_merged(torch.cat(coefs), torch.cat(srcs), lays, H * K,
                                      N_EXP * M, M)
    return rel(got.cpu(), want)


def merge_kernels(dev):
    """merge_layouts' Triton kernels against merge_layouts_torch, exactly: micro-batches of
    different sizes, other ranks' pairs (the sentinel), a hot expert, experts left empty,
    more groups than one chunk of the prefix kernel, a micro-batch without pairs. 1.0 if
    every output is equal (values and dtype), else the first mismatch's case."""
    g = torch.Generator().manual_seed(5)
    for n, sizes in [(3, (24, 17, 31)), (1500, (200, 0, 130)), (8, (40,) * 5)]:
        for name in ("random", "sentinel", "hot", "sparse"):
            lays = []
            for T_i in sizes:
                idx = torch.randint(0, n, (T_i, H, K), generator=g)
                coin = torch.rand(T_i, H, K, generator=g)
                idx = {"random": idx, "sentinel": torch.where(coin < 0.4, n, idx),
                       "hot": torch.where(coin < 0.9, n // 2, idx), "sparse": idx // 7 * 7}[name]
                lay = peer_grouped._layout(idx.to(dev), n, M)
                lays.append((lay[0], lay[3], lay[4]))
            a = peer_grouped.merge_layouts(lays)
            b = peer_grouped.merge_layouts_torch(lays)
            if not peer_grouped._layout_kernels(a[0], n) or not all(
                    x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b)):
                return {"mismatch": f"{name} n={n} sizes={sizes}"}
    return {"ok": 1.0}


def step_grads(dev, dt, defer, n_micro, compiled=False, backwards=None, main=None):
    """Gradients of x, gates (per micro-batch) and U, V (summed) over n_micro micro-batches
    of the expert step in one table_grads.step, and the micro-batches each table-gradient
    pass took (scatter_merged, or one alone). main: the tables get an fp32 main_grad (as
    under Megatron's DDP) holding random values ("filled": their gradients are what the
    step added) or NaN after table_grads.zeroed ("zeroed": the first pass must store)."""
    g = torch.Generator().manual_seed(2)
    U = (torch.randn(N_EXP * M, D, generator=g) * D ** -0.5).to(dev, dt).requires_grad_()
    V = (torch.randn(N_EXP * M, D, generator=g) * D ** -0.5).to(dev, dt).requires_grad_()
    table_grads.track(U, V)
    start = {}
    for t in (U, V) if main else ():
        start[t] = torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(dev)
        if main in ("zeroed", "stale"):   # stale: zero_grad_buffer skipped it
            t.main_grad = torch.full(t.shape, float("nan"), device=dev)
            start[t] = torch.zeros_like(t.main_grad)
            table_grads.zeroed([t], stale=[t] if main == "stale" else ())
        else:
            t.main_grad = start[t].clone()
    fn = peer_grouped.peer_experts
    if compiled:   # one graph: the deferral splits nothing
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)
    per_mb, calls = [], []
    merged, one = peer_grouped.scatter_merged, table_grads._scatter_one
    none_before_flush = True

    def counted(coef, src, layouts, *a, **kw):
        calls.append(len(layouts))
        return merged(coef, src, layouts, *a, **kw)

    def counted_one(*a, **kw):
        calls.append(1)
        return one(*a, **kw)
    with mock.patch.object(peer_grouped, "scatter_merged", counted), \
            mock.patch.object(table_grads, "_scatter_one", counted_one), \
            table_grads.step(n_micro):
        for i in range(backwards if backwards is not None else n_micro):
            x = torch.randn(T, D, generator=g).to(dev, dt).requires_grad_()
            gates = torch.randn(T, H, K, generator=g).softmax(-1).to(dev, dt).requires_grad_()
            idx = torch.randint(0, N_EXP, (T, H, K), generator=g).to(dev)
            y = fn(x, idx, gates, U, V, F.gelu, M, defer=defer)
            y.backward(torch.randn(T, D, generator=g).to(dev, dt))
            if i == 0 and defer > 1 and n_micro > 1:
                none_before_flush = U.grad is None and V.grad is None
            per_mb.append((x.grad, gates.grad))
    if main:
        assert U.grad is None and V.grad is None, "a main_grad takes the deferred gradient"
        # zeroed or stale: the first pass stored every row (the next zeroing may skip them)
        whole = [table_grads.stored_whole(t) for t in (U, V)]
        assert whole == [main != "filled"] * 2, (main, whole)
        return U.main_grad - start[U], V.main_grad - start[V], per_mb, calls, none_before_flush
    return U.grad, V.grad, per_mb, calls, none_before_flush


def main():
    global M
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # the expert-ordered form: fp32 with m = 100 (padded to 128) in the interpreter; on a
    # GPU it takes bf16 with 16-byte rows (m = 128), checked against fp32 there
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    M = 128 if dev == "cuda" else 100
    assert peer_grouped.takes_expert_order(torch.zeros(1, D, dtype=dt, device=dev),
                                           torch.zeros(M, D, dtype=dt, device=dev), M)
    res = {"scatter_merged": merged_case(dev, dt), "merge_kernels": merge_kernels(dev)}
    base = step_grads(dev, dt, 1, 4)
    assert base[3] == [] and base[4], "defer=1 must not defer"
    f32 = step_grads(dev, torch.float32, 1, 4) if dev == "cuda" else None
    for defer, want_calls in ((2, [2, 2]), (3, [3, 1]), (5, [4])):
        U_g, V_g, per_mb, calls, none_first = step_grads(dev, dt, defer, 4)
        r = res[f"defer{defer}"] = {
            "x": max(rel(a[0], b[0]) for a, b in zip(per_mb, base[2])),
            "gates": max(rel(a[1], b[1]) for a, b in zip(per_mb, base[2])),
            "calls_ok": sorted(calls) == sorted(want_calls * 2), "none_before_flush": none_first}
        if f32 is None:
            r.update(U=rel(U_g, base[0]), V=rel(V_g, base[1]))
        else:   # bf16: (deferred, per micro-batch) error against fp32
            r.update(U_bf16=(rel(U_g, f32[0]), rel(base[0], f32[0])),
                     V_bf16=(rel(V_g, f32[1]), rel(base[1], f32[1])))
    # into an fp32 main_grad (Megatron's DDP): added to its values, or stored when zeroed
    # (the NaN it holds then must not reach the result); fp32 sums, no bf16 rounding
    for main in ("filled", "zeroed", "stale"):
        U_g, V_g, _, calls, _ = step_grads(dev, dt, 2, 4, main=main)
        r = res[f"main_grad_{main}"] = {"calls_ok": sorted(calls) == [2, 2, 2, 2]}
        if f32 is None:
            r.update(U=rel(U_g, base[0]), V=rel(V_g, base[1]))
        else:
            r.update(U_bf16=(rel(U_g, f32[0]), rel(base[0], f32[0])),
                     V_bf16=(rel(V_g, f32[1]), rel(base[1], f32[1])))
    # an ordinary gradient (DDP adds it to main_grad) ends the zeroed state
    t = torch.zeros(3, requires_grad=True)
    table_grads.track(t)
    table_grads.zeroed([t])
    (t * 2).sum().backward()
    res["written_after_grad"] = {"calls_ok": t._main_grad_zero is False}
    # lazy zeroing: a stale main_grad (zero_grad_buffer skipped it) is zeroed before an
    # ordinary gradient (DDP's hook then adds it) or by settle when no gradient came
    lazy = {}
    t.main_grad = torch.full((3,), 5.0)
    table_grads.zeroed([t], stale=[t])
    (t * 2).sum().backward()
    lazy["grad_zeroes"] = t.main_grad.tolist() == [0.0] * 3 and not t._main_grad_stale
    lazy["grad_not_whole"] = not table_grads.stored_whole(t)
    t.main_grad.fill_(5.0)
    table_grads.zeroed([t], stale=[t])
    table_grads.settle()
    lazy["settle_zeroes"] = t.main_grad.tolist() == [0.0] * 3
    t.main_grad.fill_(5.0)
    table_grads.settle()
    lazy["settle_keeps_fresh"] = t.main_grad.tolist() == [5.0] * 3
    res["lazy_zeroing"] = lazy
    # one micro-batch: nothing deferred
    res["single_micro_batch_calls"] = len(step_grads(dev, dt, 4, 1)[3])
    # compiled (one graph, forward and backward): the same gradients as eager
    U_g, V_g, _, calls, _ = step_grads(dev, dt, 3, 4, compiled=True)
    res["compiled"] = {"calls_ok": sorted(calls) == [1, 1, 3, 3]}
    if f32 is None:
        res["compiled"].update(U=rel(U_g, base[0]), V=rel(V_g, base[1]))
    else:
        res["compiled"].update(U_bf16=(rel(U_g, f32[0]), rel(base[0], f32[0])),
                               V_bf16=(rel(V_g, f32[1]), rel(base[1], f32[1])))
    # a step whose backward ran fewer times than announced
    try:
        step_grads(dev, dt, 4, 3, backwards=2)
        res["short_step"] = "no error"
    except RuntimeError as e:
        res["short_step"] = str(e)
    print(json.dumps(res))


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
