"""Corpus -> Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

The main process reads raw records (readers.py) and writes; worker processes decode,
parse and tokenize whole batches. At most a few batches are in flight, so memory stays
bounded whatever the corpus size; results are written in input order, so the output does
not depend on the number of workers. Outputs are written under temporary names and renamed
when complete (.bin first, .idx last): an interrupted run leaves no valid-looking pair.
"""
import argparse
import collections
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from array import array
from dataclasses import dataclass, field

import numpy as np

from .readers import InputError, expand_inputs, input_format, iter_batches, parse_record
from .tokenizer import TOKENIZER_TYPES, load_tokenizer

MAX_EXAMPLES = 5  # bad records shown with --skip-bad


class PreprocessError(ValueError):
    pass


@dataclass
class Encoded:
    """One tokenized batch: per key a flat token array and the per-document lengths."""
    tokens: dict
    lengths: dict
    bad: list        # (line, reason)
    docs: int
    nbytes: int


@dataclass
class Summary:
    documents: int = 0
    tokens: dict = field(default_factory=dict)   # key -> tokens written (EOD included)
    skipped: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)
    examples: list = field(default_factory=list)  # first 'file:line: reason' skipped
    nbytes: int = 0
    seconds: float = 0.0
    outputs: list = field(default_factory=list)   # dataset prefixes

    def format(self):
        t = max(self.seconds, 1e-9)
        ntok = sum(self.tokens.values())
        lines = [f"done: {self.documents:,} documents, {ntok:,} tokens, {self.skipped:,} skipped, "
                 f"{self.nbytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                 f"({self.documents / t:,.0f} docs/s, {self.nbytes / t / 1e6:.2f} MB/s, "
                 f"{ntok / t:,.0f} tokens/s)"]
        for reason, n in sorted(self.reasons.items()):
            lines.append(f"  skipped {n:,}: {reason}")
        lines += [f"  e.g. {e}" for e in self.examples]
        lines += [f"  wrote {p}.bin/.idx" for p in self.outputs]
        return "\n".join(lines)


def _kind(reason):
    return reason.split(" (")[0]


def encode_batch(tok, batch, keys, append_eod, dtype):
    """Parse and tokenize one Batch. A record is dropped (for all keys) if any key is bad."""
    docs, lines, bad = [], [], []
    for line, payload in zip(batch.lines, batch.payloads):
        doc, reason = parse_record(batch.fmt, payload, keys)
        if reason:
            bad.append((line, reason))
        else:
            docs.append(doc)
            lines.append(line)
    ids = {}
    for k in keys:
        texts = [d[k] for d in docs]
        try:
            ids[k] = tok.encode_batch(texts) if texts else []
        except (UnicodeError, TypeError, RuntimeError):  # find the culprit document
            ids[k] = []
            for i, t in enumerate(texts):
                try:
                    ids[k].append(tok.encode(t))
                except (UnicodeError, TypeError, RuntimeError) as e:
                    ids[k].append(None)
                    bad.append((lines[i], f"cannot tokenize ({e})"))
    keep = []
    for i in range(len(docs)):
        if any(ids[k][i] is None for k in keys):
            continue
        empty = [k for k in keys if not ids[k][i]]
        if empty:  # whitespace-only text is caught by parse_record; this is zero tokens
            bad.append((lines[i], f"empty document (key {empty[0]!r})"))
            continue
        keep.append(i)
    tokens, lengths = {}, {}
    for k in keys:
        seqs = [ids[k][i] for i in keep]
        if append_eod:
            for s in seqs:
                s.append(tok.eod)
        lengths[k] = np.array([len(s) for s in seqs], dtype=np.int64)
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if seqs \
            else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
            raise PreprocessError(f"{batch.path}: token id {flat.max()} does not fit "
                                  f"{dtype.__name__}")
        tokens[k] = flat.astype(dtype)
    bad.sort()
    return Encoded(tokens, lengths, bad, len(keep), batch.nbytes)


# Worker-process side: one tokenizer per process, loaded by the initializer.
_WORKER = {}


def _init_worker(tok_path, tok_type, keys, append_eod, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER.update(tok=load_tokenizer(tok_path, tok_type), keys=keys, append_eod=append_eod,
                   dtype=dtype)


def _work(batch):
    w = _WORKER
    return encode_batch(w["tok"], batch, w["keys"], w["append_eod"], w["dtype"])


def _encode_stream(batches, workers, tok, tok_path, tok_type, keys, append_eod, dtype):
    """Yield (batch, Encoded) in input order; at most 4 * workers batches in flight."""
    if workers <= 1:
        for b in batches:
            yield b, encode_batch(tok, b, keys, append_eod, dtype)
        return
    # Fresh processes (no fork of a parent that may hold torch threads), started from a
    # server that has this module preloaded: ~0.1 s for the first pool, ~0.02 s after.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ctx.Pool(workers, _init_worker, (tok_path, tok_type, keys, append_eod, dtype))
    try:
        pending = collections.deque()
        for b in batches:
            pending.append((b, pool.apply_async(_work, (b,))))
            if len(pending) >= 4 * workers:
                b0, r = pending.popleft()
                yield b0, r.get()
        while pending:
            b0, r = pending.popleft()
            yield b0, r.get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _indexed_dataset():
    """megatron.core.datasets.indexed_dataset, without megatron.core's import-time warnings
    about Transformer Engine / Apex (irrelevant here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class _Output:
    """One {prefix}_{key}_document pair, written through Megatron's IndexedDatasetBuilder."""

    def __init__(self, prefix, key, dtype):
        IndexedDatasetBuilder = _indexed_dataset().IndexedDatasetBuilder
        self.prefix = f"{prefix}_{key}_document"
        tag = f".tmp{os.getpid()}"
        self.tmp_bin, self.tmp_idx = self.prefix + ".bin" + tag, self.prefix + ".idx" + tag
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        # Compact index in memory (12 bytes per document instead of ~70 in Python lists).
        self.builder.sequence_lengths = array("i")
        self.builder.document_indices = array("q", [0])

    def add(self, flat, lengths):
        start = 0
        for n in lengths.tolist():
            self.builder.add_document(flat[start:start + n], [n])
            start += n

    def commit(self):
        self.builder.finalize(self.tmp_idx)
        final_bin, final_idx = self.prefix + ".bin", self.prefix + ".idx"
        if os.path.exists(final_idx):  # never pair an old .idx with the new .bin
            os.remove(final_idx)
        os.replace(self.tmp_bin, final_bin)
        os.replace(self.tmp_idx, final_idx)

    def abort(self):
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for p in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(p):
                os.remove(p)


class _Progress:
    """A tqdm bar on a terminal, else a line every log_interval documents."""

    def __init__(self, enabled, log_interval):
        self.t0 = time.time()
        self.docs = self.nbytes = self.tokens = 0
        self.every, self.next = max(1, log_interval), max(1, log_interval)
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            cols = shutil.get_terminal_size().columns  # 80 when the terminal reports 0
            self.bar = tqdm(unit=" docs", file=sys.stderr, ncols=cols)

    def rates(self):
        t = max(time.time() - self.t0, 1e-9)
        return f"{self.nbytes / t / 1e6:.2f} MB/s, {self.tokens / t / 1e3:,.0f}k tokens/s"

    def update(self, docs, nbytes, tokens):
        self.docs += docs
        self.nbytes += nbytes
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(docs)
        elif self.enabled and self.docs >= self.next:
            t = max(time.time() - self.t0, 1e-9)
            print(f"processed {self.docs:,} documents ({self.docs / t:,.0f} docs/s, "
                  f"{self.rates()})", file=sys.stderr, flush=True)
            self.next = (self.docs // self.every + 1) * self.every

    def close(self):
        if self.bar is not None:
            self.bar.close()


def preprocess(inputs, output_prefix, tokenizer, tokenizer_type="auto", json_keys=("text",),
               workers=1, append_eod=False, skip_bad=False, text_docs="file",
               log_interval=1000, progress=True, batch_bytes=1 << 18):
    """Tokenize `inputs` (files or globs) into {output_prefix}_{key}_document.bin/.idx.

    tokenizer: a sentencepiece .model file or a Hugging Face tokenizer folder.
    Bad records stop the run with an error naming file and line, unless skip_bad.
    Returns a Summary."""
    DType = _indexed_dataset().DType
    keys = list(json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise PreprocessError(f"--json-keys must be distinct and non-empty, got {keys}")
    if text_docs not in ("file", "blank-line"):
        raise PreprocessError(f"text_docs must be 'file' or 'blank-line', got {text_docs!r}")
    paths = expand_inputs(inputs)
    for p in paths:
        if input_format(p) == "text" and len(keys) != 1:
            raise PreprocessError(f"{p}: plain-text input has one document per record; "
                                  f"use a single --json-keys (got {keys})")
    tok = load_tokenizer(tokenizer, tokenizer_type)
    if append_eod and tok.eod is None:
        raise PreprocessError(f"{tokenizer}: tokenizer has no EOS token to use as EOD")
    dtype = DType.optimal_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    summary = Summary(tokens={k: 0 for k in keys})
    t0 = time.time()
    outs, stream = [], None
    bar = _Progress(progress, log_interval)
    try:
        outs = [_Output(output_prefix, k, dtype) for k in keys]
        batches = (b for p in paths for b in iter_batches(p, keys, text_docs, batch_bytes))
        stream = _encode_stream(batches, workers, tok, tokenizer, tokenizer_type, keys,
                                append_eod, dtype)
        for batch, enc in stream:
            for line, reason in enc.bad:
                where = f"{batch.path}:{line}: {reason}"
                if not skip_bad:
                    raise PreprocessError(f"{where} (use --skip-bad to skip bad records)")
                summary.skipped += 1
                summary.reasons[_kind(reason)] += 1
                if len(summary.examples) < MAX_EXAMPLES:
                    summary.examples.append(where)
            for out, k in zip(outs, keys):
                out.add(enc.tokens[k], enc.lengths[k])
                summary.tokens[k] += int(enc.lengths[k].sum())
            summary.documents += enc.docs
            summary.nbytes += enc.nbytes
            bar.update(enc.docs, enc.nbytes, sum(int(enc.lengths[k].sum()) for k in keys))
        if summary.documents == 0:
            raise PreprocessError(f"no documents to write (inputs: {', '.join(paths)})")
        for out in outs:
            out.commit()
    except BaseException:
        for out in outs:
            out.abort()
        raise
    finally:
        if stream is not None:
            stream.close()  # stops the worker pool
        bar.close()
    summary.seconds = time.time() - t0
    summary.outputs = [o.prefix for o in outs]
    return summary


def build_parser():
    p = argparse.ArgumentParser(
        description="Tokenize JSONL / text / Parquet into Megatron indexed datasets "
                    "({prefix}_{key}_document.bin/.idx). Flags follow Megatron-LM's "
                    "tools/preprocess_data.py.")
    p.add_argument("--input", nargs="+", required=True,
                   help="files or globs: .jsonl/.json(.gz), .parquet, .txt/.text/.md(.gz)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (columns) to tokenize, one output per key (default: text)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", default="auto", choices=sorted(TOKENIZER_TYPES),
                   help="auto: a file is a sentencepiece model, a folder a Hugging Face tokenizer")
    p.add_argument("--tokenizer-model", required=True,
                   help="sentencepiece .model file or Hugging Face tokenizer folder")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--append-eod", action="store_true", help="append EOD (EOS) to each document")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines when not on a terminal")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad records instead of stopping at the first")
    p.add_argument("--text-docs", choices=["file", "blank-line"], default="file",
                   help="plain text: one document per file, or per blank-line-separated block")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)  # clean up temporary outputs on kill
    try:
        s = preprocess(args.input, args.output_prefix, args.tokenizer_model, args.tokenizer_type,
                       args.json_keys, args.workers, args.append_eod, args.skip_bad,
                       args.text_docs, args.log_interval, progress=not args.quiet)
    except (PreprocessError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(s.format(), file=sys.stderr)
    return 0
