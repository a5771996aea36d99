"""The grouped-GEMM PEER path (ops/peer_gmm.py, torch._grouped_mm) against the reference.

Fresh random inputs; forward and every gradient (x, U, V, gates). fp32: within 1e-5 of the
reference relative to its largest magnitude (the CPU and the GPU's fallback: loops of
fp32 matmuls). bf16 (CPU fallback; CUTLASS on an sm90 GPU): within twice the reference's
own bf16 error against the fp32 reference, plus 1e-3. Shapes: T not a multiple of
anything, a hot expert chosen by many tokens, unused experts, one token choosing one
expert in every slot, x a column slice (the tensor-parallel split), clamped indices (the
expert-parallel split). Repeats are bitwise equal (no atomics); torch.compile gives the
eager values; a tiny training run gives the reference path's losses.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_trains_like_reference
from megapeer.ops import dispatch, peer_gmm, peer_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [  # T, d, experts, h, k, m
    (37, 32, 12, 3, 4, 8),
    (64, 48, 5, 2, 3, 16),     # few experts, many pairs each
    (10, 16, 40, 1, 2, 8),     # more experts than pairs: most groups empty
    (129, 64, 16, 4, 8, 32),
]


def _inputs(T, d, E, h, k, m, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(True)
    xs = torch.randn(T, d + 16, generator=g).to(device, dtype)
    x = xs[:, 8:8 + d].requires_grad_(True) if seed % 2 else mk(T, d)
    idx = torch.randint(0, E, (T, h, k), generator=g)
    idx[: T // 3, 0, 0] = 0                      # a hot expert
    idx[1] = 2 % E                               # one token, one expert in every slot
    return x, idx.to(device), mk(T, h, k), mk(E * m, d), mk(E * m, d)


def _run(mod, x, idx, gates, U, V, m, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gates, U, V)]
    out = mod.peer_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], F.gelu, m)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


NAMES = ["out", "x", "gates", "U", "V"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference(device, shape):
    m = shape[-1]
    for seed in (0, 1):
        x, idx, gates, U, V = _inputs(*shape, device, torch.float32, seed)
        go = torch.randn(shape[0], shape[1], device=device)
        got = _run(peer_gmm, x, idx, gates, U, V, m, go)
        ref = _run(peer_ref, x, idx, gates, U, V, m, go)
        for name, a, b in zip(NAMES, got, ref):
            assert _err(a, b) < 1e-5, (shape, seed, name, _err(a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_bf16_error_within_twice_reference(device, shape):
    m = shape[-1]
    x, idx, gates, U, V = _inputs(*shape, device, torch.float32, 3)
    go = torch.randn(shape[0], shape[1], device=device)
    exact = _run(peer_ref, x, idx, gates, U, V, m, go)
    low = [t.detach().to(torch.bfloat16) for t in (x, gates, U, V)]
    got = _run(peer_gmm, low[0], idx, low[1], low[2], low[3], m, go.bfloat16())
    ref = _run(peer_ref, low[0], idx, low[1], low[2], low[3], m, go.bfloat16())
    for name, g, r, e in zip(NAMES, got, ref, exact):
        assert _err(g, e) <= 2 * _err(r, e) + 1e-3, (shape, name, _err(g, e), _err(r, e))


@pytest.mark.parametrize("device", DEVICES)
def test_repeats_are_bitwise_equal(device):
    shape = SHAPES[3]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, idx, gates, U, V = _inputs(*shape, device, dtype, 4)
    go = torch.randn(shape[0], shape[1], device=device, dtype=dtype)
    a = _run(peer_gmm, x, idx, gates, U, V, shape[-1], go)
    b = _run(peer_gmm, x, idx, gates, U, V, shape[-1], go)
    for name, p, q in zip(NAMES, a, b):
        assert torch.equal(p, q), name


def test_clamped_indices_and_zero_gates_as_expert_parallel():
    """The expert-parallel split clamps foreign experts' indices and zeroes their gates."""
    x, idx, gates, U, V = _inputs(40, 32, 12, 2, 4, 8, "cpu", torch.float32, 5)
    own = idx < 6
    g = (gates * own).detach().requires_grad_(True)
    local = idx.clamp(0, 5)
    go = torch.randn(40, 32)
    got = _run(peer_gmm, x, local, g, U[:48], V[:48], 8, go)
    ref = _run(peer_ref, x, local, g, U[:48], V[:48], 8, go)
    for name, a, b in zip(NAMES, got, ref):
        assert _err(a, b) < 1e-5, (name, _err(a, b))


def test_compiled_matches_eager():
    shape = SHAPES[0]
    x, idx, gates, U, V = _inputs(*shape, "cpu", torch.float32, 6)
    go = torch.randn(shape[0], shape[1])
    eager = _run(peer_gmm, x, idx, gates, U, V, shape[-1], go)

    class Compiled:
        peer_experts = torch.compile(peer_gmm.peer_experts, fullgraph=True)

    comp = _run(Compiled, x, idx, gates, U, V, shape[-1], go)
    for name, a, b in zip(NAMES, comp, eager):
        assert _err(a, b) < 1e-5, (name, _err(a, b))


def test_dispatch_and_errors():
    x, U = torch.randn(4, 8), torch.randn(16, 8)
    idx = torch.zeros(4, 1, 2, dtype=torch.long)
    U4 = torch.randn(16, 8)
    torch.testing.assert_close(dispatch.gather_dot(x, idx, U4, 4, mode="gmm"),
                               peer_ref.gather_dot(x, idx, U4, 4))
    with pytest.raises(ValueError, match="not a multiple of m=3"):
        peer_gmm.gather_dot(x, idx, U, 3)
    with pytest.raises(TypeError, match="differ"):
        peer_gmm.gather_dot(x.bfloat16(), idx, U, 2)
    with pytest.raises(ValueError, match=r"expert_hidden \(2\) .* multiples of 8 for torch.bfloat16"):
        peer_gmm.gather_dot(x.bfloat16(), idx, U.bfloat16(), 2)


@pytest.mark.timeout(600)
def test_gmm_trains_like_reference(tmp_path, parity_demo):
    """model.peer.kernel=gmm through the trainer (tiny MLA+PEER, experts of width 16, fp32):
    the reference path's per-step losses (1e-6 relative) and gradient norms (1e-5)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU: bench/kernel_parity.py compares the paths in bf16")
    assert_trains_like_reference(tmp_path, parity_demo, "gmm", timeout=600)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only")
@pytest.mark.parametrize("compiled", [False, True])
def test_training_shape_bf16_on_gpu(compiled):
    """The ~100M mla_peer_wider layer's shape (256 experts of width 256, h=4, k=8; 512
    tokens): gmm and the grouped Triton kernels in bf16 against the fp32 reference, within
    twice the reference's own bf16 error plus 1e-3; eager and compiled."""
    from megapeer.ops import peer_grouped
    shape = (512, 768, 256, 4, 8, 256)
    m = shape[-1]
    x, idx, gates, U, V = _inputs(*shape, "cuda", torch.float32, 7)
    U, V = [(t.detach() * shape[1] ** -0.5).requires_grad_(True) for t in (U, V)]
    go = torch.randn(shape[0], shape[1], device="cuda")
    exact = _run(peer_ref, x, idx, gates, U, V, m, go)
    low = [t.detach().to(torch.bfloat16) for t in (x, gates, U, V)]
    ref = _run(peer_ref, low[0], idx, low[1], low[2], low[3], m, go.bfloat16())
    paths = [peer_gmm] + ([peer_grouped] if peer_grouped.available()[0] else [])
    for mod in paths:
        class P:
            peer_experts = torch.compile(mod.peer_experts) if compiled else mod.peer_experts
        got = _run(P, low[0], idx, low[1], low[2], low[3], m, go.bfloat16())
        for name, g, r, e in zip(NAMES, got, ref, exact):
            assert _err(g, e) <= 2 * _err(r, e) + 1e-3, (mod.__name__, name, _err(g, e), _err(r, e))
