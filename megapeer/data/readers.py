"""Input files -> batches of raw records, streamed with bounded memory.

Formats, chosen by the file name:
  .jsonl .json (.gz)        one JSON object per line; blank lines are ignored
  .parquet                  one row per record; the keys are column names
  .txt .text .md (.gz)      plain text: one document per file (text_docs='file', default) or
                            one per block of lines separated by blank lines ('blank-line')
Records stay raw bytes here; decoding and parsing (parse_record) happen in the workers.
"""
import glob
import gzip
import json
import os
from dataclasses import dataclass, field

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


class InputError(ValueError):
    """A problem with an input file or record; the message names the file (and line)."""


@dataclass
class Batch:
    path: str
    fmt: str                                      # 'jsonl' | 'text' | 'parquet'
    lines: list = field(default_factory=list)     # 1-based line (parquet: row) of each record
    payloads: list = field(default_factory=list)  # bytes, or {key: value} for parquet
    nbytes: int = 0


def expand_inputs(patterns):
    """Files and globs (with **) -> sorted, de-duplicated file list; a pattern that matches
    nothing is an error."""
    out, seen = [], set()
    for pat in patterns:
        hits = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        hits = [h for h in hits if not os.path.isdir(h)]
        if not hits or not os.path.exists(hits[0]):
            raise InputError(f"{pat}: no such input file")
        for h in hits:
            if h not in seen:
                seen.add(h)
                out.append(h)
    return out


def input_format(path):
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSON_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet") and not path.endswith(".gz"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise InputError(f"{path}: unknown input format (expected .jsonl, .json, .parquet, .txt, "
                     ".text or .md, optionally .gz except parquet)")


def _open(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _jsonl_records(path):
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _text_records(path, text_docs):
    with _open(path) as f:
        if text_docs == "file":
            yield 1, f.read()
            return
        block, start = [], 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                yield start, b"".join(block).rstrip(b"\r\n")
                block = []
        if block:
            yield start, b"".join(block).rstrip(b"\r\n")


def _parquet_batches(path, keys, batch_docs):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    cols = [k for k in keys if k in pf.schema_arrow.names]
    row = 0
    if not cols:  # every row lacks every key: reported per row by parse_record
        n = pf.metadata.num_rows
        for s in range(0, n, batch_docs):
            m = min(batch_docs, n - s)
            yield Batch(path, "parquet", list(range(s + 1, s + m + 1)), [{}] * m, 0)
        return
    for rb in pf.iter_batches(batch_size=batch_docs, columns=cols):
        data = [rb.column(k).to_pylist() for k in cols]
        rows = [dict(zip(cols, vals)) for vals in zip(*data)]
        nbytes = sum(len(v) for col in data for v in col if isinstance(v, str))
        yield Batch(path, "parquet", list(range(row + 1, row + len(rows) + 1)), rows, nbytes)
        row += len(rows)


def iter_batches(path, keys, text_docs="file", batch_bytes=1 << 18, batch_docs=1024):
    """Yield Batches of at most ~batch_bytes / batch_docs records from one file."""
    fmt = input_format(path)
    try:
        if fmt == "parquet":
            yield from _parquet_batches(path, keys, batch_docs)
            return
        records = _jsonl_records(path) if fmt == "jsonl" else _text_records(path, text_docs)
        b = Batch(path, fmt)
        for lineno, raw in records:
            b.lines.append(lineno)
            b.payloads.append(raw)
            b.nbytes += len(raw)
            if b.nbytes >= batch_bytes or len(b.payloads) >= batch_docs:
                yield b
                b = Batch(path, fmt)
        if b.payloads:
            yield b
    except (OSError, EOFError) as e:  # unreadable, truncated or corrupt (gzip, parquet)
        raise InputError(f"{path}: cannot read ({e})") from None


def parse_record(fmt, payload, keys):
    """Raw record -> ({key: text}, None) or (None, reason) for a bad record."""
    if fmt == "parquet":
        doc = payload
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"not UTF-8 (byte 0x{payload[e.start]:02x} at offset {e.start})"
        if fmt == "text":
            doc = {keys[0]: text}
        else:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                return None, f"malformed JSON ({e.msg} at column {e.colno})"
            if not isinstance(doc, dict):
                return None, f"malformed JSON (a {type(doc).__name__}, not an object)"
    out = {}
    for k in keys:
        v = doc.get(k)
        if v is None:
            return None, f"missing key {k!r}"
        if not isinstance(v, str):
            return None, f"key {k!r} is not a string ({type(v).__name__})"
        if not v.strip():
            return None, f"empty document (key {k!r})"
        out[k] = v
    return out, None
