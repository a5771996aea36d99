"""collect_expert_usage across processes (run under torchrun, 2 ranks, gloo).

Each phase builds real PEER layers, counts on a train-mode forward pass and checks
the counters against a bincount of `retrieve()`'s indices; then collects:
  dp2: two data-parallel ranks with different tokens -> rank 0 gets the summed stats
  pp2: two pipeline stages holding layers 1 and 2 -> rank 0 gets both layers
  tp2: two tensor-parallel copies of layer 1 -> counted once, not twice
Rank 0 writes OUT/usage_check.json with what it checked.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist

from megapeer.config import ParallelConfig, PEERConfig
from megapeer.parallel import init_distributed, init_model_parallel
from megapeer.training.expert_usage import collect_expert_usage

HEADS, TOPK, T = 2, 3, 24


def build(sizes, layer_number):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megapeer.models.peer import PEER
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                            init_method_std=0.5, use_cpu_initialization=True)
    peer = PEER(cfg, PEERConfig(num_experts=sizes, heads=HEADS, topk=TOPK, key_dim=8,
                                kernel="reference"))
    peer.set_layer_number(layer_number)
    return peer


def count_forward(peer, seed):
    """Forward in train mode with tracking on; returns (indices, gates, scores) of the pass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 1, 16, generator=g)
    peer.train()
    peer.track_usage(True)
    peer(x)
    with torch.no_grad():
        idx, gates, scores = peer.retrieve(x.view(T, 16))
    u = peer._usage
    want = torch.bincount(idx.reshape(-1), minlength=peer.num_experts).float()
    assert torch.equal(u["counts"], want), "device counts differ from bincount of retrieve()"
    assert u["tokens"].item() == T
    return idx, gates, scores


def gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def expected(idx, gates, scores, n):
    """Hand formulas on the gathered selections."""
    c = torch.bincount(idx.reshape(-1), minlength=n).double()
    p = c / c.sum()
    kl = sum(pi * math.log(pi * n) for pi in p.tolist() if pi > 0)
    s = scores.double()
    return {"counts": c, "fraction_used": (c > 0).sum().item() / n, "dead": int((c == 0).sum()),
            "kl_uniform": kl, "selections": c.sum().item(), "score_mean": s.mean().item(),
            "score_std": s.std(unbiased=False).item(),
            "gate_max_mean": gates.double().max(-1).values.mean().item()}


def check(got, want, what):
    for k, v in want.items():
        if k == "counts":
            assert torch.equal(got[k].double(), v), f"{what}: counts differ"
        else:
            assert math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-6), f"{what}: {k} {got[k]} != {v}"


def main():
    out_dir = sys.argv[1]
    init_distributed()
    from megatron.core import parallel_state as ps
    rank = dist.get_rank()
    report = {"phases": []}

    # dp2: same weights, different tokens on each rank
    init_model_parallel(ParallelConfig(), seed=7)
    peer = build([4, 5], 3)
    idx, gates, scores = count_forward(peer, seed=100 + rank)
    all_idx = gather(idx)
    local = torch.bincount(idx.reshape(-1), minlength=20)
    other = gather(local.unsqueeze(0))[1 - rank]
    assert not torch.equal(local, other), "ranks should count different selections"
    want = expected(all_idx, gather(gates), gather(scores), peer.num_experts)
    res = collect_expert_usage([peer], ps.get_data_parallel_group())
    assert peer._usage["counts"].sum() == 0 and peer._usage["tokens"] == 0, "window not reset"
    if rank == 0:
        assert list(res) == [3], res.keys()
        check(res[3], want, "dp2")
        assert res[3]["selections"] == 2 * T * HEADS * TOPK
        report["dp2"] = {k: v for k, v in res[3].items() if k != "counts"}
        report["phases"].append("dp2")
    else:
        assert res == {}

    # pp2: stage r holds layer r + 1 (different sizes, so a mix-up shows)
    init_model_parallel(ParallelConfig(pipeline=2), seed=7)
    peer = build([4, 4] if rank == 0 else [4, 5], rank + 1)
    idx, gates, scores = count_forward(peer, seed=200)
    mine = expected(idx, gates, scores, peer.num_experts)
    wants = [None, None]
    dist.all_gather_object(wants, mine)
    res = collect_expert_usage([peer], ps.get_data_parallel_group())
    if rank == 0:
        assert list(res) == [1, 2], res.keys()
        check(res[1], wants[0], "pp2 layer 1")
        check(res[2], wants[1], "pp2 layer 2")
        report["phases"].append("pp2")
    else:
        assert res == {}

    # tp2: both ranks hold the same layer and see the same tokens
    init_model_parallel(ParallelConfig(tensor=2), seed=7)
    peer = build([4, 5], 1)
    idx, gates, scores = count_forward(peer, seed=300)
    both = gather(idx.unsqueeze(0))
    assert torch.equal(both[0], both[1]), "tensor-parallel copies retrieved differently"
    want = expected(idx, gates, scores, peer.num_experts)
    res = collect_expert_usage([peer], ps.get_data_parallel_group())
    if rank == 0:
        assert list(res) == [1], res.keys()
        check(res[1], want, "tp2")
        assert res[1]["selections"] == T * HEADS * TOPK
        report["phases"].append("tp2")
        with open(os.path.join(out_dir, "usage_check.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
