"""Preprocessing round trips: the tokens in the .bin equal sentencepiece's own output on the
same documents (EOD where asked), for every input format, read back by megatron.core."""
import gzip
import json
import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from megapeer.data.demo import stdlib_documents
from megapeer.data.preprocess import main, preprocess
from megapeer.data.train_tokenizer import train_tokenizer


def _docs():
    docs = [text for _, text in stdlib_documents(150_000)]
    docs += ["naïve café — 数据 ✓ 🙂", "  leading spaces\n\ttabs\n", "x"]
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = _docs()
    jsonl = d / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n"
                             for i, t in enumerate(docs)))
    model = train_tokenizer([str(jsonl)], str(d / "tok"), vocab_size=800, quiet=True)
    return d, docs, jsonl, model


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], ds


def _expected(model, docs, eod=True):
    sp = spm.SentencePieceProcessor(model_file=model)
    return [sp.encode(t) + ([sp.eos_id()] if eod else []) for t in docs]


def test_jsonl_round_trip_with_eod(corpus, tmp_path):
    d, docs, jsonl, model = corpus
    s = preprocess([str(jsonl)], str(tmp_path / "out"), model, append_eod=True, progress=False)
    got, ds = _read(str(tmp_path / "out_text_document"))
    assert got == _expected(model, docs)
    assert ds.index.dtype == np.uint16                      # vocab 800 < 65500, as Megatron-LM
    assert list(ds.document_indices) == list(range(len(docs) + 1))  # one sequence per document
    assert s.documents == len(docs) and s.skipped == 0
    assert s.tokens["text"] == sum(map(len, got))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_no_eod_two_keys_and_two_workers_identical(corpus, tmp_path):
    d, docs, jsonl, model = corpus
    keys = ["text", "id"]
    preprocess([str(jsonl)], str(tmp_path / "w1"), model, json_keys=keys, progress=False,
               batch_bytes=4096)
    preprocess([str(jsonl)], str(tmp_path / "w2"), model, json_keys=keys, workers=2,
               progress=False, batch_bytes=4096)
    assert _read(str(tmp_path / "w1_text_document"))[0] == _expected(model, docs, eod=False)
    assert _read(str(tmp_path / "w1_id_document"))[0] == _expected(
        model, [str(i) for i in range(len(docs))], eod=False)
    for key in keys:
        for ext in (".bin", ".idx"):
            a = (tmp_path / f"w1_{key}_document{ext}").read_bytes()
            b = (tmp_path / f"w2_{key}_document{ext}").read_bytes()
            assert a == b, (key, ext)


def test_gzip_glob_text_and_parquet_inputs(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, docs, jsonl, model = corpus
    half = len(docs) // 2
    for name, part in (("a.jsonl.gz", docs[:half]), ("b.jsonl.gz", docs[half:])):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    preprocess([str(tmp_path / "*.jsonl.gz")], str(tmp_path / "gz"), model, append_eod=True,
               progress=False)
    assert _read(str(tmp_path / "gz_text_document"))[0] == _expected(model, docs)

    # Plain text, one document per file.
    for i, t in enumerate(docs[:5]):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    preprocess([str(tmp_path / "doc*.txt")], str(tmp_path / "txt"), model, progress=False)
    assert _read(str(tmp_path / "txt_text_document"))[0] == _expected(model, docs[:5], eod=False)

    # Plain text, one document per blank-line-separated block.
    blocks = ["first block\nstill first", "second", "third\n  indented"]
    (tmp_path / "blocks.md").write_text("\n\n".join(blocks) + "\n\n\n", encoding="utf-8")
    preprocess([str(tmp_path / "blocks.md")], str(tmp_path / "blk"), model, text_docs="blank-line",
               progress=False)
    assert _read(str(tmp_path / "blk_text_document"))[0] == _expected(model, blocks, eod=False)

    # Parquet, several row groups.
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}),
                   tmp_path / "docs.parquet", row_group_size=7)
    preprocess([str(tmp_path / "docs.parquet")], str(tmp_path / "pq"), model, append_eod=True,
               progress=False)
    assert _read(str(tmp_path / "pq_text_document"))[0] == _expected(model, docs)


def test_cli_megatron_flags_and_summary(corpus, tmp_path, capsys):
    d, docs, jsonl, model = corpus
    rc = main(["--input", str(jsonl), "--json-keys", "text", "--output-prefix",
               str(tmp_path / "cli"), "--workers", "1", "--append-eod", "--tokenizer-type",
               "GPTSentencePieceTokenizer", "--tokenizer-model", model, "--log-interval", "5"])
    assert rc == 0
    err = capsys.readouterr().err
    ntok = sum(map(len, _expected(model, docs)))
    assert f"done: {len(docs):,} documents, {ntok:,} tokens, 0 skipped" in err
    assert "MB/s" in err and "tokens/s" in err and "docs/s" in err
    assert re.search(r"processed [\d,]+ documents \(", err)  # progress lines (no terminal)
    assert _read(str(tmp_path / "cli_text_document"))[0] == _expected(model, docs)
    # Missing tokenizer: an error naming the path, no output.
    rc = main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "bad"),
               "--tokenizer-model", str(tmp_path / "nope.model")])
    assert rc == 1 and "nope.model" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))
