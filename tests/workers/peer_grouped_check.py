"""Worker for tests/test_peer_grouped.py: the grouped Triton path against the reference.

Run with TRITON_INTERPRET=1 on a CPU (the Triton interpreter), or on a GPU. Prints one
JSON object: for each case, the max error of the output and of every gradient relative
to the largest magnitude of the reference, in fp32.
"""
import json
import sys

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


def run(case, dev):
    T, d, n, m, h, k = CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 1000)
    idx = torch.randint(0, n, (T, h, k), generator=g)
    if case == "m16":
        idx[0, :, :] = 5                # one token choosing the same expert in every slot
        idx[:, 0, 0] = 7                # one expert chosen by every token
    x = torch.randn(T, d + 8, generator=g)[:, 4:4 + d]   # a column slice, as under TP
    U, V = torch.randn(n * m, d, generator=g), torch.randn(n * m, d, generator=g)
    gates = torch.randn(T, h, k, generator=g).softmax(-1)
    go = torch.randn(T, d, generator=g)
    out = {}
    for name, mod in (("ref", peer_ref), ("grp", peer_grouped)):
        leaves = [t.clone().to(dev).requires_grad_() for t in (x, U, V, gates)]
        y = mod.peer_experts(leaves[0], idx.to(dev), leaves[3], leaves[1], leaves[2], F.gelu, m)
        y.backward(go.to(dev))
        out[name] = [y.detach()] + [t.grad for t in leaves]
    errs = {}
    for i, nm in enumerate(["out", "x", "U", "V", "gates"]):
        r, a = out["ref"][i].cpu(), out["grp"][i].cpu()
        errs[nm] = float((a - r).abs().max() / r.abs().max().clamp(min=1e-30))
    return errs


def bf16_errors(dev):
    """{grad: (grouped bf16 error, reference bf16 error)}, both against fp32."""
    T, d, n, m, h, k = 512, 256, 64, 16, 4, 16
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


def deterministic(dev):
    """Deterministic mode: the per-pair axpy (several column passes, the last one narrower)
    against the reference, and bitwise repeatability of every output (on a GPU the atomic
    axpy would not repeat)."""
    from megapeer.ops import peer_cuda
    T, d, n, m, h, k = 64, 80, 4, 16, 4, 8     # 80 columns: passes of 32, 32 and 16
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, n, (T, h, k), generator=g).to(dev)
    base = [torch.randn(T, d, generator=g), torch.randn(n * m, d, generator=g),
            torch.randn(n * m, d, generator=g), torch.randn(T, h, k, generator=g).softmax(-1)]
    go = torch.randn(T, d, generator=g).to(dev)
    saved = peer_grouped.DET_COLS
    peer_cuda.set_deterministic(True)
    peer_grouped.DET_COLS = 32
    try:
        runs = []
        for mod in (peer_ref, peer_grouped, peer_grouped):
            leaves = [t.to(dev).requires_grad_() for t in base]
            y = mod.peer_experts(leaves[0], idx, leaves[3], leaves[1], leaves[2], F.gelu, m)
            y.backward(go)
            runs.append([y.detach()] + [t.grad for t in leaves])
    finally:
        peer_cuda.set_deterministic(False)
        peer_grouped.DET_COLS = saved
    res = {}
    for i, nm in enumerate(["out", "x", "U", "V", "gates"]):
        r, a, b = (run[i].cpu() for run in runs)
        res[nm] = float((a - r).abs().max() / r.abs().max())
        res[nm + "_repeat"] = float((a - b).abs().max())   # must be exactly 0
    return res


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
    # through the model's dispatch, as model.peer.kernel=grouped uses it
    x = torch.randn(16, 32, device=dev)
    idx = torch.randint(0, 8, (16, 2, 4), device=dev)
    U = torch.randn(8 * 16, 32, device=dev)
    a = dispatch.gather_dot(x, idx, U, 16, mode="grouped")
    b = peer_ref.gather_dot(x, idx, U, 16)
    res["dispatch"] = {"out": float((a - b).abs().max() / b.abs().max())}
    res["layout_calls"] = layout_calls(dev)
    res["deterministic"] = deterministic(dev)
    if dev == "cuda":
        res["bf16"] = bf16_errors(dev)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
