"""Bad input stops the run with file:line (or is skipped and counted with skip_bad), and an
interrupted run never leaves a .bin/.idx pair that looks valid."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece as spm

from megapeer.data import preprocess as pre
from megapeer.data.preprocess import PreprocessError, main, preprocess
from megapeer.data.readers import InputError
from megapeer.data.train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["the quick brown fox", "jumps over the lazy dog", "hello world, again and again",
        "def f(x):\n    return x + 1\n"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    src = d / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in GOOD * 10))
    return train_tokenizer([str(src)], str(d / "tok"), vocab_size=300, quiet=True)


def _write(path, lines):
    with open(path, "wb") as f:
        f.writelines(line + b"\n" for line in lines)


def _good(t):
    return json.dumps({"text": t}).encode()


# (bad line, reason in the message); each goes in as line 3 of a file of good lines.
CASES = {
    "malformed": (b'{"text": "unterminated', "malformed JSON"),
    "not_object": (b'["a", "list"]', "malformed JSON"),
    "missing_key": (b'{"body": "no text key"}', "missing key 'text'"),
    "null_value": (b'{"text": null}', "missing key 'text'"),
    "not_string": (b'{"text": 42}', "key 'text' is not a string"),
    "not_utf8": (b'{"text": "caf\xe9 latin-1"}', "not UTF-8"),
    "empty": (b'{"text": ""}', "empty document"),
    "blank": (b'{"text": "  \\n\\t "}', "empty document"),
    "surrogate": (b'{"text": "lone \\ud800 surrogate"}', "cannot tokenize"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_stops_with_file_and_line(model, tmp_path, case):
    bad, reason = CASES[case]
    path = tmp_path / "in.jsonl"
    _write(path, [_good(GOOD[0]), _good(GOOD[1]), bad, _good(GOOD[2])])
    with pytest.raises(PreprocessError) as e:
        preprocess([str(path)], str(tmp_path / "out"), model, progress=False)
    assert f"{path}:3: {reason}" in str(e.value)
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no outputs, no temporary files


def test_skip_bad_counts_and_keeps_the_good(model, tmp_path, capsys):
    lines, good = [], []
    for i, name in enumerate(sorted(CASES)):
        lines += [_good(GOOD[i % 4]), CASES[name][0]]
        good.append(GOOD[i % 4])
    path = tmp_path / "in.jsonl"
    _write(path, lines)
    for workers in (1, 2):
        s = preprocess([str(path)], str(tmp_path / f"w{workers}"), model, skip_bad=True,
                       append_eod=True, workers=workers, progress=False, batch_bytes=64)
        assert s.documents == len(good) and s.skipped == len(CASES)
        assert s.reasons == {"malformed JSON": 2, "missing key 'text'": 2, "not UTF-8": 1,
                             "key 'text' is not a string": 1, "empty document": 2,
                             "cannot tokenize": 1}
        assert s.examples[0] == f"{path}:2: {CASES[sorted(CASES)[0]][1]} (key 'text')"
        assert len(s.examples) == pre.MAX_EXAMPLES
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(str(tmp_path / f"w{workers}_text_document"))
        sp = spm.SentencePieceProcessor(model_file=model)
        assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [2] for t in good]
    rc = main(["--input", str(path), "--output-prefix", str(tmp_path / "cli"),
               "--tokenizer-model", model, "--skip-bad", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and f"{len(CASES)} skipped" in err and f"e.g. {path}:4: " in err


def test_other_formats_name_file_and_line(model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_bytes(b"fine text")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9")
    with pytest.raises(PreprocessError, match=f"{tmp_path / 'b.txt'}:1: not UTF-8"):
        preprocess([str(tmp_path / "*.txt")], str(tmp_path / "t"), model, progress=False)
    (tmp_path / "c.md").write_bytes(b"one\n\ntwo\n\n\xff\xfe bad\n")
    with pytest.raises(PreprocessError, match=f"{tmp_path / 'c.md'}:5: not UTF-8"):
        preprocess([str(tmp_path / "c.md")], str(tmp_path / "m"), model, text_docs="blank-line",
                   progress=False)
    pq.write_table(pa.table({"text": ["ok", None, "ok"]}), tmp_path / "p.parquet")
    with pytest.raises(PreprocessError, match=f"{tmp_path / 'p.parquet'}:2: missing key 'text'"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "p"), model, progress=False)
    with gzip.open(tmp_path / "g.jsonl.gz", "wb") as f:
        f.write(b"".join(_good(t) + b"\n" for t in GOOD * 50))
    data = (tmp_path / "g.jsonl.gz").read_bytes()
    (tmp_path / "g.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(InputError, match="g.jsonl.gz: cannot read"):
        preprocess([str(tmp_path / "g.jsonl.gz")], str(tmp_path / "g"), model, progress=False)
    with pytest.raises(InputError, match="missing.jsonl: no such input file"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "x"), model, progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".idx")) or ".tmp" in f]


def test_interrupt_in_process_cleans_up(model, tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl"
    _write(path, [_good(t) for t in GOOD * 20])
    calls = []
    real = pre.encode_batch

    def flaky(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(pre, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(path)], str(tmp_path / "out"), model, progress=False, batch_bytes=100)
    assert len(calls) == 3
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_interrupted_overwrite_never_pairs_old_idx_with_new_bin(model, tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = tmp_path / "in.jsonl"
    _write(path, [_good(t) for t in GOOD])
    prefix = str(tmp_path / "out_text_document")
    preprocess([str(path)], str(tmp_path / "out"), model, progress=False)
    old = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()
    # A failed re-run leaves the previous complete pair untouched.
    _write(tmp_path / "bad.jsonl", [_good("new text"), b"{broken"])
    with pytest.raises(PreprocessError):
        preprocess([str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), model, progress=False)
    assert (open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()) == old
    # Killed between renaming the new .bin and the new .idx: no pair is left.
    real = os.replace

    def replace_then_die(src, dst):
        if dst.endswith(".idx"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(pre.os, "replace", replace_then_die)
    _write(path, [_good(t) for t in reversed(GOOD)])
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(path)], str(tmp_path / "out"), model, progress=False)
    assert not IndexedDataset.exists(prefix)


def test_killed_process_leaves_no_valid_looking_output(model, tmp_path):
    fifo = str(tmp_path / "stream.jsonl")
    os.mkfifo(fifo)
    prefix = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                             "--input", fifo, "--output-prefix", prefix, "--tokenizer-model",
                             model, "--append-eod", "--quiet"], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:  # the tool opens the FIFO once it has started
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline
                time.sleep(0.1)
        os.set_blocking(fd, True)
        chunk = b"".join(_good(t) + b"\n" for t in GOOD * 500)
        for _ in range(8):  # several batches written, more input still to come
            os.write(fd, chunk)
        time.sleep(0.5)
        assert proc.poll() is None
        assert any(".tmp" in f for f in os.listdir(tmp_path))  # mid-run
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(prefix + "_text_document")
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".idx"))]
