"""tools/ablate.py: spec expansion, errors naming the key, isoFLOP steps, skipping
finished runs, and results from real tiny runs."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from megapeer.ablate.progress import checkpoint_step
from megapeer.ablate.spec import SpecError, load_spec
from megapeer.ablate.variants import build_variants, isoflop_steps, prepare_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny_cpu.yaml")


def write_spec(tmp_path, spec, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def base_spec(**extra):
    spec = {"name": "t", "config": TINY, "overrides": {"model.num_layers": 2}}
    spec.update(extra)
    return spec


def test_expansion_layouts_times_architectures_with_sweeps(tmp_path):
    spec = base_spec(
        layouts=[{"name": "dp2", "dp": 2, "micro_batch": 4},
                 {"name": "tp2_pp2", "tp": 2, "pp": 2, "vpp": None, "recompute": "selective",
                  "micro_batch": 2}],
        architectures=[{"name": "dense", "peer": False},
                       {"name": "peer_k{topk}", "layers": "PD", "experts": 64,
                        "peer_heads": 2, "sweep": {"topk": [2, 4]}},
                       {"name": "mla", "sweep": {"kv_lora_rank": [16, 32]},
                        "set": {"training.lr": 1e-3}}])
    variants = build_variants(load_spec(write_spec(tmp_path, spec)), out_dir=str(tmp_path / "o"))
    names = [v.name for v in variants]
    assert names == [f"{a}--{lay}" for a in ("dense", "peer_k2", "peer_k4", "mla_kv_lora_rank16",
                                             "mla_kv_lora_rank32") for lay in ("dp2", "tp2_pp2")]
    by = {v.name: v for v in variants}
    assert by["dense--dp2"].world_size == 2 and by["dense--tp2_pp2"].world_size == 4
    ovs = by["peer_k4--tp2_pp2"].overrides
    for want in ("parallel.tensor=2", "parallel.pipeline=2", "parallel.virtual_pipeline=null",
                 "training.recompute=selective", "training.micro_batch_size=2",
                 "model.layer_pattern=PD", "model.peer.num_experts=[8, 8]",
                 "model.peer.heads=2", "model.peer.topk=4", "model.num_layers=2"):
        assert want in ovs, (want, ovs)
    assert "model.layer_pattern=D" in by["dense--dp2"].overrides
    assert "model.mla.kv_lora_rank=32" in by["mla_kv_lora_rank32--dp2"].overrides
    assert "training.lr=0.001" in by["mla_kv_lora_rank16--dp2"].overrides
    # the run folder and checkpoint location are the variant's own, whatever the base says
    v = by["dense--dp2"]
    assert v.overrides[-2:] == [f"logging.run_dir={tmp_path}/o/runs/dense--dp2",
                                "checkpoint.dir=null"]
    # the overrides load into the config the trainer will see
    from megapeer.config import load_config
    cfg = load_config(v.config, v.overrides, world_size=v.world_size)
    assert cfg.model.layer_pattern == "D" and cfg.logging.run_dir == v.run_dir
    cfg = load_config(by["peer_k4--tp2_pp2"].config, by["peer_k4--tp2_pp2"].overrides,
                      world_size=4)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.model.peer.topk) == (2, 2, 4)


def test_no_axes_gives_one_base_variant_and_command_line_overrides_apply(tmp_path):
    path = write_spec(tmp_path, base_spec())
    (v,) = build_variants(load_spec(path), ["training.lr=0.01"], out_dir=str(tmp_path))
    assert v.name == "base" and v.world_size == 1 and "training.lr=0.01" in v.overrides


@pytest.mark.parametrize("patch, key", [
    ({"layouts": [{"name": "a", "tpp": 2}]}, "layouts[0].tpp"),
    ({"layouts": [{"name": "a", "tp": 0}]}, "layouts[0].tp"),
    ({"layouts": [{"tp": 2}]}, "layouts[0].name"),
    ({"layouts": [{"name": "a", "recompute": "some"}]}, "layouts[0].recompute"),
    ({"layouts": [{"name": "a"}, {"name": "a"}]}, "'layouts' has repeated names"),
    ({"architectures": [{"name": "x", "experts": 1000}]}, "architectures[0].experts"),
    ({"architectures": [{"name": "x", "sweep": {"topk": 4}}]}, "architectures[0].sweep.topk"),
    ({"architectures": [{"name": "x", "topk": 4, "sweep": {"topk": [2]}}]},
     "architectures[0].topk"),
    ({"architectures": [{"name": "x{nope}", "sweep": {"topk": [2]}}]},
     "architectures[0].name"),
    ({"architectures": [{"name": "x", "peer": False, "layers": "DP"}]}, "architectures[0]"),
    ({"isoflop": {"budget": -1}}, "isoflop.budget"),
    ({"isoflop": {"budget": 1e12, "evals": 0}}, "isoflop.evals"),
    ({"isoflop": {"bugdet": 1e12}}, "isoflop.bugdet"),
    ({"slurm": {"nodes": 0}}, "slurm.nodes"),
    ({"slurm": {"gpus": 8}}, "slurm.gpus"),
    ({"config": "nope.yaml"}, "'config' file not found"),
    ({"overrides": {"model.nope": 1}}, "model.nope"),
    ({"extra": 1}, "unknown key 'extra'"),
    # values the trainer's validation rejects: named by config key and variant
    ({"layouts": [{"name": "tp3", "tp": 3}]}, "variant tp3"),
    ({"layouts": [{"name": "tp3", "tp": 3}]}, "model.num_attention_heads"),
    ({"layouts": [{"name": "ep2", "dp": 2, "ep": 2}],
      "architectures": [{"name": "dense", "peer": False}]}, "parallel.expert"),
])
def test_bad_specs_name_the_key(tmp_path, patch, key):
    spec = base_spec(**patch)
    with pytest.raises(SpecError) as e:
        build_variants(load_spec(write_spec(tmp_path, spec)), out_dir=str(tmp_path))
    assert key in str(e.value)
    assert "spec.yaml" in str(e.value)


def test_peer_on_needs_peer_layers(tmp_path):
    spec = base_spec(overrides={"model.layer_pattern": "D"},
                     architectures=[{"name": "p", "peer": True}])
    with pytest.raises(SpecError, match=r"architectures\[0\]\.peer"):
        load_spec(write_spec(tmp_path, spec))
    spec["architectures"][0]["layers"] = "DP"
    (v,) = build_variants(load_spec(write_spec(tmp_path, spec)), out_dir=str(tmp_path))
    assert "model.layer_pattern=DP" in v.overrides


def test_isoflop_steps_give_each_variant_the_same_training_flops(tmp_path):
    from megapeer.config import load_config
    from megapeer.models.counts import flops_per_token
    budget = 3.0e12
    spec = base_spec(
        overrides={"model.num_layers": 2, "training.global_batch_size": 16,
                   "training.warmup_iters": 50},
        layouts=[{"name": "dp1", "micro_batch": 4}, {"name": "tp2", "tp": 2, "micro_batch": 8}],
        architectures=[{"name": "dense", "peer": False},
                       {"name": "peer", "layers": "P", "experts": 1024, "topk": 16},
                       {"name": "wide", "peer": False, "hidden_size": 256}],
        isoflop={"budget": budget, "evals": 4, "warmup_fraction": 0.1})
    variants = build_variants(load_spec(write_spec(tmp_path, spec)), out_dir=str(tmp_path))
    steps = {}
    for v in variants:
        cfg = load_config(v.config, v.overrides, world_size=v.world_size)
        # recomputed from the config the trainer gets (vocab 4096 is a multiple of 128)
        fpt = flops_per_token(cfg.model)
        tokens = cfg.training.global_batch_size * cfg.model.seq_length
        assert v.flops_per_token == fpt and v.tokens_per_step == tokens == 16 * 128
        assert cfg.training.train_iters == v.train_iters == round(budget / (fpt * tokens))
        assert abs(v.train_iters * fpt * tokens - budget) <= fpt * tokens / 2
        assert cfg.training.warmup_iters == round(0.1 * v.train_iters)
        assert cfg.training.eval_interval == v.train_iters // 4
        steps.setdefault(v.architecture, set()).add(v.train_iters)
    # every layout of an architecture trains equally long; architectures differ
    assert all(len(s) == 1 for s in steps.values())
    dense, peer, wide = (steps[a].pop() for a in ("dense", "peer", "wide"))
    assert wide < dense and peer != dense
    assert isoflop_steps(10.0, 1.0, 3) == 3 and isoflop_steps(1.0, 1e6, 1) == 1


def test_example_specs_expand(tmp_path):
    """Every shipped spec loads and expands into valid variants."""
    d = os.path.join(ROOT, "examples", "ablations")
    names = sorted(f for f in os.listdir(d) if f.endswith(".yaml"))
    assert {"peer_vs_dense.yaml", "parallel_layouts.yaml", "tiny_cpu.yaml"} <= set(names)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for n in names:
            variants = build_variants(load_spec(os.path.join(d, n)), out_dir=str(tmp_path / n))
            assert len(variants) >= 2
            if n == "parallel_layouts.yaml":
                assert {v.world_size for v in variants} == {8}
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megapeer.data.demo import prepare_demo_data
    return prepare_demo_data(str(tmp_path_factory.mktemp("ablate_data")), vocab_size=512,
                             max_mb=0.3, quiet=True)


def data_overrides(data):
    return [f"data.tokenizer.path={data['tokenizer']}", f"data.blend=[{data['prefix']}]",
            "data.split=90,10,0"]


def ablate(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ablate.py")] + args,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_local_sweep_runs_collects_and_skips_finished(data, tmp_path):
    """examples/ablations/tiny_cpu.yaml for real (2 variants, ~13 steps, 2 ranks each)."""
    out = str(tmp_path / "sweep")
    spec_path = os.path.join(ROOT, "examples", "ablations", "tiny_cpu.yaml")
    args = [spec_path, "--local", "--out", out] + data_overrides(data)
    p = ablate(args)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    variants = build_variants(load_spec(spec_path), data_overrides(data), out)
    assert [v.name for v in variants] == ["dense--dp2", "peer--dp2"]

    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert [r["variant"] for r in rows] == ["dense--dp2", "peer--dp2"]
    for v, r in zip(variants, rows):
        recs = [json.loads(x) for x in open(os.path.join(v.run_dir, "metrics.jsonl"))]
        train = [x for x in recs if x["split"] == "train"]
        valid = [x for x in recs if x["split"] == "valid"]
        assert r["status"] == "finished" and checkpoint_step(
            os.path.join(v.run_dir, "checkpoints")) == v.train_iters
        assert int(r["steps"]) == v.train_iters == train[-1]["step"]
        assert float(r["train_flops"]) == pytest.approx(v.train_iters * v.flops_per_step)
        assert float(r["final_valid_loss"]) == pytest.approx(valid[-1]["loss"])
        assert float(r["best_valid_loss"]) == pytest.approx(min(x["loss"] for x in valid))
        assert float(r["final_train_loss"]) == pytest.approx(train[-1]["loss"])
        assert float(r["peak_memory_gib"]) == pytest.approx(max(x["mem_gib"] for x in train))
        tps = sorted(x["tokens_per_s"] for x in train[1:])
        assert min(tps) <= float(r["tokens_per_s"]) <= max(tps)
        assert r["mfu"] == ""                       # CPU: no peak FLOP/s, no MFU
        assert len(valid) >= 3 and valid[-1]["loss"] < train[0]["loss"]
    # both variants spent the isoFLOP budget to within half a step
    for v in variants:
        assert abs(v.train_iters * v.flops_per_step - 1.5e10) <= v.flops_per_step / 2
    md = open(os.path.join(out, "results.md")).read()
    best = min(rows, key=lambda r: float(r["best_valid_loss"]))
    assert f"**{float(best['best_valid_loss']):.4f}**" in md
    assert all(f"| {r['variant']} | finished |" in md for r in rows)
    for png in ("loss_vs_flops.png", "throughput.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # rerun: both finished, nothing trains, results are rewritten from the same runs
    stamp = [os.path.getmtime(os.path.join(v.run_dir, "metrics.jsonl")) for v in variants]
    t0 = time.time()
    p = ablate(args)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("finished already, skipped") == 2
    assert stamp == [os.path.getmtime(os.path.join(v.run_dir, "metrics.jsonl"))
                     for v in variants]
    assert time.time() - t0 < 30
    assert list(csv.DictReader(open(os.path.join(out, "results.csv")))) == rows

    # the same folder with other settings is refused, naming the variant
    p = ablate(args + ["training.lr=0.01"])
    assert p.returncode != 0 and "dense--dp2" in p.stderr and "other settings" in p.stderr


def test_collect_reports_unfinished_and_missing_runs(data, tmp_path):
    """A variant stopped early (real run with a smaller step count in its folder) and one
    never started are reported as such, and the tool exits non-zero."""
    spec = base_spec(overrides={"model.num_layers": 2, "model.hidden_size": 64,
                                "model.num_attention_heads": 2, "model.ffn_hidden_size": 128,
                                "model.seq_length": 32, "training.train_iters": 6,
                                "training.warmup_iters": 1, "training.eval_interval": 3,
                                "training.eval_iters": 1, "logging.log_interval": 1},
                     architectures=[{"name": "a", "peer": False}, {"name": "b", "peer": False,
                                                                     "kv_lora_rank": 32}])
    path = write_spec(tmp_path, spec)
    out = str(tmp_path / "sweep")
    a, b = build_variants(load_spec(path), data_overrides(data), out)
    prepare_run_dir(a)
    # train variant a for 3 of its 6 steps (a real run, as if stopped by the time limit)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "megapeer.train", "--config", a.config]
                   + a.overrides + ["training.train_iters=3"], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=300)
    assert not a.finished() and checkpoint_step(os.path.join(a.run_dir, "checkpoints")) == 3
    p = ablate([path, "--collect", "--out", out] + data_overrides(data))
    assert p.returncode == 1 and "not finished" in p.stderr
    rows = {r["variant"]: r for r in csv.DictReader(open(os.path.join(out, "results.csv")))}
    assert rows["a"]["status"] == "stopped at 3/6" and rows["a"]["steps"] == "3"
    assert rows["b"]["status"] == "not started" and rows["b"]["final_valid_loss"] == ""
