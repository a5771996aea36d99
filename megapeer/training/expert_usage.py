"""Expert usage of PEER layers over a logging window.

PEER counts selections on the device (`PEER.track_usage`); this module turns the
raw counters into statistics. Communication happens only here, at collection time:
one all-reduce of the counters over the data-parallel group, then one gather of the
per-layer results to global rank 0 (pipeline stages hold different layers,
tensor-parallel ranks identical copies, so results are de-duplicated by layer).

Statistics per layer (N experts, p = counts / sum(counts)):
  fraction_used  experts selected at least once / N
  kl_uniform     KL(p || uniform) = sum_i p_i log(p_i N)   (PEER paper, "unevenness")
  dead           experts never selected
  score_*        retrieval scores of the selected experts; gate_max_mean: mean largest gate
"""
import math

import torch
import torch.distributed as dist

_SCALARS = ("tokens", "score_sum", "score_sq", "gate_max")


def usage_stats(counts, tokens, score_sum, score_sq, gate_max, heads):
    """Statistics of one layer from its (already reduced) raw counters."""
    counts = counts.detach().float().cpu()
    n = counts.numel()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total > 0:
        p = counts[counts > 0] / total
        kl = float((p * torch.log(p * n)).sum())
    else:
        kl = float("nan")
    pairs = float(tokens) * heads            # (token, head) pairs; each scored top-k
    mean = float(score_sum) / pairs if pairs else float("nan")
    sq = float(score_sq) / pairs if pairs else float("nan")
    return {
        "num_experts": n,
        "tokens": float(tokens),
        "selections": total,
        "fraction_used": used / n,
        "kl_uniform": kl,
        "dead": n - used,
        "score_mean": mean,
        "score_std": math.sqrt(max(sq - mean * mean, 0.0)) if pairs else float("nan"),
        "gate_max_mean": float(gate_max) / pairs if pairs else float("nan"),
        "counts": counts,
    }


def _is_dist():
    return dist.is_available() and dist.is_initialized()


def _tensor_rank():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0


def collect_expert_usage(peer_modules, dp_group=None):
    """Reduce and summarise the usage counters of this rank's PEER modules.

    Collective: call it on every rank. Starts a new counting window in each module.
    Returns {layer_number: stats} on global rank 0 (all layers of all stages), {} elsewhere.
    """
    raw = []
    for mod in peer_modules:
        u = mod.collect_usage()
        if u is None:
            continue
        if mod.layer_number is None:
            raise ValueError("PEER module has no layer_number (set_layer_number)")
        raw.append((mod, u))

    if raw and _is_dist() and dist.get_world_size(dp_group) > 1:
        # one all-reduce for every layer: [counts..., tokens, score_sum, score_sq, gate_max] each
        flat = torch.cat([torch.cat([u["counts"], torch.stack([u[k].float() for k in _SCALARS])])
                          for _, u in raw])
        dist.all_reduce(flat, group=dp_group)
        off = 0
        for _, u in raw:
            n = u["counts"].numel()
            u["counts"] = flat[off:off + n]
            for j, k in enumerate(_SCALARS):
                u[k] = flat[off + n + j]
            off += n + len(_SCALARS)

    mine = {}
    if not _is_dist() or (dist.get_rank(dp_group) == 0 and _tensor_rank() == 0):
        for mod, u in raw:
            mine[mod.layer_number] = usage_stats(u["counts"], u["tokens"], u["score_sum"],
                                                 u["score_sq"], u["gate_max"], mod.heads)
    if not _is_dist() or dist.get_world_size() == 1:
        return mine

    # one representative per (pipeline stage, virtual chunk) sends; the rest send {}
    rank0 = dist.get_rank() == 0
    parts = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(mine, parts, dst=0)
    if not rank0:
        return {}
    out = {}
    for part in parts:
        for layer, stats in part.items():
            out.setdefault(layer, stats)
    return dict(sorted(out.items()))
