#!/usr/bin/env python
"""Preprocessing throughput on the embedded demo corpus (stdlib sources).

Times each stage alone in one process (read lines, + UTF-8/JSON parsing, tokenization,
writing the indexed dataset), then the whole tool with 1, 2, ... workers, and prints a
markdown table of docs/s, MB/s and tokens/s.

    python bench/preprocess_throughput.py [--data-dir DIR] [--workers 1 2] [--repeat 3]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapeer.data import load_tokenizer  # noqa: E402
from megapeer.data.demo import prepare_demo_data  # noqa: E402
from megapeer.data.preprocess import _Output, encode_batch, preprocess  # noqa: E402
from megapeer.data.readers import iter_batches, parse_record  # noqa: E402


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "megapeer_demo"))
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="best of N")
    a = p.parse_args()

    demo = prepare_demo_data(a.data_dir, a.vocab_size, a.max_mb, quiet=True)
    src, model = demo["jsonl"], demo["tokenizer"]
    tok = load_tokenizer(model)
    keys = ["text"]
    batches = list(iter_batches(src, keys))
    ndocs = sum(len(b.payloads) for b in batches)
    nbytes = sum(b.nbytes for b in batches)
    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tok.vocab_size)
    encoded = [encode_batch(tok, b, keys, True, dtype) for b in batches]
    ntok = sum(int(e.lengths["text"].sum()) for e in encoded)
    texts = [[parse_record(b.fmt, x, keys)[0]["text"] for x in b.payloads] for b in batches]
    out_dir = tempfile.mkdtemp(prefix="megapeer_bench_")

    def write():
        o = _Output(os.path.join(out_dir, "w"), "text", dtype)
        for e in encoded:
            o.add(e.tokens["text"], e.lengths["text"])
        o.commit()

    stages = [
        ("read lines", lambda: sum(1 for _ in iter_batches(src, keys))),
        ("read + parse (UTF-8, JSON)", lambda: [parse_record(b.fmt, x, keys) for b in
                                                iter_batches(src, keys) for x in b.payloads]),
        ("tokenize (sentencepiece)", lambda: [tok.encode_batch(t) for t in texts]),
        ("write .bin/.idx", write),
    ]
    rows = []
    for name, fn in stages:
        t, _ = _best(fn, a.repeat)
        rows.append((name, "1 (in-process)", t))
    base = None
    for w in a.workers:
        t, s = _best(lambda: preprocess([src], os.path.join(out_dir, f"e{w}"), model, workers=w,
                                        append_eod=True, progress=False), a.repeat)
        assert s.documents == ndocs and s.tokens["text"] == ntok
        base = base or t
        rows.append((f"end to end ({base / t:.2f}x)", str(w), t))

    shutil.rmtree(out_dir)
    print(f"corpus: {ndocs} documents, {nbytes / 1e6:.2f} MB, {ntok:,} tokens "
          f"(vocab {tok.vocab_size}), {os.cpu_count()} CPUs, best of {a.repeat}")
    print("| stage | workers | seconds | docs/s | MB/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, w, t in rows:
        print(f"| {name} | {w} | {t:.3f} | {ndocs / t:,.0f} | {nbytes / t / 1e6:,.1f} | "
              f"{ntok / t:,.0f} |")


if __name__ == "__main__":
    main()
