"""Worker for tests/test_grad_accum.py: gradient-accumulation fusion on every PEER path.

For each path that takes an accumulator (the reference via RouteGrad; the fused CUDA
ops, on the CPU through their CPU implementations) the expert step runs with acc = an fp32 "main_grad" holding random values, and is
compared with plain autograd in fp64: acc must end as its start plus the table gradient,
the tables must get no gradient, the rows of experts nobody chose must keep their
bits, and x / gates gradients must be unchanged. On a GPU also bf16 for the fused
kernels: the fp32 sums in acc must be at least as close to the fp64 gradient as
the unfused path's bf16 gradient is (plus 1e-3 of its magnitude).

Prints one JSON object {case: {path: {quantity: relative error}}}.
"""
import json
import os

import torch
import torch.nn.functional as F

from megapeer.ops import dispatch, peer_ref

CASES = {  # name: (T, d, experts, m, heads, k); experts >= 8 and only 0..5 are chosen
    "m16": (29, 32, 8, 16, 2, 3),
    "m1": (21, 16, 10, 1, 2, 4),
}


def paths(dev):
    """The paths that take acc (dispatch._call): reference (routed) and fused (native)."""
    from megapeer.ops import peer_cuda
    out = {"reference": peer_ref}
    if dev == "cpu" or peer_cuda.available()[0]:
        out["fused"] = peer_cuda
    return out


def step(mod, x, idx, gates, U, V, m, accs):
    acc_u, acc_v = accs if accs is not None else (None, None)
    s = dispatch._call("gather_dot", mod, x, idx, U, m, acc_u)
    w = F.gelu(s) * gates.unsqueeze(-1)
    return dispatch._call("gather_axpy", mod, w, idx, V, m, acc_v)


def run(case, dev, dtype):
    T, d, n, m, h, k = CASES[case]
    g = torch.Generator().manual_seed(len(case) * 7 + d)
    idx = torch.randint(0, 6, (T, h, k), generator=g)
    idx[0] = 2                                      # one token, one expert in every slot
    base = [torch.randn(T, d, generator=g), torch.randn(n * m, d, generator=g),
            torch.randn(n * m, d, generator=g), torch.randn(T, h, k, generator=g).softmax(-1)]
    go = torch.randn(T, d, generator=g)
    acc0 = [torch.randn(n * m, d, generator=g) for _ in range(2)]

    leaves = [t.double().requires_grad_() for t in base]
    step(peer_ref, leaves[0], idx, leaves[3], leaves[1], leaves[2], m, None).backward(go.double())
    ref = {"x": leaves[0].grad, "U": leaves[1].grad, "V": leaves[2].grad, "gates": leaves[3].grad}

    def rel(a, b):
        return float((a.double().cpu() - b).abs().max() / b.abs().max().clamp(min=1e-30))

    res = {}
    unused = slice(6 * m, None)
    for name, mod in paths(dev).items():
        if dtype == torch.bfloat16 and name != "fused":
            continue
        leaves = [t.to(dev, dtype).clone().requires_grad_() for t in base]
        accs = [a.to(dev).clone() for a in acc0]
        y = step(mod, leaves[0], idx.to(dev), leaves[3], leaves[1], leaves[2], m, accs)
        y.backward(go.to(dev, dtype))
        r = {"x": rel(leaves[0].grad, ref["x"]), "gates": rel(leaves[3].grad, ref["gates"]),
             "U": rel(accs[0].cpu() - acc0[0], ref["U"]), "V": rel(accs[1].cpu() - acc0[1], ref["V"]),
             "table_grads_none": float(leaves[1].grad is None and leaves[2].grad is None),
             "unused_rows_kept": float(max((a.cpu()[unused] != a0[unused]).sum()
                                           for a, a0 in zip(accs, acc0)))}
        if dtype == torch.bfloat16:   # the unfused path's bf16 table gradients, same kernels
            plain = [t.to(dev, dtype).clone().requires_grad_() for t in base]
            step(mod, plain[0], idx.to(dev), plain[3], plain[1], plain[2], m, None).backward(
                go.to(dev, dtype))
            r["U_unfused"], r["V_unfused"] = rel(plain[1].grad, ref["U"]), rel(plain[2].grad, ref["V"])
        if name == "fused" and dtype == torch.float32:   # custom ops under torch.compile
            comp = torch.compile(step)
            leaves_c = [t.to(dev, dtype).clone().requires_grad_() for t in base]
            accs_c = [a.to(dev).clone() for a in acc0]
            comp(mod, leaves_c[0], idx.to(dev), leaves_c[3], leaves_c[1], leaves_c[2], m,
                 accs_c).backward(go.to(dev, dtype))
            r["compiled_vs_eager"] = max(rel(c.cpu() - a0, (a.cpu() - a0).double())
                                         for c, a, a0 in zip(accs_c, accs, acc0))
            r["compiled_table_grads_none"] = float(leaves_c[1].grad is None and leaves_c[2].grad is None)
        res[name] = r
    return res


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for case in CASES:
        out[f"{case}_fp32"] = run(case, dev, torch.float32)
        if dev == "cuda":
            out[f"{case}_bf16"] = run(case, dev, torch.bfloat16)
    print(json.dumps(out))


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_quickly(main())
