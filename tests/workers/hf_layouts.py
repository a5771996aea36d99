"""Checkpoints under TP=2, EP=2 and PP=2 x VPP=2 for the export tests, and an imported
checkpoint loaded under TP=2 and EP=2 (run under torchrun with 2 processes).

    hf_layouts.py OUT TOKENIZER IMPORTED_ITER_DIR
writes OUT/ckpt_{tp2,ep2,vpp2} (fresh random models) and OUT/layouts.pt with the TP/EP
models' logits computed in their layout, plus the logits of IMPORTED_ITER_DIR loaded
under those layouts ("imported_tp2", "imported_ep2").
"""
import os
import sys

import torch
from hf_fixtures import build, megatron_logits, sample_tokens, save_checkpoint, tiny_config

from megapeer.config import load_config
from megapeer.parallel import init_distributed
from megapeer.training.checkpointing import load_model

LAYOUTS = {"tp2": ["parallel.tensor=2"], "ep2": ["parallel.expert=2"],
           "vpp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]}


def main(out, tokenizer, imported):
    init_distributed()
    world = torch.distributed.get_world_size()
    res = {}
    for i, (name, ov) in enumerate(LAYOUTS.items()):
        cfg = tiny_config(tokenizer, ov, world=world)
        chunks = build(cfg, seed=100 + i)
        save_checkpoint(chunks, cfg, os.path.join(out, f"ckpt_{name}"))
        if cfg.parallel.pipeline > 1:
            continue                      # logits need the pipeline schedule: not compared
        res[name] = megatron_logits(chunks, sample_tokens(cfg.model.vocab_size),
                                    cfg.model.vocab_size)
        icfg = load_config(os.path.join(imported, "megapeer.yaml"), overrides=ov,
                           world_size=world)
        chunks = build(icfg, seed=7)
        load_model(chunks, imported)
        res[f"imported_{name}"] = megatron_logits(
            chunks, sample_tokens(icfg.model.vocab_size), icfg.model.vocab_size)
    if torch.distributed.get_rank() == 0:
        torch.save(res, os.path.join(out, "layouts.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main(*sys.argv[1:4]))
