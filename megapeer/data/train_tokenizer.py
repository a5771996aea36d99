"""Train a sentencepiece tokenizer from the same inputs as preprocessing.

Documents are fed to sentencepiece line by line (it learns within lines); whitespace is kept
as is (identity normalisation, no collapsing of spaces), so code indentation survives and
decode(encode(text)) == text. Newlines and unseen characters become byte tokens
(byte fallback). Bad records are skipped and counted.
"""
import argparse
import io
import os
import sys

from .readers import expand_inputs, iter_batches, parse_record


def _lines(paths, keys, text_docs, max_bytes, stats):
    for p in paths:
        for b in iter_batches(p, keys, text_docs):
            for payload in b.payloads:
                doc, reason = parse_record(b.fmt, payload, keys)
                if reason:
                    stats["skipped"] += 1
                    continue
                stats["documents"] += 1
                for k in keys:
                    stats["bytes"] += len(doc[k])
                    for line in doc[k].split("\n"):
                        if line.strip():
                            yield line
                if max_bytes and stats["bytes"] >= max_bytes:
                    return


def _write_atomic(path, data, mode="wb"):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        f.write(data)
    os.replace(tmp, path)


def train_tokenizer(inputs, output_prefix, vocab_size=32000, model_type="bpe",
                    json_keys=("text",), text_docs="file", max_mb=None, byte_fallback=True,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=0.9995,
                    input_sentence_size=5_000_000, threads=None, quiet=False):
    """Train on `inputs` (files or globs) and write {output_prefix}.model and .vocab.
    Ids set to -1 are disabled (pad_id=-1: no pad token). Returns the .model path."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    keys = list(json_keys)
    paths = expand_inputs(inputs)
    stats = {"documents": 0, "skipped": 0, "bytes": 0}
    max_bytes = int(max_mb * 1e6) if max_mb else None
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(paths, keys, text_docs, max_bytes, stats), model_writer=buf,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
            unk_id=unk_id, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
            character_coverage=character_coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=16384,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=threads or os.cpu_count() or 1, minloglevel=1 if not quiet else 2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training on {', '.join(paths)} failed: {e}") from None
    if stats["documents"] == 0:
        raise ValueError(f"no usable documents in {', '.join(paths)}")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    model = output_prefix + ".model"
    _write_atomic(model, buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size()))
    _write_atomic(output_prefix + ".vocab", vocab.encode("utf-8"))
    if not quiet:
        print(f"trained {model_type} vocab {sp.get_piece_size()} on {stats['documents']:,} "
              f"documents ({stats['bytes'] / 1e6:.1f} M chars), {stats['skipped']:,} bad "
              f"records skipped -> {model}", file=sys.stderr)
    return model


def build_parser():
    p = argparse.ArgumentParser(description="Train a sentencepiece tokenizer (BPE or unigram) "
                                "on JSONL / text / Parquet inputs.")
    p.add_argument("--input", nargs="+", required=True, help="files or globs, as preprocess_data")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--unk-id", type=int, default=0)
    p.add_argument("--bos-id", type=int, default=1, help="-1 disables")
    p.add_argument("--eos-id", type=int, default=2, help="EOS, used as end-of-document (EOD)")
    p.add_argument("--pad-id", type=int, default=3, help="-1 disables")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-mb", type=float, default=None, help="read at most this much text")
    p.add_argument("--input-sentence-size", type=int, default=5_000_000,
                   help="lines sampled for training (bounds memory)")
    p.add_argument("--text-docs", choices=["file", "blank-line"], default="file")
    p.add_argument("--workers", type=int, default=None, help="training threads")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        train_tokenizer(a.input, a.output_prefix, a.vocab_size, a.model_type, a.json_keys,
                        a.text_docs, a.max_mb, not a.no_byte_fallback, a.unk_id, a.bos_id,
                        a.eos_id, a.pad_id, a.character_coverage, a.input_sentence_size,
                        a.workers, a.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
