"""Bad input to export / import: each error names the file, tensor or setting at fault."""
import json
import shutil

import pytest
import yaml
from workers.hf_fixtures import export_tiny, train_test_tokenizer
from workers.hf_fixtures import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def base(tmp_path_factory, world1):
    d = tmp_path_factory.mktemp("hf_bad")
    export_tiny(d, seed=3, max_shard_size="100KB")
    return d


def _copy(base, name, new):
    dst = base / new
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base / name, dst)
    return dst


def _error(fn, *args, **kw):
    from megapeer.convert import ConversionError
    with pytest.raises(ConversionError) as e:
        fn(*args, **kw)
    return str(e.value)


def _edit_yaml(path, section, key, value):
    data = yaml.safe_load(path.read_text())
    data[section][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_missing_checkpoint_shard(base):
    from megapeer.convert import export_checkpoint
    ck = _copy(base, "ckpt", "ckpt_noshard")
    shard = sorted((ck / "iter_0000010").glob("*.distcp"))[-1]
    shard.unlink()
    msg = _error(export_checkpoint, str(ck), str(base / "out1"))
    assert shard.name in msg and "missing" in msg


def test_missing_hf_shard(base):
    from megapeer.convert import import_hf
    hf = _copy(base, "hf", "hf_noshard")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _error(import_hf, str(hf), str(base / "out2"))
    assert shard.name in msg and "model.safetensors.index.json" in msg


def test_checkpoint_config_not_matching_tensors(base):
    from megapeer.convert import export_checkpoint
    ck = _copy(base, "ckpt", "ckpt_badcfg")
    conf = ck / "iter_0000010" / "megapeer.yaml"
    _edit_yaml(conf, "model", "ffn_hidden_size", 96)
    msg = _error(export_checkpoint, str(ck), str(base / "out3"))
    assert "decoder.layers.0.mlp.linear_fc2.weight" in msg and "(64, 128)" in msg
    assert "(64, 96)" in msg and "megapeer.yaml" in msg
    _edit_yaml(conf, "model", "ffn_hidden_size", 128)
    _edit_yaml(conf, "model", "layer_pattern", "D")
    msg = _error(export_checkpoint, str(ck), str(base / "out3"))
    assert "decoder.layers.1.mlp.linear_fc1.weight" in msg and "'D'" in msg


def test_hf_config_not_matching_tensors(base):
    from megapeer.convert import import_hf
    hf = _copy(base, "hf", "hf_badcfg")
    conf = json.loads((hf / "config.json").read_text())
    conf["kv_lora_rank"] = 24
    (hf / "config.json").write_text(json.dumps(conf))
    msg = _error(import_hf, str(hf), str(base / "out4"))
    assert "kv_a_proj_with_mqa.weight" in msg and "(40, 64)" in msg and "(32, 64)" in msg
    conf["kv_lora_rank"], conf["layer_pattern"] = 32, "DDDD"
    (hf / "config.json").write_text(json.dumps(conf))
    msg = _error(import_hf, str(hf), str(base / "out4"))
    assert "model.layers.1.mlp.gate_proj.weight" in msg
    conf["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(conf))
    assert "'llama'" in _error(import_hf, str(hf), str(base / "out4"))


def test_unknown_tokenizer(base):
    from megapeer.convert import export_checkpoint
    ck = _copy(base, "ckpt", "ckpt_badtok")
    conf = ck / "iter_0000010" / "megapeer.yaml"
    _edit_yaml(conf, "data", "tokenizer",
               {"type": "sentencepiece", "path": str(base / "gone.model")})
    msg = _error(export_checkpoint, str(ck), str(base / "out5"))
    assert "gone.model" in msg and "data.tokenizer" in msg
    junk = base / "junk.model"
    junk.write_text("not a tokenizer")
    msg = _error(export_checkpoint, str(ck), str(base / "out5"), tokenizer=str(junk))
    assert "junk.model" in msg and "sentencepiece" in msg
    (base / "big").mkdir(exist_ok=True)
    big = train_test_tokenizer(str(base / "big"), vocab_size=700)
    msg = _error(export_checkpoint, str(ck), str(base / "out5"), tokenizer=big)
    assert "700 tokens" in msg and "vocab_size is 520" in msg


def test_native_format_refused_for_peer(base):
    from megapeer.convert import export_checkpoint
    msg = _error(export_checkpoint, str(base / "ckpt"), str(base / "out6"), fmt="deepseek_v3")
    assert "PEER" in msg and "[1, 3]" in msg


def test_no_checkpoint_and_existing_output(base):
    from megapeer.convert import export_checkpoint
    (base / "empty").mkdir(exist_ok=True)
    assert "empty" in _error(export_checkpoint, str(base / "empty"), str(base / "out7"))
    assert "--overwrite" in _error(export_checkpoint, str(base / "ckpt"), str(base / "hf"))


def test_cli_reports_errors(base, capsys):
    from megapeer.convert.cli import export_main, import_main
    assert export_main(["--checkpoint", str(base / "nowhere"), "--output",
                        str(base / "out8")]) == 1
    assert "convert_to_hf: error:" in capsys.readouterr().err
    assert import_main(["--hf", str(base / "ckpt"), "--output", str(base / "out8")]) == 1
    assert "no config.json" in capsys.readouterr().err
