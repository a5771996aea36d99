"""Export from checkpoints saved under TP=2, EP=2 and PP=2 x VPP=2; import back to a
checkpoint that loads under TP=2 and EP=2; megapeer -> HF -> megapeer -> HF keeps every
tensor.

One 2-process torchrun (tests/workers/hf_layouts.py) saves the layouts and loads the
imported checkpoint under them. The exported model (transformers, trust_remote_code, fp32,
CPU) must equal megapeer's own forward of the same checkpoint (resharded to one process)
to 1e-5, and the forward computed in the saving layout (TP, EP) to 1e-4 (reduction order).
"""
import json

import pytest
import torch
from conftest import torchrun
from workers.hf_fixtures import (build, megatron_logits, sample_tokens, save_checkpoint,
                                 tiny_config, train_test_tokenizer)
from workers.hf_fixtures import one_thread  # noqa: F401 (autouse fixture)

VOCAB = 520


@pytest.fixture(scope="module")
def setup(tmp_path_factory, world1):
    from megapeer.convert import export_checkpoint, import_hf
    d = tmp_path_factory.mktemp("hf_layouts")
    tok = train_test_tokenizer(str(d))
    cfg = tiny_config(tok)
    chunks = build(cfg, seed=7)
    save_checkpoint(chunks, cfg, str(d / "ckpt_single"))
    ref = megatron_logits(chunks, sample_tokens(VOCAB), VOCAB)
    export_checkpoint(str(d / "ckpt_single"), str(d / "hf_single"))
    imported = import_hf(str(d / "hf_single"), str(d / "ckpt_imported"))
    torchrun("hf_layouts.py", [str(d), tok, imported], 2)
    return {"dir": d, "ref": ref, "layouts": torch.load(d / "layouts.pt")}


def _hf_logits(folder):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True,
                                                 local_files_only=True)
    assert type(model).__name__ == "MegapeerForCausalLM"
    with torch.no_grad():
        return model(sample_tokens(VOCAB)).logits


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2", "ep2", "vpp2"])
def test_export_matches_megapeer_forward(setup, layout):
    from megapeer.convert import export_checkpoint
    from megapeer.training.checkpointing import load_model_single_process
    d = setup["dir"]
    ckpt, out = d / f"ckpt_{layout}", d / f"hf_{layout}"
    summary = export_checkpoint(str(ckpt), str(out), fmt="auto")
    assert summary["format"] == "megapeer"      # PEER layers: bundled modeling code
    conf = json.loads((out / "config.json").read_text())
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_megapeer.MegapeerForCausalLM"
    for name in ("modeling_megapeer.py", "configuration_megapeer.py", "tokenizer.json",
                 "tokenizer.model", "generation_config.json"):
        assert (out / name).is_file(), name
    assert "megatron" not in (out / "modeling_megapeer.py").read_text()
    got = _hf_logits(out)
    _, model = load_model_single_process(str(ckpt))
    single = megatron_logits([model], sample_tokens(VOCAB), VOCAB)
    torch.testing.assert_close(got, single, rtol=0, atol=1e-5)
    if layout != "vpp2":                  # the worker runs no pipeline schedule
        torch.testing.assert_close(got, setup["layouts"][layout], rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_imported_checkpoint_loads_under_layout(setup, layout):
    torch.testing.assert_close(setup["layouts"][f"imported_{layout}"], setup["ref"],
                               rtol=0, atol=1e-4)


def test_roundtrip_keeps_every_tensor(setup):
    from safetensors.torch import load_file

    from megapeer.convert import export_checkpoint, read_checkpoint
    d = setup["dir"]
    export_checkpoint(str(d / "ckpt_imported"), str(d / "hf_again"))
    a = load_file(str(d / "hf_single" / "model.safetensors"))
    b = load_file(str(d / "hf_again" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((d / "hf_single" / "config.json").read_text()) == \
        json.loads((d / "hf_again" / "config.json").read_text())
    # the imported checkpoint holds the original weights (padded vocab rows aside)
    _, _, orig = read_checkpoint(str(d / "ckpt_single"))
    _, _, back = read_checkpoint(str(d / "ckpt_imported"))
    for k, t in orig.items():
        if k.startswith(("embedding", "output_layer")):
            t, b = t[:VOCAB], back[k][:VOCAB]
        else:
            b = back[k]
        assert torch.equal(t, b), k
