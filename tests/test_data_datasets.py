"""DataConfig -> Megatron GPTDataset / BlendedDataset, and the resumable BatchIterator."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import write_indexed
from megapeer.config import DataConfig
from megapeer.data import BatchIterator, build_datasets
from megapeer.data.demo import stdlib_documents
from megapeer.data.preprocess import preprocess
from megapeer.data.train_tokenizer import train_tokenizer

TOK = SimpleNamespace(vocab_size=512, eod=0, pad=None)



@pytest.fixture(scope="module")
def ranges(tmp_path_factory):
    """Dataset A uses token ids 10..99, B 200..299: every sample shows where it came from."""
    d = tmp_path_factory.mktemp("ranges")
    rng = np.random.default_rng(0)
    a = write_indexed(str(d / "a"), [list(rng.integers(10, 100, 50)) + [0] for _ in range(40)])
    b = write_indexed(str(d / "b"), [list(rng.integers(200, 300, 50)) + [0] for _ in range(60)])
    return d, a, b


def _source(sample_tokens):
    t = sample_tokens[sample_tokens != 0]
    if ((t >= 10) & (t < 100)).all():
        return "a"
    assert ((t >= 200) & (t < 300)).all(), "a sample mixes datasets"
    return "b"


def _fraction_a(ds, n, mbs=8):
    it = BatchIterator(ds, mbs)
    src = [_source(row) for _ in range(n // mbs) for row in next(it)["tokens"]]
    return src.count("a") / len(src)


def test_weighted_blend_proportions(ranges):
    d, a, b = ranges
    cfg = DataConfig(blend=["30", a, "70", b], split="100,0,0", cache_dir=str(d / "c1"))
    train, valid, test = build_datasets(cfg, 16, (2000, 0, 0), TOK)
    assert valid is None and test is None
    assert len(train) >= 2000
    assert abs(_fraction_a(train, 2000) - 0.3) < 0.01
    assert [f for f in os.listdir(d / "c1") if "BlendedDataset-train" in f]  # index cache


def test_per_split_blends_and_size_weights(ranges):
    d, a, b = ranges
    cfg = DataConfig(train_blend=["1", a, "3", b], valid_blend=[a], cache_dir=str(d / "c2"))
    train, valid, test = build_datasets(cfg, 16, (800, 40, 40), TOK)
    assert test is None
    assert abs(_fraction_a(train, 800) - 0.25) < 0.01
    assert _fraction_a(valid, 40) == 1.0
    # No weights: datasets contribute in proportion to their sizes (one epoch each).
    cfg = DataConfig(blend=[a, b], split="100,0,0", cache_dir=str(d / "c3"))
    train, _, _ = build_datasets(cfg, 16, (100, 0, 0), TOK)
    assert len(train) == 100
    na, nb = (40 * 51 - 1) // 16, (60 * 51 - 1) // 16
    assert abs(_fraction_a(train, 96) - na / (na + nb)) < 0.05


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small slice of the stdlib corpus, preprocessed with our tool."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [text for _, text in stdlib_documents(250_000)]
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    model = train_tokenizer([str(src)], str(d / "tok"), vocab_size=600, quiet=True)
    preprocess([str(src)], str(d / "std"), model, append_eod=True, progress=False)
    sp = spm.SentencePieceProcessor(model_file=model)
    expected = [sp.encode(t) + [sp.eos_id()] for t in docs]
    return d, str(d / "std_text_document"), model, expected


def test_gpt_dataset_reads_our_files(corpus):
    from megapeer.data import load_tokenizer

    d, prefix, model, expected = corpus
    tok = load_tokenizer(model)
    cfg = DataConfig(blend=[prefix], split="80,20,0", seed=7)
    train, valid, test = build_datasets(cfg, 64, (300, 30, 0), tok)
    assert test is None
    assert os.path.isdir(os.path.join(d, "cache"))   # default cache: next to the data
    n = len(expected)
    n_train = int(round(0.8 * n))
    for ds, docs in ((train, range(n_train)), (valid, range(n_train, n))):
        assert set(np.asarray(ds.document_index).tolist()) == set(docs)
        # Every sample is a window of this split's documents, in the dataset's epoch order.
        stream = np.concatenate([expected[i] for i in ds.document_index]).astype(np.uint16)
        stream = stream.tobytes()
        for i in range(0, len(ds), 7):
            s = ds[i]
            window = torch.cat([s["tokens"], s["labels"][-1:]]).numpy().astype(np.uint16)
            assert window.tobytes() in stream, i
            assert (s["loss_mask"] == 1).all()
            assert torch.equal(s["position_ids"], torch.arange(64))


def test_batch_iterator_order_ranks_resume_and_wrap(corpus):
    from megapeer.data import load_tokenizer

    d, prefix, model, _ = corpus
    cfg = DataConfig(blend=[prefix], split="100,0,0", seed=3)
    ds, _, _ = build_datasets(cfg, 32, (60, 0, 0), load_tokenizer(model))
    n = len(ds)

    def ref(idx):
        return torch.stack([ds[i % n]["tokens"] for i in idx])

    it = BatchIterator(ds, 3)
    first = [next(it) for _ in range(4)]
    assert it.consumed_samples == 12
    for k, b in enumerate(first):
        assert torch.equal(b["tokens"], ref(range(3 * k, 3 * k + 3)))
        assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
        assert b["loss_mask"].dtype == torch.float32
        assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])
    # Resuming from the saved count continues with the next unseen samples.
    resumed = BatchIterator(ds, 3, consumed_samples=it.state_dict()["consumed_samples"])
    for _ in range(3):
        assert torch.equal(next(resumed)["tokens"], next(it)["tokens"])
    # Two data-parallel ranks: each takes its contiguous slice of every 2 * 2 chunk.
    r0, r1 = BatchIterator(ds, 2, 8, 0, 2), BatchIterator(ds, 2, 8, 1, 2)
    for k in range(3):
        c = 8 + 4 * k
        assert torch.equal(next(r0)["tokens"], ref(range(c, c + 2)))
        assert torch.equal(next(r1)["tokens"], ref(range(c + 2, c + 4)))
    assert r0.consumed_samples == r1.consumed_samples == 20
    # Past the end the stream wraps around to the start (the next epoch).
    w = BatchIterator(ds, 4, consumed_samples=n - 2)
    assert torch.equal(next(w)["tokens"], ref([n - 2, n - 1, 0, 1]))
    # Worker processes read ahead but yield the same batches.
    a, b = BatchIterator(ds, 3, 6, num_workers=1), BatchIterator(ds, 3, 6)
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in y)
    with pytest.raises(ValueError, match="dp_rank"):
        BatchIterator(ds, 2, 0, dp_rank=2, dp_size=2)


def test_config_errors_name_the_problem(ranges, tmp_path):
    d, a, b = ranges
    with pytest.raises(ValueError, match="no indexed dataset at prefix '.*nope'"):
        build_datasets(DataConfig(blend=["1", a, "1", str(d / "nope")]), 16, (10, 0, 0), TOK)
    with pytest.raises(ValueError, match="both empty"):
        build_datasets(DataConfig(), 16, (10, 0, 0), TOK)
    with pytest.raises(ValueError, match="data.train_blend: weights must be positive"):
        build_datasets(DataConfig(train_blend=["0", a, "1", b]), 16, (10, 0, 0), TOK)


def test_split_without_documents_is_an_error_not_a_hang(ranges):
    """40 documents at 98/1/1: the test split would be empty (Megatron loops forever)."""
    from megapeer.config import DataConfig
    from megapeer.data import build_datasets
    d, a, b = ranges
    cfg = DataConfig(blend=[a], split="98,1,1")
    with pytest.raises(ValueError, match=r"data\.split='98,1,1' gives the test split no "
                                         r"documents of .*a \(40 documents in all\)"):
        build_datasets(cfg, 16, (10, 10, 0), TOK)
    train, valid, test = build_datasets(DataConfig(blend=[a], split="90,10,0"), 16,
                                        (10, 10, 0), TOK)
    assert len(train) >= 10 and len(valid) >= 10 and test is None
