"""Tokenizer training (sentencepiece BPE / unigram) and loading (sentencepiece model or Hugging
Face folder), checked against the libraries' own encoders."""
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from megapeer.config import TokenizerConfig
from megapeer.data import build_tokenizer, load_tokenizer
from megapeer.data.demo import stdlib_documents
from megapeer.data.preprocess import preprocess
from megapeer.data.train_tokenizer import main as train_main
from megapeer.data.train_tokenizer import train_tokenizer

UNSEEN = "数据 ✓ 🙂 ünïcödé"  # characters absent from the training text


@pytest.fixture(scope="module")
def docs():
    out = [text for _, text in stdlib_documents(120_000)]
    return out


@pytest.fixture(scope="module")
def jsonl(docs, tmp_path_factory):
    p = tmp_path_factory.mktemp("src") / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return p


def test_bpe_cli_ids_round_trip_and_byte_fallback(docs, jsonl, tmp_path):
    assert train_main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "bpe"),
                       "--vocab-size", "700", "--pad-id", "3", "--quiet"]) == 0
    path = str(tmp_path / "bpe.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == 700
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    vocab = (tmp_path / "bpe.vocab").read_text(encoding="utf-8").splitlines()
    assert [v.split("\t")[0] for v in vocab] == [sp.id_to_piece(i) for i in range(700)]

    tok = build_tokenizer(TokenizerConfig(type="sentencepiece", path=path))
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (700, 1, 2, 3)
    for text in docs + [UNSEEN]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)                 # no BOS/EOS added
        assert tok.decode(ids) == text                # whitespace and newlines survive
    assert tok.encode_batch(docs[:3]) == [sp.encode(t) for t in docs[:3]]
    pieces = sp.encode(UNSEEN, out_type=str)
    assert "<0xE6>" in pieces and sp.unk_id() not in sp.encode(UNSEEN)  # bytes, not <unk>
    # Code tokenizes to more than single characters: BPE merges were learned.
    assert len(sp.encode(docs[0])) < len(docs[0]) / 1.5


def test_unigram_and_disabled_pad(docs, jsonl, tmp_path):
    path = train_tokenizer([str(jsonl)], str(tmp_path / "uni"), vocab_size=600,
                           model_type="unigram", pad_id=-1, bos_id=-1, eos_id=1, quiet=True)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == 600
    tok = load_tokenizer(path)
    assert (tok.bos, tok.eod, tok.pad) == (None, 1, None)
    for text in docs[:5] + [UNSEEN]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text


def _hf_folder(docs, folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(docs, trainer)
    os.makedirs(folder)
    tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "pad_token": "<pad>"}, f)
    return tk


def test_hugging_face_folder_tokenizes_and_preprocesses(docs, jsonl, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    folder = str(tmp_path / "hf")
    ref = _hf_folder(docs, folder)
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=folder))
    assert (tok.bos, tok.eod, tok.pad) == (0, 1, 2)
    assert tok.vocab_size == ref.get_vocab_size()
    for text in docs[:5] + [UNSEEN]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    # The same preprocessing path as for sentencepiece, with two workers.
    preprocess([str(jsonl)], str(tmp_path / "hf_out"), folder,
               tokenizer_type="HuggingFaceTokenizer", append_eod=True, workers=2,
               progress=False, batch_bytes=20_000)
    ds = IndexedDataset(str(tmp_path / "hf_out_text_document"))
    assert ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == [
        ref.encode(t, add_special_tokens=False).ids + [1] for t in docs]
    # save() copies the tokenizer files; the copy encodes the same.
    tok.save(str(tmp_path / "copy"))
    assert load_tokenizer(str(tmp_path / "copy")).encode(docs[0]) == tok.encode(docs[0])


def test_sentencepiece_save_and_errors_name_the_path(jsonl, tmp_path):
    path = train_tokenizer([str(jsonl)], str(tmp_path / "t"), vocab_size=500, quiet=True)
    tok = load_tokenizer(path)
    tok.save(str(tmp_path / "export"))
    again = load_tokenizer(str(tmp_path / "export" / "tokenizer.model"))
    assert again.encode("import os\n") == tok.encode("import os\n")

    missing = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="missing.model: tokenizer not found"):
        build_tokenizer(TokenizerConfig(type="sentencepiece", path=missing))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        load_tokenizer(str(junk))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir: not a Hugging Face tokenizer folder"):
        load_tokenizer(str(empty), "huggingface")
    with pytest.raises(ValueError, match="empty_dir: sentencepiece model not found"):
        load_tokenizer(str(empty), "sentencepiece")
    with pytest.raises(ValueError, match="unknown tokenizer type 'GPT2BPETokenizer'"):
        load_tokenizer(path, "GPT2BPETokenizer")
    with pytest.raises(ValueError, match="failed"):  # vocabulary larger than the corpus allows
        train_tokenizer([str(jsonl)], str(tmp_path / "big"), vocab_size=200_000, quiet=True)
