"""Exported models against megapeer's own forward (fp32, CPU), the native DeepSeek-V3
export, the shipped tokenizer, sharded weights and cached generation.

Logit tolerance 1e-5 absolute (the plain PyTorch code repeats Megatron-Core's operations
in the same order; PEER's top-k makes any larger difference visible as a different expert).
"""
import json
import shutil

import pytest
import torch
from workers.hf_fixtures import (TEXTS, build, megatron_logits, randomize_buffers,
                                 sample_tokens, save_checkpoint, tiny_config,
                                 train_test_tokenizer)
from workers.hf_fixtures import one_thread  # noqa: F401 (autouse fixture)

VOCAB = 520
VARIANTS = {
    # no PEER layer, YaRN, tied embeddings: transformers' own DeepseekV3ForCausalLM
    "dense_yarn_tied": ["model.layer_pattern=D", "model.mla.rope_type=yarn",
                        "model.mla.rotary_scaling_factor=4.0", "model.mla.mscale=0.707",
                        "model.mla.mscale_all_dim=0.707",
                        "model.mla.original_max_position_embeddings=16",
                        "model.untie_embeddings_and_output_weights=false"],
    # PEER options: batchnorm query norm (running stats), 3 product keys, 2-neuron
    # experts, sigmoid gates, sub-key top-k != top-k, queries without a LoRA
    "peer_options": ["model.num_layers=3", "model.layer_pattern=PPD", "model.mla.q_lora_rank=null",
                     "model.peer.num_experts=[4,4,4]", "model.peer.key_dim=12",
                     "model.peer.query_norm=batchnorm", "model.peer.expert_hidden=2",
                     "model.peer.score_fn=sigmoid", "model.peer.subkey_topk=3",
                     "model.peer.topk=5", "model.peer.activation=silu"],
    "peer_rmsnorm_yarn": ["model.peer.query_norm=rmsnorm", "model.mla.rope_type=yarn",
                          "model.mla.rotary_scaling_factor=2.0"],
    # bf16 training: the model is wrapped in Megatron's Float16Module (as Megatron-LM
    # does), so every parameter, norms included, is saved in bfloat16
    "bf16": ["training.precision=bf16"],
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, world1):
    """{variant: (checkpoint dir, reference logits)} saved in this process."""
    d = tmp_path_factory.mktemp("hf_export")
    tok = train_test_tokenizer(str(d))
    out = {"dir": d, "tok": tok}
    for i, (name, ov) in enumerate(VARIANTS.items()):
        cfg = tiny_config(tok, ov)
        chunks = build(cfg, seed=20 + i)
        randomize_buffers(chunks, seed=i)
        save_checkpoint(chunks, cfg, str(d / name))
        out[name] = (str(d / name), megatron_logits(chunks, sample_tokens(VOCAB), VOCAB))
    return out


def _export(ckpts, variant, fmt="auto", **kw):
    """The variant's export folder (written once per module)."""
    from megapeer.convert import export_checkpoint
    name = f"hf_{variant}_{fmt}" + "".join(f"_{k}{v}" for k, v in sorted(kw.items()))
    out = ckpts["dir"] / name
    if not out.exists():
        export_checkpoint(ckpts[variant][0], str(out), fmt=fmt, **kw)
    return out


def _load(folder, remote=True):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote,
                                                local_files_only=True)


def _logits(model):
    with torch.no_grad():
        return model(sample_tokens(VOCAB)).logits


def test_dense_model_exports_to_native_deepseek_v3(ckpts):
    from megapeer.convert import export_checkpoint
    ckpt, ref = ckpts["dense_yarn_tied"]
    out = ckpts["dir"] / "hf_dense"
    assert export_checkpoint(ckpt, str(out))["format"] == "deepseek_v3"      # auto
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "deepseek_v3" and "auto_map" not in conf
    assert not (out / "modeling_megapeer.py").exists()
    model = _load(out, remote=False)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)
    # the same checkpoint through our own modeling file
    torch.testing.assert_close(_logits(_load(_export(ckpts, "dense_yarn_tied", "megapeer"))),
                               ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["peer_options", "peer_rmsnorm_yarn"])
def test_peer_variants_match(ckpts, variant):
    out = _export(ckpts, variant)
    assert json.loads((out / "config.json").read_text())["model_type"] == "megapeer"
    torch.testing.assert_close(_logits(_load(out)), ckpts[variant][1], rtol=0, atol=1e-5)


def test_bf16_checkpoint_keeps_its_dtypes(ckpts):
    from safetensors.torch import load_file

    from megapeer.convert import export_checkpoint, import_hf
    d = ckpts["dir"]
    out = _export(ckpts, "bf16")
    w = load_file(str(out / "model.safetensors"))
    # Float16Module: every tensor of a bf16 checkpoint is bfloat16, norms included
    assert {str(t.dtype) for t in w.values()} == {"torch.bfloat16"}
    assert w["model.layers.0.self_attn.q_a_layernorm.weight"].dtype == torch.bfloat16
    assert w["model.layers.1.mlp.U"].dtype == torch.bfloat16
    model = _load(out)
    assert model.dtype == torch.bfloat16
    # the loaded model keeps the saved dtypes (no norm is upcast to float32)
    sd = model.state_dict()
    assert {k: sd[k].dtype for k in w} == {k: t.dtype for k, t in w.items()}
    torch.testing.assert_close(_logits(model).float(), ckpts["bf16"][1], rtol=0, atol=1e-5)
    import_hf(str(out), str(d / "ckpt_bf16_back"))
    export_checkpoint(str(d / "ckpt_bf16_back"), str(d / "hf_bf16_back"))
    back = load_file(str(d / "hf_bf16_back" / "model.safetensors"))
    assert back.keys() == w.keys()
    assert all(w[k].dtype == back[k].dtype and torch.equal(w[k], back[k]) for k in w)


def test_sharded_weights_and_bf16(ckpts):
    ref = ckpts["peer_rmsnorm_yarn"][1]
    out = _export(ckpts, "peer_rmsnorm_yarn", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    torch.testing.assert_close(_logits(_load(out)), ref, rtol=0, atol=1e-5)
    out16 = _export(ckpts, "peer_rmsnorm_yarn", dtype="bfloat16")
    model = _load(out16)
    assert model.dtype == torch.bfloat16
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_files_match_sentencepiece(ckpts):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megapeer.convert.tokenizer import load_folder_tokenizer
    out = _export(ckpts, "peer_options")
    sp = spm.SentencePieceProcessor(model_file=ckpts["tok"])
    auto = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = load_folder_tokenizer(str(out))
    for text in TEXTS + ["", " x", "a  b\n\n\tc", "ünïcödé → ∑"]:
        ids = sp.encode(text)
        assert auto.encode(text, add_special_tokens=False) == ids, repr(text)
        assert ours.encode(text) == ids
        assert auto.decode(ids) == sp.decode(ids)
    assert auto.eos_token_id == sp.eos_id() and auto.bos_token_id == sp.bos_id()


def test_cached_generation_equals_recomputation(ckpts):
    from megapeer.convert.generate import generate_ids
    model = _load(_export(ckpts, "peer_options"))
    prompt = sample_tokens(VOCAB, batch=1, seq=6, seed=3)[0].tolist()
    n = 30                                   # runs past the training length (32)
    runs = {}
    for temp, k in ((0.0, None), (1.0, 40)):
        cached = generate_ids(model, prompt, n, temp, k, seed=5, use_cache=True)
        full = generate_ids(model, prompt, n, temp, k, seed=5, use_cache=False)
        assert cached == full and len(cached) == n
        runs[temp] = cached
    ids = torch.tensor([prompt])
    a = model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=True)
    b = model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and a[0, len(prompt):].tolist() == runs[0.0]
    # left padding in a batch gives the unpadded tokens
    pad = torch.tensor([[0, 0] + prompt, prompt[:2] + prompt])
    mask = torch.tensor([[0, 0] + [1] * len(prompt), [1] * (len(prompt) + 2)])
    c = model.generate(pad, attention_mask=mask, max_new_tokens=n, do_sample=False)
    assert c[0, len(prompt) + 2:].tolist() == runs[0.0]


def test_cache_holds_latent_and_rotary_key(ckpts):
    """Per layer the cache stores the normalised latent and the rotated shared key only."""
    from megapeer.convert.generate import new_cache
    model = _load(_export(ckpts, "peer_options"))
    ids = sample_tokens(VOCAB, batch=1, seq=9, seed=4)
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    cfg = model.config
    layer0 = cache.layers[0]
    assert tuple(layer0.keys.shape) == (1, 1, 9, cfg.kv_lora_rank)
    assert tuple(layer0.values.shape) == (1, 1, 9, cfg.qk_rope_head_dim)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h)[..., :cfg.kv_lora_rank])
    torch.testing.assert_close(layer0.keys[0, 0], latent[0], rtol=0, atol=0)


def test_sample_from_export_and_checkpoint_agree(ckpts, capsys):
    from megapeer.convert import sample
    ckpt = ckpts["peer_options"][0]
    out = _export(ckpts, "peer_options")
    a = sample(str(out), None, "def f(x):", max_new_tokens=24, temperature=0.9, top_k=50, seed=2)
    b = sample(ckpt, None, "def f(x):", max_new_tokens=24, temperature=0.9, top_k=50, seed=2)
    assert a == b and len(a) > 0
    from megapeer.convert.cli import sample_main
    assert sample_main(["--model", str(out), "--prompt", "def f(x):", "--max-new-tokens",
                        "24", "--temperature", "0.9", "--top-k", "50", "--seed", "2"]) == 0
    assert capsys.readouterr().out == "def f(x):" + a + "\n"


def test_native_export_round_trip(ckpts):
    from safetensors.torch import load_file

    from megapeer.convert import export_checkpoint, import_hf
    d = ckpts["dir"]
    first = _export(ckpts, "dense_yarn_tied")
    import_hf(str(first), str(d / "ckpt_dense_back"))
    export_checkpoint(str(d / "ckpt_dense_back"), str(d / "hf_dense_back"))
    a = load_file(str(first / "model.safetensors"))
    b = load_file(str(d / "hf_dense_back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in a            # tied: only the embedding is stored
    # without megapeer.yaml the model config comes from config.json alone
    bare = d / "hf_dense_bare"
    shutil.copytree(first, bare)
    (bare / "megapeer.yaml").unlink()
    import_hf(str(bare), str(d / "ckpt_dense_bare"))
    export_checkpoint(str(d / "ckpt_dense_bare"), str(d / "hf_dense_bare_back"))
    c = load_file(str(d / "hf_dense_bare_back" / "model.safetensors"))
    assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == \
        json.loads((d / "hf_dense_bare_back" / "config.json").read_text())
