"""The built model: causality, parameter counts, the SDPA core attention."""
import math

import pytest
import torch

from megapeer.config import load_config

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128", "model.vocab_size=256", "model.seq_length=16",
         "model.peer.num_experts=[8,8]", "model.peer.heads=2", "model.peer.topk=4",
         "model.peer.key_dim=16", "training.precision=fp32"]


def _model(overrides):
    from megapeer.models import build_model
    from megapeer.parallel import init_model_parallel
    cfg = load_config(overrides=SMALL + overrides, world_size=1)
    init_model_parallel(cfg.parallel, seed=3)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("pattern,norm,q_lora", [("DP", "layernorm", "null"),
                                                 ("PP", "rmsnorm", "32")])
def test_causal(world1, pattern, norm, q_lora):
    """Changing the token at position t leaves every logit before t unchanged."""
    cfg, model = _model([f"model.layer_pattern={pattern}", f"model.peer.query_norm={norm}",
                         f"model.mla.q_lora_rank={q_lora}"])
    torch.manual_seed(0)
    tok = torch.randint(0, 256, (3, 16))
    pos = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        a = model(tok, pos, None)
        for t in (5, 11):
            tok2 = tok.clone()
            tok2[:, t] = (tok2[:, t] + 17) % 256
            b = model(tok2, pos, None)
            assert torch.equal(a[:, :t], b[:, :t]), f"logits before {t} changed"
            assert not torch.allclose(a[:, t:], b[:, t:])


def test_batchnorm_query_norm_leaks_across_positions(world1):
    """The paper's BatchNorm option mixes statistics over tokens (documented opt-in)."""
    cfg, model = _model(["model.layer_pattern=PP", "model.peer.query_norm=batchnorm"])
    model.train()
    torch.manual_seed(0)
    tok = torch.randint(0, 256, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        a = model(tok, pos, None)
        tok2 = tok.clone()
        tok2[:, 12] = (tok2[:, 12] + 5) % 256
        b = model(tok2, pos, None)
    assert not torch.equal(a[:, :12], b[:, :12])


@pytest.mark.parametrize("extra", [[], ["model.mla.q_lora_rank=24",
                                        "model.untie_embeddings_and_output_weights=false"],
                                   ["model.peer.expert_hidden=2", "model.layer_pattern=PDP",
                                    "model.num_layers=3", "model.peer.query_norm=rmsnorm"]])
def test_param_counts_match_model(world1, extra):
    from megapeer.models import padded_vocab_size, param_counts
    cfg, model = _model(extra)
    n = sum(p.numel() for p in model.parameters())
    pc = param_counts(cfg.model, padded_vocab_size(cfg.model, 1))
    assert pc["total"] == n
    peer = sum(p.numel() for name, p in model.named_parameters() if name.endswith((".U", ".V")))
    assert pc["peer_tables"] == peer
    assert pc["active"] < pc["total"]


def test_flops_dense_matches_6n_rule():
    """Without PEER and attention, training FLOPs per token are 6x the matmul params."""
    from megapeer.models import flops_per_token, param_counts
    cfg = load_config(overrides=SMALL + ["model.layer_pattern=D"], world_size=1)
    m = cfg.model
    f = flops_per_token(m, seq_length=0)  # attention core vanishes at S=0
    pc = param_counts(m)
    # matmul params: all but embeddings' input half and the norm vectors
    a = m.mla
    norms = m.num_layers * (2 * m.hidden_size + a.kv_lora_rank) + m.hidden_size
    matmul = pc["total"] - m.vocab_size * m.hidden_size - norms
    assert math.isclose(f, 6 * matmul, rel_tol=1e-9)


def test_sdpa_core_attention_matches_explicit(world1):
    """k/q heads wider than v heads (MLA), causal, with a softmax scale."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megapeer.models.attention import SDPAttention
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    att = SDPAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3,
                       k_channels=24, v_channels=16).eval()
    s, b, n = 7, 2, 2
    q, k = torch.randn(s, b, n, 24), torch.randn(s, b, n, 24)
    v = torch.randn(s, b, n, 16)
    out = att(q, k, v, None)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * 0.3
    scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
    ref = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(s, b, n * 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mla_does_not_think_te_is_present():
    """Megatron-Core 0.16.1's MLA can believe TE is importable when it is not."""
    import megapeer.models.layer_specs  # noqa: F401  (applies the correction)
    from megatron.core.transformer import multi_latent_attention as mla
    from megapeer.parallel.cpu_shims import transformer_engine_available
    assert mla.HAVE_TE == transformer_engine_available()


_STALE_CACHE_SCRIPT = r'''
import sys, torch
from torch import Tensor
from megapeer.ops import compile_cache
width, ops_dir, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
@torch.library.custom_op("cachetest::rows", mutates_args=())
def rows(x: Tensor, n: int) -> Tensor:
    return torch.arange(n + width, dtype=torch.float32)
@rows.register_fake
def _(x, n):
    return x.new_empty(n + width)
if tag:
    compile_cache.tag_compile_caches(ops_dir)
print(torch.compile(lambda x: rows(x, 4) * 2 + x.sum())(torch.ones(3)).tolist())
'''


def test_compile_caches_follow_the_ops_sources(tmp_path):
    """An update that changes a custom op's fake output shape, then a run on a warm
    torch.compile cache (inductor's FX graph cache keys on the graph's code, which is the
    same): with megapeer's op sources in the cache key the updated run compiles afresh;
    without (the mutant) it failed with "incorrect fake (aka meta) kernel"."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    script = tmp_path / "stale.py"
    script.write_text(_STALE_CACHE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    old, new = tmp_path / "old_ops", tmp_path / "new_ops"
    for d, text in ((old, "WIDTH = 1\n"), (new, "WIDTH = 0\n")):
        d.mkdir()
        (d / "op.py").write_text(text)

    def run(width, ops_dir, tag):
        return subprocess.run([sys.executable, str(script), str(width), str(ops_dir), tag],
                              capture_output=True, text=True, env=env, timeout=300)
    first = run(1, old, "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() == "[3.0, 5.0, 7.0, 9.0, 11.0]"
    second = run(0, new, "1")
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip() == "[3.0, 5.0, 7.0, 9.0]"


def test_compile_cache_tag_keeps_the_users(tmp_path):
    """The tag: a hash of the ops' Python sources, appended once to a tag the user set.
    (torch's config patch, not pytest's monkeypatch: undoing that deletes the key, and
    every later compile in the process failed.)"""
    import torch.compiler.config as cc

    from megapeer.ops import compile_cache as cache
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not hashed\n")
    h = cache.ops_source_hash(str(tmp_path))
    (tmp_path / "notes.txt").write_text("changed\n")
    assert cache.ops_source_hash(str(tmp_path)) == h
    (tmp_path / "a.py").write_text("x = 2\n")
    assert cache.ops_source_hash(str(tmp_path)) != h
    before = cc.cache_key_tag
    with cc.patch(cache_key_tag="mine"):
        tag = cache.tag_compile_caches(str(tmp_path))
        assert tag == "mine|megapeer-ops-" + cache.ops_source_hash(str(tmp_path))
        assert cache.tag_compile_caches(str(tmp_path)) == tag   # once
    with cc.patch(cache_key_tag=""):
        assert cache.tag_compile_caches().startswith("megapeer-ops-")
    assert cc.cache_key_tag == before
