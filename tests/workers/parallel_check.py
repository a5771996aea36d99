"""Parallel layouts against the single-process result (run under torchrun).

  reference: world 1. Loss, full gradients and logits of a tiny MLA+PEER model on a
             fixed global batch; saves them and the model checkpoint.
  layouts:   world N. For each layout: load the reference checkpoint (resharded),
             run the same global batch through Megatron's schedule + DDP, compare
             loss and every gradient shard with the reference; save a checkpoint
             (unless PARALLEL_SAVE=0).
  reload:    world 1. Load each layout's checkpoint and compare logits.
Results go to OUT/<stage>.json; the pytest side asserts on them.
"""
import json
import os
import sys

import torch

from megapeer.config import load_config
from megapeer.models import build_model_chunks, transformer_config
from megapeer.parallel import init_distributed, init_model_parallel
from megapeer.training.checkpointing import gather_full, load_model, save_model
from megapeer.training.step import forward_backward, wrap_ddp

GB, MBS, SEQ, VOCAB = 8, 2, 16, 256
LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "pp2": ["parallel.pipeline=2"],
    "vpp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "ep2": ["parallel.expert=2"],
    "dp2": [],
    "dp2overlap": ["training.overlap_grad_reduce=true"],
    "tp2ep2": ["parallel.tensor=2", "parallel.expert=2"],
    "tp2sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "tp2spep2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"],
    "tp2sppp2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"],
}
# name+flag: a layout with more overrides (e.g. "tp2+defer3")
FLAGS = {"defer3": ["model.peer.defer_table_grads=3"]}
BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}", f"model.seq_length={SEQ}",
    "model.layer_pattern=DP", "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=32",
    "model.mla.qk_head_dim=16", "model.mla.qk_pos_emb_head_dim=8", "model.mla.v_head_dim=16",
    "model.peer.num_experts=[8,8]", "model.peer.heads=2", "model.peer.topk=4",
    "model.peer.key_dim=16", f"training.micro_batch_size={MBS}",
    f"training.global_batch_size={GB}", "training.precision=fp32",
]


def global_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (GB, SEQ + 1), generator=g)
    mbs = []
    for i in range(GB // MBS):
        t = tokens[i * MBS:(i + 1) * MBS]
        mbs.append({"tokens": t[:, :-1], "labels": t[:, 1:],
                    "loss_mask": torch.ones(MBS, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ)})
    return mbs


def run_step(cfg, chunks):
    from megatron.core import parallel_state as ps
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = [b for i, b in enumerate(global_batch()) if i % dp == r]
    tcfg = chunks[0].config
    overlap = cfg.training.overlap_grad_reduce
    from megapeer.ops import table_grads
    ddp = wrap_ddp(chunks, tcfg, overlap_grad_reduce=overlap)
    tables = [p for m in ddp for p in m.module.parameters() if table_grads.tracked(p)]
    defer = cfg.model.peer.defer_table_grads > 1
    # the same step twice: overlapped, DDP learns its buckets' readiness in the first;
    # deferred table gradients, the second's zero_grad_buffer skips the tables that the
    # first stored whole (training/step.py), which the second must overwrite
    kept = None
    for i in range(2 if overlap or defer else 1):
        whole = bool(tables) and all(table_grads.stored_whole(p) for p in tables)
        for m in ddp:
            m.zero_grad_buffer()
        if i == 1 and defer:   # tables as the first step left them, every other grad zero
            kept = whole and all(bool(p.main_grad.abs().sum() > 0) for p in tables) and all(
                not bool(p.main_grad.any()) for m in ddp for p in m.module.parameters()
                if p.requires_grad and not table_grads.tracked(p))
        iters = [iter(mine) for _ in ddp]
        loss = forward_backward(ddp, iters, len(mine), SEQ, MBS)
    ready = None
    if overlap:   # deferred PEER table gradients told DDP they were ready (ops/table_grads.py)
        ready = all(p in bg.golden_per_param_grad_ready_counts for m in ddp
                    for p, bg in m.param_to_bucket_group.items() if table_grads.tracked(p))
    return float(loss), gather_full(chunks, "grad"), {"tables_ready": ready, "tables_kept": kept}


def logits(chunks):
    torch.manual_seed(1)
    tok = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        out = chunks[0].eval()(tok, torch.arange(SEQ).expand(2, SEQ), None)
    return out[..., :VOCAB]


def build(overrides, world):
    # PARALLEL_EXTRA: more overrides, e.g. another PEER kernel (tests/test_peer_grouped.py)
    extra = os.environ.get("PARALLEL_EXTRA", "").split()
    cfg = load_config(overrides=BASE + extra + overrides, world_size=world)
    init_model_parallel(cfg.parallel, seed=1234)
    return cfg, build_model_chunks(cfg, transformer_config(cfg.model, cfg.parallel,
                                                           cfg.training))


def main(stage, out, layouts):
    init_distributed()
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    res = {}
    if stage == "reference":
        cfg, chunks = build([], 1)
        save_model(chunks, f"{out}/ckpt_ref")
        res["logits"] = logits(chunks).tolist()
        torch.manual_seed(0)
        cfg, chunks = build([], 1)
        load_model(chunks, f"{out}/ckpt_ref")
        loss, grads, _ = run_step(cfg, chunks)
        res["loss"] = loss
        torch.save(grads, f"{out}/ref_grads.pt")
    elif stage == "layouts":
        ref = torch.load(f"{out}/ref_grads.pt")
        for name in layouts:
            base, *flags = name.split("+")
            cfg, chunks = build(LAYOUTS[base] + [o for f in flags for o in FLAGS[f]], world)
            load_model(chunks, f"{out}/ckpt_ref")
            loss, grads, seen = run_step(cfg, chunks)
            errs = {k: ((grads[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-12))
                    .item() for k in ref if k in grads}
            worst = max(errs, key=errs.get)
            res[name] = {"loss": loss, "grad_rel_err": errs[worst], "worst_key": worst,
                         "missing": sorted(set(ref) - set(grads)), **seen}
            if os.environ.get("PARALLEL_SAVE", "1") == "1":   # for the reload stage
                save_model(chunks, f"{out}/ckpt_{name}")
    elif stage == "reload":
        for name in layouts:
            cfg, chunks = build([], 1)
            load_model(chunks, f"{out}/ckpt_{name}")
            res[name] = logits(chunks).tolist()
    if rank == 0:
        with open(f"{out}/{stage}.json", "w") as f:
            json.dump(res, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else [])
    exit_quickly(0)
