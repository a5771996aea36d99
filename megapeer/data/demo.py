"""The embedded demo corpus: the standard-library sources of the running interpreter.

Present on every machine, real text that no one here wrote. One call turns it into a JSONL
file, a sentencepiece tokenizer and an indexed dataset:

    python -m megapeer.data.demo --out data/demo

Files are taken in sorted order (site-packages and test folders skipped) until max_mb is
reached. Re-running with the same settings reuses complete outputs (demo.json records them).
"""
import argparse
import json
import os
import sys
import sysconfig
import time

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MANIFEST = "demo.json"


def stdlib_files(max_bytes=None):
    """(relative path, absolute path) of stdlib .py files, sorted, up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            if max_bytes is not None and total >= max_bytes:
                return
            total += os.path.getsize(path)
            yield os.path.relpath(path, root), path


def stdlib_documents(max_bytes=None):
    """(relative path, text) of the readable, non-empty files of stdlib_files(max_bytes)."""
    for rel, full in stdlib_files(max_bytes):
        try:
            with open(full, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():  # skips empty __init__.py files
            yield rel, text


def write_stdlib_jsonl(path, max_mb=8.0):
    """Write {"text": source, "path": relative path} lines; returns (documents, bytes)."""
    docs = nbytes = 0
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        for rel, text in stdlib_documents(int(max_mb * 1e6)):
            out.write(json.dumps({"text": text, "path": rel}) + "\n")
            docs += 1
            nbytes += len(text.encode("utf-8"))
    os.replace(tmp, path)
    return docs, nbytes


def _settings(vocab_size, max_mb):
    return {"vocab_size": vocab_size, "max_mb": max_mb,
            "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}


def _reusable(out_dir, settings):
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    paths = [m.get("jsonl"), m.get("tokenizer"), m.get("prefix", "") + ".bin",
             m.get("prefix", "") + ".idx"]
    if m.get("settings") != settings or not all(p and os.path.exists(p) for p in paths):
        return None
    return m


def prepare_demo_data(out_dir, vocab_size=4096, max_mb=8.0, workers=None, quiet=False):
    """Stdlib sources -> out_dir/{stdlib.jsonl, tokenizer.model, stdlib_text_document.bin/.idx}.
    Returns a dict: jsonl, tokenizer, prefix, documents, tokens, settings."""
    from .preprocess import preprocess
    from .train_tokenizer import train_tokenizer

    out_dir = os.path.abspath(out_dir)
    settings = _settings(vocab_size, max_mb)
    found = _reusable(out_dir, settings)
    if found:
        if not quiet:
            print(f"demo data already prepared in {out_dir}", file=sys.stderr)
        return found
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    jsonl = os.path.join(out_dir, "stdlib.jsonl")
    docs, nbytes = write_stdlib_jsonl(jsonl, max_mb)
    model = train_tokenizer([jsonl], os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size,
                            quiet=True)
    workers = workers or min(2, os.cpu_count() or 1)
    s = preprocess([jsonl], os.path.join(out_dir, "stdlib"), model, workers=workers,
                   append_eod=True, progress=not quiet)
    result = {"jsonl": jsonl, "tokenizer": model, "prefix": s.outputs[0],
              "documents": s.documents, "tokens": s.tokens["text"], "settings": settings}
    tmp = os.path.join(out_dir, f"{MANIFEST}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    if not quiet:
        print(f"demo data: {docs} stdlib files ({nbytes / 1e6:.1f} MB) -> {s.tokens['text']:,} "
              f"tokens, vocab {vocab_size}, in {time.time() - t0:.1f} s; dataset prefix "
              f"{result['prefix']}", file=sys.stderr)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare the embedded demo corpus (stdlib sources).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    r = prepare_demo_data(a.out, a.vocab_size, a.max_mb, a.workers)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
