"""The embedded demo corpus: stdlib sources -> JSONL -> tokenizer -> indexed dataset."""
import json
import os
import sysconfig

import sentencepiece as spm

from megapeer.data.demo import main, prepare_demo_data, stdlib_files


def test_stdlib_files_sorted_capped_and_without_tests():
    files = list(stdlib_files(2_000_000))
    rels = [r for r, _ in files]
    assert len(rels) > 20 and len(set(rels)) == len(rels)
    assert all(r.endswith(".py") for r in rels)
    parts = {p for r in rels for p in r.split(os.sep)[:-1]}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}
    assert sum(os.path.getsize(p) for _, p in files[:-1]) < 2_000_000
    assert rels == [r for r, _ in stdlib_files(2_000_000)]  # deterministic


def test_prepare_demo_data_round_trip_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    r = prepare_demo_data(str(out), vocab_size=512, max_mb=0.3, quiet=True)
    root = sysconfig.get_paths()["stdlib"]
    recs = [json.loads(line) for line in open(r["jsonl"], encoding="utf-8")]
    for rec in recs:
        with open(os.path.join(root, rec["path"]), encoding="utf-8") as f:
            assert f.read() == rec["text"]
    assert [x["path"] for x in recs] == [p for p, _ in stdlib_files(300_000)
                                          if os.path.getsize(os.path.join(root, p)) > 0][:len(recs)]

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = spm.SentencePieceProcessor(model_file=r["tokenizer"])
    assert sp.get_piece_size() == 512
    ds = IndexedDataset(r["prefix"])
    want = [sp.encode(x["text"]) + [sp.eos_id()] for x in recs]
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert r["documents"] == len(recs) and r["tokens"] == sum(map(len, want))

    # Idempotent: complete outputs are reused untouched.
    files = sorted(os.listdir(out))
    stamps = {f: os.stat(out / f).st_mtime_ns for f in files}
    assert main(["--out", str(out), "--vocab-size", "512", "--max-mb", "0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["prefix"] == r["prefix"]
    assert {f: os.stat(out / f).st_mtime_ns for f in sorted(os.listdir(out))} == stamps
    # Other settings, or a missing output, rebuild.
    os.remove(r["prefix"] + ".idx")
    r2 = prepare_demo_data(str(out), vocab_size=512, max_mb=0.3, quiet=True)
    ds2 = IndexedDataset(r2["prefix"])  # (arrays are views: keep the dataset alive)
    assert ds2[0].tolist() == want[0] and len(ds2) == len(want)
