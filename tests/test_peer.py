"""PEER against an independent naive implementation, and the reference ops.

The naive version scores every expert exhaustively (sum of sub-key scores over the
full Cartesian product), takes the top-k directly and loops over tokens, heads and
experts. Forward and every gradient must agree (fp32, fresh random inputs,
atol 1e-5 / rtol 1e-4).
"""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from megapeer.config import PEERConfig
from megapeer.ops import peer_ref


def naive_peer(x, query_w, norm, keys, U, V, sizes, heads, topk, m, act, score_fn):
    T, d = x.shape
    n = len(sizes)
    kd = query_w.shape[0] // heads
    sub = kd // n
    q = norm((x @ query_w.t()).view(T, heads, kd))
    # all experts' scores: sum over dims of q_i . K_i[c_i], c in row-major order
    combos = list(itertools.product(*[range(s) for s in sizes]))
    out = torch.zeros_like(x)
    for t in range(T):
        for h in range(heads):
            scores = torch.stack([
                sum(q[t, h, i * sub:(i + 1) * sub] @ keys[i][c[i]] for i in range(n))
                for c in combos])
            vals, pos = scores.topk(topk)
            g = torch.softmax(vals, -1) if score_fn == "softmax" else torch.sigmoid(vals)
            for j in range(topk):
                e = pos[j].item()  # row-major index equals the position in combos
                u = U[e * m:(e + 1) * m]
                v = V[e * m:(e + 1) * m]
                out[t] = out[t] + g[j] * (act(u @ x[t]) @ v)
    return out


def _layer(world1, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megapeer.models.peer import PEER
    from megapeer.parallel import init_model_parallel
    from megapeer.config import ParallelConfig
    init_model_parallel(ParallelConfig(), seed=7)
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                            init_method_std=0.5, use_cpu_initialization=True)
    return PEER(cfg, PEERConfig(**kw)).double()


@pytest.mark.parametrize("sizes,m,score_fn", [([4, 5], 1, "softmax"), ([3, 4, 4], 1, "softmax"),
                                              ([4, 4], 3, "sigmoid")])
def test_peer_matches_naive(world1, sizes, m, score_fn):
    layer = _layer(world1, num_experts=sizes, heads=2, topk=3, key_dim=6 * len(sizes) // 2 * 2,
                   expert_hidden=m, score_fn=score_fn, subkey_topk=3, kernel="reference")
    torch.manual_seed(1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x.view(5, 1, 16))
    grads = torch.autograd.grad(out.pow(2).sum(), [x] + list(layer.parameters()))

    x2 = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    named = dict(zip([n for n, _ in layer.named_parameters()], params))
    norm = lambda q: F.layer_norm(q, (q.shape[-1],), named["query_norm.weight"],
                                  named["query_norm.bias"], layer.query_norm.eps)
    keys = [named[f"keys.{i}"] for i in range(len(sizes))]
    ref = naive_peer(x2, named["query"], norm, keys, named["U"], named["V"], sizes, 2, 3, m,
                     F.gelu, score_fn)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x2] + params)
    torch.testing.assert_close(out.view(5, 16), ref, atol=1e-10, rtol=1e-8)
    for name, g, r in zip(["x"] + list(named), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=f"grad of {name}")
    # keys must learn
    assert all(named_g.abs().sum() > 0 for named_g in grads[-len(sizes):] if named_g is not None)


def test_subkey_pruning_is_exact(world1):
    """Keeping only subkey_topk candidates per dimension never changes the top-k."""
    layer = _layer(world1, num_experts=[6, 6, 6], heads=3, topk=4, key_dim=12, subkey_topk=4)
    full = _layer(world1, num_experts=[6, 6, 6], heads=3, topk=4, key_dim=12, subkey_topk=6)
    full.load_state_dict(layer.state_dict())
    x = torch.randn(50, 16, dtype=torch.float64)
    i1, g1, _ = layer.retrieve(x)
    i2, g2, _ = full.retrieve(x)
    assert torch.equal(i1.sort(-1).values, i2.sort(-1).values)


@pytest.mark.parametrize("mode", ["torch", "triton", "auto"])
def test_bf16_retrieval_ranks_fp32_sums(world1, mode):
    """In bf16, every top-k path (torch.topk stages; the fused op, here its reference;
    'auto', torch on a CPU) picks the exhaustive top-k of the fp32 sums of the bf16
    sub-key scores on rows without tied sums (bf16-rounded sums would tie and differ),
    with the same scores and gates as the torch path."""
    kw = dict(num_experts=[32, 32], heads=4, topk=8, key_dim=16, subkey_topk=8)
    ref = _layer(world1, **kw, topk_kernel="torch").to(torch.bfloat16)
    layer = _layer(world1, **kw, topk_kernel=mode).to(torch.bfloat16)
    layer.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(256, 16, generator=g).to(torch.bfloat16)
    ids, gates, scores = layer.retrieve(x)
    r_ids, r_gates, r_scores = ref.retrieve(x)
    q = layer.query_norm(F.linear(x, layer.query).view(256, 4, -1))
    s0, s1 = (torch.einsum("thc,nc->thn", qi, k) for qi, k in zip(q.split(8, -1), layer.keys))
    sums = (s0.float()[..., :, None] + s1.float()[..., None, :]).flatten(-2)   # [T, h, 1024]
    top = sums.sort(-1, descending=True)
    v = top.values[..., :9]
    untied = (v[..., 1:] < v[..., :-1]).all(-1)
    assert untied.float().mean() > 0.5
    assert torch.equal(ids[untied], top.indices[..., :8][untied])
    assert torch.equal(scores, r_scores) and scores.dtype == torch.float32
    torch.testing.assert_close(gates, r_gates, atol=0, rtol=0)
    # the test can fail: bf16-rounded sums pick other experts on some untied rows
    bf = sums.to(torch.bfloat16).float().topk(8, -1).indices.sort(-1).values
    assert not torch.equal(bf[untied], top.indices[..., :8].sort(-1).values[untied])


def test_cpu_initialization_keeps_the_layer_on_the_cpu(world1, monkeypatch):
    """use_cpu_initialization (Megatron's convention, these tests' layers) keeps PEER's
    parameters on the CPU on a machine with a GPU too. On a CPU machine CUDA is reported
    available and asking for the current GPU fails; on a GPU machine (where Megatron's RNG
    tracker asks for it) the parameters' device is the check."""
    if not torch.cuda.is_available():
        def no_gpu():
            raise AssertionError("PEER asked for the current GPU")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", no_gpu)
    layer = _layer(world1, num_experts=[4, 4], heads=2, topk=3, key_dim=8)
    assert {p.device.type for p in layer.parameters()} == {"cpu"}


@pytest.mark.parametrize("n_exp,dtype", [(7, torch.int16), (32767, torch.int16),
                                         (32768, torch.int32), (1 << 20, torch.int32)])
def test_sort_by_expert_is_the_stable_sort(n_exp, dtype):
    """peer_ref.sort_by_expert (the grouped paths' layouts): the int64 stable sort's
    permutation and its inverse, from a sort on the narrowest key type, many ties."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for P in (1, 999, 5000):
        flat = torch.randint(0, min(n_exp, 50), (P,), generator=g) + (n_exp - min(n_exp, 50))
        keys, order, inv = peer_ref.sort_by_expert(flat, n_exp)
        ref_keys, ref_order = torch.sort(flat, stable=True)
        assert keys.dtype == dtype and order.dtype == inv.dtype == torch.int64
        assert torch.equal(keys.long(), ref_keys) and torch.equal(order, ref_order)
        assert torch.equal(inv, torch.argsort(ref_order))


@pytest.mark.parametrize("m", [1, 2])
def test_reference_ops_match_loops(m):
    torch.manual_seed(0)
    T, h, k, d, N = 4, 2, 3, 8, 10
    x = torch.randn(T, d, dtype=torch.float64)
    U = torch.randn(N * m, d, dtype=torch.float64)
    idx = torch.randint(0, N, (T, h, k))
    s = peer_ref.gather_dot(x, idx, U, m)
    w = torch.randn(T, h, k, m, dtype=torch.float64)
    out = peer_ref.gather_axpy(w, idx, U, m)
    for t, hh, kk, j in itertools.product(range(T), range(h), range(k), range(m)):
        row = idx[t, hh, kk] * m + j
        assert math.isclose(s[t, hh, kk, j].item(), (U[row] @ x[t]).item(), rel_tol=1e-12)
    exp = torch.zeros(T, d, dtype=torch.float64)
    for t, hh, kk, j in itertools.product(range(T), range(h), range(k), range(m)):
        exp[t] += w[t, hh, kk, j] * U[idx[t, hh, kk] * m + j]
    torch.testing.assert_close(out, exp)
