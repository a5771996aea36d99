"""PEER: Parameter Efficient Expert Retrieval (He 2024), as a Megatron-Core MLP module.

Per token x [d] and head h:
  q_h   = norm(W_q x)_h                         query [key_dim], per-token norm by default
  s_i   = q_h,i . K_i                           one score per sub-key, per product dimension i
  top-k candidates per dimension, combined (sums of scores) and pruned to top-k
  g     = softmax (or sigmoid) of the k selected scores
  y     = sum_h sum_k g * act(u_e . x) v_e      experts e: single neurons (or m-wide MLPs)

Sharding (see docs/architecture.md): U and V ([N*m, d]) are split along d over the
tensor-parallel group (partial dot products are all-reduced, a [T, h, k] tensor;
the output slices are all-gathered) and along expert rows over the expert-parallel
group (tokens all-gathered within the group, partial outputs reduce-scattered).
Query network and sub-keys are small and replicated. With sequence parallelism each TP
rank retrieves for its chunk of the sequence; tokens, gates and indices are then
all-gathered over TP, and the output is split back into chunks.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from ..ops import gather_axpy, gather_dot, table_grads
from ..ops.dispatch import expert_layout, expert_order, foreign_pairs_to_rows, to_expert_order
from ..ops.grad_accum import accumulator

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class PEER(MegatronModule):
    """Drop-in for the `mlp` slot of a TransformerLayer: forward([s, b, d]) -> (out, None)."""

    def __init__(self, config, peer):
        super().__init__(config=config)
        self.peer = peer
        d = config.hidden_size
        self.d = d
        self.heads, self.topk = peer.heads, peer.topk
        self.sizes = list(peer.num_experts)
        self._topk_op = False   # model.peer.topk_kernel: the fused op may run (_fused_topk)
        if peer.topk_kernel != "torch" and len(self.sizes) == 2:
            from ..ops import product_topk  # registers megapeer::product_topk
            self._topk_op = peer.topk_kernel == "triton" or product_topk.available()
        self.num_experts = math.prod(self.sizes)
        self.m = peer.expert_hidden
        self.sub_dim = peer.key_dim // len(self.sizes)
        self.subkey_topk = peer.subkey_topk or peer.topk
        self.act = _ACTS[peer.activation]
        self.layer_number = None

        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.ep_size = ps.get_expert_model_parallel_world_size()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.d_local = d // self.tp_size
        self.n_local = self.num_experts // self.ep_size
        # sequence parallelism: this rank gets (and returns) a 1/tp chunk of the sequence
        self.sp = bool(config.sequence_parallel) and self.tp_size > 1

        dtype = config.params_dtype
        # Megatron's convention: use_cpu_initialization keeps the parameters on the CPU
        on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
        dev = torch.cuda.current_device() if on_gpu else "cpu"
        kw = dict(device=dev, dtype=dtype)
        self.query = torch.nn.Parameter(torch.empty(self.heads * peer.key_dim, d, **kw))
        if peer.query_norm == "layernorm":
            self.query_norm = torch.nn.LayerNorm(peer.key_dim, eps=config.layernorm_epsilon, **kw)
        elif peer.query_norm == "rmsnorm":
            self.query_norm = torch.nn.RMSNorm(peer.key_dim, eps=config.layernorm_epsilon, **kw)
        elif peer.query_norm == "batchnorm":
            # The paper's choice. Statistics span all tokens of the batch, so a token's
            # query depends on other positions: not causal. Opt-in only.
            self.query_norm = torch.nn.BatchNorm1d(self.heads * peer.key_dim, **kw)
        else:
            self.query_norm = None
        self.keys = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(n, self.sub_dim, **kw)) for n in self.sizes])
        self.U = torch.nn.Parameter(torch.empty(self.n_local * self.m, self.d_local, **kw))
        self.V = torch.nn.Parameter(torch.empty(self.n_local * self.m, self.d_local, **kw))
        for p in (self.U, self.V):
            p.allreduce = False                 # expert-parallel: reduced over expert-DP
            p.tensor_model_parallel = self.tp_size > 1
            p.partition_dim = 1
            p.partition_stride = 1
            p.peer_table = True                 # for weight-decay groups
            p.peer_fused_accum = peer.grad_accum_fusion   # see ops/grad_accum.py
        table_grads.track(self.U, self.V)       # model.peer.defer_table_grads may defer them
        if self.sp:   # retrieval sees this rank's tokens only: Megatron sums these over TP
            for p in self._retrieval_params():
                p.sequence_parallel = True
        self.reset_parameters()
        self._usage = None

    def _retrieval_params(self):
        return [self.query, *self.keys,
                *(self.query_norm.parameters() if self.query_norm is not None else ())]

    # ---------------------------------------------------------------- init
    def reset_parameters(self):
        if not self.config.perform_initialization:
            return
        std = self.peer.init_std or self.config.init_method_std
        with torch.no_grad():
            torch.nn.init.normal_(self.query, std=self.config.init_method_std)
            for k in self.keys:
                torch.nn.init.normal_(k, std=1.0 / math.sqrt(self.sub_dim))
            tracker = tensor_parallel.get_cuda_rng_tracker()
            name = tensor_parallel.random.get_expert_parallel_rng_tracker_name()
            ctx = tracker.fork(name) if name in tracker.get_states() else contextlib.nullcontext()
            with ctx:
                torch.nn.init.normal_(self.U, std=std)
                # output-side init scaled like Megatron's output layers
                torch.nn.init.normal_(self.V, std=std / math.sqrt(2.0 * self.config.num_layers))

    def set_layer_number(self, layer_number):
        self.layer_number = layer_number

    # ----------------------------------------------------------- retrieval
    def retrieve(self, x):
        """x [T, d] -> (indices [T, h, k] int64 global expert ids, gates [T, h, k], scores)."""
        T = x.shape[0]
        q = F.linear(x, self.query)
        if isinstance(self.query_norm, torch.nn.BatchNorm1d):
            q = self.query_norm(q)
        q = q.view(T, self.heads, -1)
        if self.query_norm is not None and not isinstance(self.query_norm, torch.nn.BatchNorm1d):
            q = self.query_norm(q)
        parts = q.split(self.sub_dim, dim=-1)
        ck = self.subkey_topk
        if self._fused_topk(x):   # one kernel for both stages (ops/product_topk.py)
            s0, s1 = (torch.einsum("thc,nc->thn", qi, ki.to(qi.dtype))
                      for qi, ki in zip(parts, self.keys))
            i0, i1 = torch.ops.megapeer.product_topk(s0.reshape(T * self.heads, -1),
                                                     s1.reshape(T * self.heads, -1),
                                                     ck, self.topk)
            i0, i1 = i0.view(T, self.heads, -1), i1.view(T, self.heads, -1)
            cand_s = _up(s0.gather(-1, i0)) + _up(s1.gather(-1, i1))
            return self._gated(i0 * self.sizes[1] + i1, cand_s, x)
        cand_s = cand_i = None
        last = len(self.sizes) - 1
        for i, (qi, ki) in enumerate(zip(parts, self.keys)):
            si = torch.einsum("thc,nc->thn", qi, ki.to(qi.dtype))
            vals, ids = si.topk(ck, dim=-1)
            if cand_s is None:
                cand_s, cand_i = vals, ids
                continue
            # sums ranked in fp32 (bf16 sums tie often), as the fused top-k does
            comb_s = (_up(cand_s).unsqueeze(-1) + _up(vals).unsqueeze(-2)).flatten(-2)
            comb_i = (cand_i.unsqueeze(-1) * self.sizes[i] + ids.unsqueeze(-2)).flatten(-2)
            # Keeping >= topk partial sums at every stage makes the result exact
            # (any member of the final top-k has its partial sum in the partial top-k).
            keep = self.topk if i == last else min(comb_s.shape[-1], max(ck, self.topk))
            cand_s, pos = comb_s.topk(keep, dim=-1)
            cand_i = comb_i.gather(-1, pos)
        return self._gated(cand_i, cand_s, x)

    def _fused_topk(self, x) -> bool:
        """model.peer.topk_kernel: 'triton' (two sub-key sets: config/validate.py; the op
        runs its torch reference where the kernel cannot, ops/product_topk.py), or 'auto'
        with two sub-key sets on a GPU where Triton runs (_topk_op: decided in __init__)."""
        return self._topk_op and (self.peer.topk_kernel == "triton" or x.is_cuda)

    def _gated(self, cand_i, cand_s, x):
        s32 = _up(cand_s)
        if self.peer.score_fn == "softmax":
            gates = torch.softmax(s32, dim=-1).to(x.dtype)
        else:
            gates = torch.sigmoid(s32).to(x.dtype)
        return cand_i, gates, cand_s

    # -------------------------------------------------------------- experts
    def experts(self, x, idx, gates):
        """Sum of gate * act(u . x) * v over heads and selected experts; x [T, d]."""
        mode = self.peer.kernel
        acc_u = accumulator(self.U)    # main_grad aliases under DDP (ops/grad_accum.py)
        acc_v = accumulator(self.V)
        if self.ep_size > 1:
            group = ps.get_expert_model_parallel_group()
            x = _comm(mappings.gather_from_sequence_parallel_region, x, True, group=group)
            gates = _comm(mappings.gather_from_sequence_parallel_region, gates, True, group=group)
            with record_function(COMM_LABEL):
                idx = _all_gather_rows(idx, group)
            idx = idx - self.ep_rank * self.n_local
            own = (idx >= 0) & (idx < self.n_local)
            gates = gates * own
            idx = foreign_pairs_to_rows(mode, idx, own, self.n_local, self.m, x, self.U)
        # wide experts on the grouped kernels: s and w as [pairs, m] sorted by expert
        srt = expert_order(mode, idx, self.m, x, self.U)
        n_exp = self.U.shape[0] // self.m
        lay = expert_layout(idx, n_exp, self.m) if srt else None   # one sort, shared
        # deferred table gradients (expert order only; ops/table_grads.py)
        defer = self.peer.defer_table_grads
        xs = x
        if self.tp_size > 1:
            tp = ps.get_tensor_model_parallel_group()
            lo = self.tp_rank * self.d_local
            # under SP, x's gather from the sequence chunks already sums its grad over TP
            xs = x if self.sp else _comm(mappings.copy_to_tensor_model_parallel_region, x, group=tp)
            xs = xs[:, lo:lo + self.d_local]
        d_u = defer if srt and table_grads.deferring(self.U, defer, xs) else 1
        s = gather_dot(xs, idx, self.U, self.m, mode, acc_u, srt, lay, d_u)
        if self.tp_size > 1:
            s = _comm(mappings.reduce_from_tensor_model_parallel_region, s, group=tp)
        if srt:
            gates = to_expert_order(gates, idx, n_exp, self.m, lay)
        w = self.act(s) * gates.unsqueeze(-1)
        if self.tp_size > 1:
            w = _comm(mappings.copy_to_tensor_model_parallel_region, w, group=tp)
        d_v = defer if srt and table_grads.deferring(self.V, defer, w) else 1
        out = gather_axpy(w, idx, self.V, self.m, mode, acc_v, srt, lay, d_v)
        if self.ep_size > 1:
            out = _comm(mappings.reduce_scatter_to_sequence_parallel_region, out, group=group)
        if self.tp_size > 1:
            out = _comm(mappings.gather_from_tensor_model_parallel_region, out, group=tp)
        return out

    def forward(self, hidden_states, padding_mask=None):
        # padding_mask is accepted for the MLP interface; every token is routed.
        s, b, d = hidden_states.shape
        x = hidden_states.reshape(s * b, d)
        idx, gates, scores = self.retrieve(x)
        if self.sp:   # retrieval on this rank's chunk; the expert step on the whole sequence
            tp = ps.get_tensor_model_parallel_group()
            # backward: x's grads are partial over the d-slices (reduce-scatter sums them);
            # the gates' grads are complete on every rank (this rank's chunk is taken)
            x = _comm(mappings.gather_from_sequence_parallel_region, x, True, group=tp)
            gates = _comm(mappings.gather_from_sequence_parallel_region, gates, False, group=tp)
            with record_function(COMM_LABEL):
                idx = _all_gather_rows(idx, tp)
                if self._usage is not None and self.training:
                    scores = _all_gather_rows(scores.detach(), tp)
        if self._usage is not None and self.training:
            self._record_usage(idx, gates, scores)
        out = self.experts(x, idx, gates)
        if self.sp:
            out = _comm(mappings.scatter_to_sequence_parallel_region, out, group=tp)
        return out.view(s, b, d), None

    # ---------------------------------------------------------- expert usage
    def track_usage(self, enabled: bool = True):
        """Count selections per expert on the device (no host sync) until collected."""
        self._usage = self._new_usage() if enabled else None

    def _new_usage(self):
        dev = self.query.device
        return {"counts": torch.zeros(self.num_experts, device=dev, dtype=torch.float32),
                "tokens": torch.zeros((), device=dev), "score_sum": torch.zeros((), device=dev),
                "score_sq": torch.zeros((), device=dev), "gate_max": torch.zeros((), device=dev)}

    @torch.no_grad()
    def _record_usage(self, idx, gates, scores):
        u = self._usage
        flat = idx.reshape(-1)
        u["counts"].index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        u["tokens"] += idx.shape[0]
        sc = scores.float()
        u["score_sum"] += sc.mean(dim=-1).sum()
        u["score_sq"] += (sc * sc).mean(dim=-1).sum()
        u["gate_max"] += gates.float().max(dim=-1).values.sum()

    def collect_usage(self):
        """Return a copy of the raw usage counters and start a new window (None if not
        tracking). The counters are zeroed in place: a compiled forward keeps its graph."""
        u = self._usage
        if u is None:
            return None
        out = {k: v.clone() for k, v in u.items()}
        for v in u.values():
            v.zero_()
        return out

    # ----------------------------------------------------------- checkpoints
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = {}
        plain = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items()
                 if k not in ("U", "V")}
        sd.update(make_sharded_tensors_for_checkpoint(plain, prefix, {}, sharded_offsets))
        edp_rank = ps.get_expert_data_parallel_rank()
        n_pre = len(sharded_offsets)
        for name in ("U", "V"):
            sd[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", getattr(self, name), *sharded_offsets,
                (n_pre + 0, self.ep_rank, self.ep_size), (n_pre + 1, self.tp_rank, self.tp_size),
                replica_id=(0, 0, edp_rank), prepend_axis_num=n_pre)
        return sd


COMM_LABEL = "peer.comm"   # profiler label of PEER's collectives (training/profiling.py)


def _up(t):
    """t in at least fp32: retrieval ranks score sums there (bf16 sums tie often)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@torch.compiler.disable
def _comm(fn, x, *args, **kwargs):
    """fn(x, ...) (a Megatron mapping) with its forward and backward collectives inside
    record_function(COMM_LABEL) spans, so that profiles can tell PEER's communication apart.

    The backward span opens in the backward of a marker after fn and closes in the
    backward of a marker before it; the autograd engine runs fn's backward in between.
    Always eager, also inside compiled layers: with the collectives traced into inductor's
    graphs, two TP ranks on H200s issued different sequences of NCCL calls (an extra
    all-reduce on rank 0 after every PEER layer) and hung.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        with record_function(COMM_LABEL):
            return fn(x, *args, **kwargs)
    box = []
    x = _SpanMarker.apply(x, box, False)
    with record_function(COMM_LABEL):
        y = fn(x, *args, **kwargs)
    return _SpanMarker.apply(y, box, True)


class _SpanMarker(torch.autograd.Function):
    """Identity; its backward opens (opens=True) or closes the backward span in `box`."""

    @staticmethod
    def forward(ctx, x, box, opens):
        ctx.box, ctx.opens = box, opens
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.opens:
            rf = record_function(COMM_LABEL)
            rf.__enter__()
            ctx.box.append(rf)
        elif ctx.box:
            ctx.box.pop().__exit__(None, None, None)
        return g, None, None





@torch.compiler.disable
def _all_gather_rows(t, group):
    """All-gather a tensor along dim 0 (no autograd)."""
    n = torch.distributed.get_world_size(group)
    out = torch.empty((n * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    torch.distributed.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out
