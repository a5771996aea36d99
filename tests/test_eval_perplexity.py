"""Sliding-window perplexity against a direct per-token computation; JSONL and indexed
inputs, checkpoint and export give the same numbers; CLI output and bad input."""
import json
import math

import numpy as np
import pytest
import torch
from workers.hf_fixtures import TEXTS, export_tiny
from workers.hf_fixtures import one_thread  # noqa: F401 (autouse fixture)

LONG = ("The quick brown fox jumps over the lazy dog, then naps by the river. " * 3 +
        "def add(a, b):\n    return a + b\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory, world1):
    from megapeer.convert import load_model
    d = tmp_path_factory.mktemp("eval_ppl")
    export_tiny(d, seed=11)
    model, tok = load_model(str(d / "hf"))
    jsonl = d / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS + [LONG]))
    return {"dir": d, "model": model, "tok": tok, "jsonl": jsonl}


@torch.no_grad()
def direct_nll(model, tokens, prefix, max_length):
    """Each token scored from its own forward over the (up to) max_length - 1 tokens
    before it, the document separator first."""
    seq = [prefix] + tokens
    total = 0.0
    for p in range(1, len(seq)):
        inp = torch.tensor([seq[max(0, p - max_length):p]])
        logp = torch.log_softmax(model(inp).logits[0, -1].double(), -1)
        total -= float(logp[seq[p]])
    return total


def test_sliding_window_matches_direct(env):
    from megapeer.eval.perplexity import perplexity
    model, tok = env["model"], env["tok"]
    doc = tok.encode(LONG)
    assert len(doc) > 40
    # stride 1: every prediction sees a full window, as in direct_nll
    res = perplexity(model, [doc], tok.eod, max_length=12, stride=1, batch_size=16)
    assert res["tokens"] == len(doc)
    assert res["nll"] == pytest.approx(direct_nll(model, doc, tok.eod, 12), rel=1e-6)
    # a window covering the whole document: one forward of [eod] + doc
    full = perplexity(model, [doc], tok.eod, max_length=len(doc))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.eod] + doc[:-1]])).logits[0].double(), -1)
    assert full["nll"] == pytest.approx(-float(logp.gather(1, torch.tensor(doc)[:, None]).sum()),
                                        rel=1e-6)
    # longer context per prediction never changes the token count
    for stride in (5, 12):
        r = perplexity(model, [doc], tok.eod, max_length=12, stride=stride)
        assert r["tokens"] == len(doc) and math.isfinite(r["nll"])


def test_cli_jsonl_indexed_checkpoint_and_export_agree(env, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megapeer.eval.cli import main
    d, tok = env["dir"], env["tok"]
    prefix = str(d / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for t in TEXTS + [LONG]:
        ids = tok.encode(t)
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
    out = {}
    for name in ("ckpt", "hf"):
        main(["--model", str(d / name), "--jsonl", str(env["jsonl"]), "--indexed", prefix,
              "--max-length", "16", "--stride", "8", "--output", str(d / f"{name}.json")])
        out[name] = json.loads((d / f"{name}.json").read_text())
    printed = capsys.readouterr().out
    assert "perplexity" in printed and str(env["jsonl"]) in printed
    a, b = out["ckpt"]["perplexity"], out["hf"]["perplexity"]
    j, i = a[str(env["jsonl"])], a[prefix]
    assert j["documents"] == i["documents"] == len(TEXTS) + 1
    assert j["tokens"] == i["tokens"] and j["nll"] == pytest.approx(i["nll"], rel=1e-9)
    assert j["nll"] == pytest.approx(b[str(env["jsonl"])]["nll"], rel=1e-6)
    assert j["perplexity"] == pytest.approx(math.exp(j["nll"] / j["tokens"]))
    nbytes = sum(len(t.encode("utf-8")) for t in TEXTS + [LONG])
    assert j["bits_per_byte"] == pytest.approx(j["nll"] / math.log(2) / nbytes)


def test_bad_input(env, tmp_path):
    from megapeer.eval.cli import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: invalid JSON"):
        main(["--model", str(env["dir"] / "hf"), "--jsonl", str(bad)])
    with pytest.raises(SystemExit, match="nope.jsonl: JSONL file not found"):
        main(["--model", str(env["dir"] / "hf"), "--jsonl", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SystemExit, match="missing.bin: indexed dataset file not found"):
        main(["--model", str(env["dir"] / "hf"), "--indexed", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no such model folder or checkpoint"):
        main(["--model", str(tmp_path / "none"), "--jsonl", str(bad)])
