"""Configuration: YAML + overrides, types, and every combination error names its key."""
import glob
import os

import pytest

from megapeer.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_size: 256\n  peer:\n    topk: 4\n")
    cfg = load_config(str(p), ["model.peer.topk=8", "training.lr=1e-3",
                               "model.peer.num_experts=[16,16,16]", "model.peer.key_dim=48"])
    assert cfg.model.hidden_size == 256 and cfg.model.peer.topk == 8
    assert cfg.training.lr == 1e-3 and cfg.model.peer.num_experts == [16, 16, 16]


@pytest.mark.parametrize("text,overrides,world,match", [
    ("model:\n  hiden_size: 3\n", [], 1, r"c\.yaml: unknown key 'model\.hiden_size'"),
    ("", ["model.peer.topkk=3"], 1, r"unknown key 'model\.peer\.topkk'"),
    ("model:\n  hidden_size: big\n", [], 1, r"'model\.hidden_size' must be an integer"),
    ("training:\n  lr: [1]\n", [], 1, r"'training\.lr' must be a number"),
    ("model:\n  peer:\n    score_fn: tanh\n", [], 1, r"'model\.peer\.score_fn' must be one of"),
    ("parallel:\n  tensor: 3\n", [], 4, r"'parallel\.tensor' .* does not divide the world size 4"),
    ("parallel:\n  expert: 3\n", [], 4, r"'parallel\.expert' = 3 does not divide"),
    ("", ["model.peer.topk=99"], 1, r"'model\.peer\.topk' = 99 must be in"),
    ("", ["model.peer.subkey_topk=2", "model.peer.topk=5"], 1,
     r"'model\.peer\.topk' = 5 is larger than the candidate set \(2\^2 = 4\)"),
    ("", ["model.peer.key_dim=63"], 1, r"'model\.peer\.key_dim' = 63 is not divisible"),
    ("", ["model.peer.num_experts=[1024]"], 1, r"'model\.peer\.num_experts'.*two or more"),
    ("", ["model.mla.qk_pos_emb_head_dim=7"], 1, r"qk_pos_emb_head_dim' = 7 must be even"),
    ("", ["model.num_attention_heads=3", "parallel.tensor=2"], 2,
     r"'model\.num_attention_heads' = 3 must be positive and divisible"),
    ("", ["model.num_layers=3", "parallel.pipeline=2"], 2, r"'model\.num_layers' = 3"),
    ("", ["model.layer_pattern=DXP"], 1, r"'model\.layer_pattern'"),
    ("", ["training.global_batch_size=6", "training.micro_batch_size=4"], 1,
     r"'training\.global_batch_size' = 6"),
    ("", ["parallel.pipeline=2", "parallel.virtual_pipeline=3"], 2,
     r"virtual_pipeline' \* pipeline = 6 does not divide"),
    ("", ["model.layer_pattern=D", "parallel.expert=2"], 2, r"needs at least one PEER layer"),
    ("", ["model.peer.kernel=gmm", "model.peer.expert_hidden=4"], 1,
     r"'model\.peer\.expert_hidden' = 4 and the table width .* multiples of 8 .*kernel=gmm"),
    ("", ["training.fused_adam=maybe"], 1, r"'training\.fused_adam' must be true or false"),
    ("", ["model.peer.topk_kernel=triton", "model.peer.num_experts=[4,4,4]",
          "model.peer.key_dim=48", "model.peer.topk=4"], 1,
     r"'model\.peer\.topk_kernel' = triton needs two sub-key sets"),
    ("", ["model.peer.topk_kernel=cuda"], 1, r"'model\.peer\.topk_kernel' must be one of"),
    ("", ["parallel.sequence_parallel=true"], 1,
     r"'parallel\.sequence_parallel' needs parallel\.tensor >= 2"),
    ("", ["parallel.sequence_parallel=true", "parallel.tensor=2",
          "model.peer.query_norm=batchnorm"], 2,
     r"'parallel\.sequence_parallel' does not work with model\.peer\.query_norm=batchnorm"),
    ("", ["training.fused_cross_entropy=true", "training.precision=fp32"], 1,
     r"'training\.fused_cross_entropy' needs bf16"),
    ("", ["data.split=90,10"], 1, r"'data\.split'"),
    ("", ["logging.profile_steps=[3,2]"], 1, r"'logging\.profile_steps' must be \[first, last\]"),
    ("", ["training.train_iters=5", "training.warmup_iters=1", "logging.profile_steps=[1,6]"], 1,
     r"'logging\.profile_steps'.*train_iters \(5\)"),
])
def test_config_errors(tmp_path, text, overrides, world, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(p), overrides, world_size=world)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(str(p))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))))
def test_shipped_configs_validate(path):
    # validated for the smallest world its layout needs (data parallel = expert parallel)
    p = load_config(path, validate=False).parallel
    load_config(path, world_size=p.tensor * p.pipeline * p.expert)
