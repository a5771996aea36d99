"""Shared by the export/import/eval tests and tests/workers/hf_layouts.py: a tiny
sentencepiece tokenizer, a tiny MLA+PEER config and megapeer checkpoints on disk."""
import glob
import sysconfig
import json
import os

import pytest
import torch

SEQ = 32
BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.ffn_hidden_size=128", f"model.seq_length={SEQ}", "model.layer_pattern=DP",
    "model.mla.q_lora_rank=32", "model.mla.kv_lora_rank=32", "model.mla.qk_head_dim=16",
    "model.mla.qk_pos_emb_head_dim=8", "model.mla.v_head_dim=16",
    "model.peer.num_experts=[8,8]", "model.peer.heads=2", "model.peer.topk=4",
    "model.peer.key_dim=16", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.precision=fp32",
]
TEXTS = ["def forward(self, x):\n    return self.linear(x) + 1\n",
         "The quick brown fox jumps over the lazy dog. " * 3,
         "  leading spaces, tabs\tand unicode: é 漢字 ✓\n\n",
         "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n"]


def train_test_tokenizer(folder, vocab_size=520):
    """A sentencepiece BPE model (vocabulary 520: Megatron pads it to 640 at TP=1 and 768
    at TP=2) trained on a few Python sources in about a second."""
    from megapeer.data.train_tokenizer import train_tokenizer
    model = os.path.join(folder, "tok.model")
    if os.path.isfile(model):
        return model
    src = os.path.join(folder, "src.jsonl")
    # a fixed corpus (the stdlib's json package), so editing this repo never changes it
    root = os.path.join(sysconfig.get_paths()["stdlib"], "json")
    with open(src, "w") as f:
        for p in sorted(glob.glob(os.path.join(root, "*.py"))):
            with open(p) as g:
                f.write(json.dumps({"text": g.read()}) + "\n")
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    return train_tokenizer([src], os.path.join(folder, "tok"), vocab_size=vocab_size,
                           quiet=True, threads=1)


def tiny_config(tokenizer, overrides=(), world=1, vocab=520):
    from megapeer.config import load_config
    return load_config(overrides=BASE + [f"model.vocab_size={vocab}",
                                         f"data.tokenizer.path={tokenizer}"] + list(overrides),
                       world_size=world)


def build(cfg, seed):
    from megapeer.models import build_model_chunks
    from megapeer.parallel import init_model_parallel
    init_model_parallel(cfg.parallel, seed)
    return build_model_chunks(cfg)


def randomize_buffers(chunks, seed):
    """BatchNorm running statistics away from their (0, 1) initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in chunks:
            for name, b in c.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn(b.shape, generator=g))
                elif name.endswith("running_var"):
                    b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def save_checkpoint(chunks, cfg, ckpt_dir, iteration=10):
    """A trainer-like checkpoint: iter folder (model + megapeer.yaml + train_state.json)
    and `latest`."""
    from megapeer.config import save_config
    from megapeer.training.checkpointing import iter_name, save_model
    it = os.path.join(ckpt_dir, iter_name(iteration))
    save_model(chunks, it)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_config(cfg, os.path.join(it, "megapeer.yaml"))
        with open(os.path.join(it, "train_state.json"), "w") as f:
            json.dump({"iteration": iteration}, f)
        with open(os.path.join(ckpt_dir, "latest"), "w") as f:
            f.write(iter_name(iteration))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return it


def export_tiny(folder, seed, **export_kw):
    """Tokenizer, tiny config, a built model saved as a checkpoint in folder/ckpt, and its
    Hugging Face export in folder/hf (export_kw go to export_checkpoint); returns folder/hf."""
    from megapeer.convert import export_checkpoint
    folder = str(folder)
    cfg = tiny_config(train_test_tokenizer(folder))
    save_checkpoint(build(cfg, seed=seed), cfg, os.path.join(folder, "ckpt"))
    hf = os.path.join(folder, "hf")
    export_checkpoint(os.path.join(folder, "ckpt"), hf, **export_kw)
    return hf


def sample_tokens(vocab, batch=2, seq=SEQ, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def megatron_logits(chunks, tokens, vocab):
    """Logits of the real vocabulary from megapeer's Megatron-Core forward (eval mode)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    model = chunks[-1].eval()
    b, s = tokens.shape
    logits = model(tokens, torch.arange(s).expand(b, s), None)
    if ps.get_tensor_model_parallel_world_size() > 1:   # vocab-parallel output
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab].float()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread; with the 2 cores shared, more
    threads oversubscribe them (measured 13 s against 0.5 s for the generation test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
