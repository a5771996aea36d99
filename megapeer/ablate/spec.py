"""Ablation spec (YAML) -> validated Spec -> one Variant per (architecture, layout).

The format is documented in docs/ablations.md. Every error names the spec file and
the key (`layouts[1].tp`, `isoflop.budget`, ...).
"""
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
DOTTED_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")


class SpecError(ValueError):
    """A bad ablation spec; the message names the file and the key."""


def _pos_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_experts(v):
    if _pos_int(v):
        return math.isqrt(v) ** 2 == v
    return isinstance(v, list) and len(v) >= 2 and all(_pos_int(x) for x in v)


def _experts(v):
    return [math.isqrt(v)] * 2 if isinstance(v, int) else list(v)


# key: (check, what it must be, dotted config key or a function value -> [(key, value)])
LAYOUT_KEYS = {
    "tp": (_pos_int, "a positive integer", "parallel.tensor"),
    "pp": (_pos_int, "a positive integer", "parallel.pipeline"),
    "vpp": (lambda v: v is None or _pos_int(v), "a positive integer or null",
            "parallel.virtual_pipeline"),
    "ep": (_pos_int, "a positive integer", "parallel.expert"),
    "dp": (_pos_int, "a positive integer", None),          # sets the world size
    "micro_batch": (_pos_int, "a positive integer", "training.micro_batch_size"),
    "global_batch": (_pos_int, "a positive integer", "training.global_batch_size"),
    "recompute": (lambda v: v in ("none", "selective", "full"),
                  "one of none, selective, full", "training.recompute"),
    "distributed_optimizer": (lambda v: isinstance(v, bool), "true or false",
                              "training.use_distributed_optimizer"),
}
ARCH_KEYS = {
    "peer": (lambda v: isinstance(v, bool), "true or false", None),   # see _arch_overrides
    "layers": (lambda v: isinstance(v, str) and v != "" and set(v) <= {"D", "P"},
               "a pattern of D (dense) and P (PEER) letters", "model.layer_pattern"),
    "experts": (_is_experts, "a perfect square (N = n*n experts) or a list of sub-key sizes",
                lambda v: [("model.peer.num_experts", _experts(v))]),
    "peer_heads": (_pos_int, "a positive integer", "model.peer.heads"),
    "topk": (_pos_int, "a positive integer", "model.peer.topk"),
    "key_dim": (_pos_int, "a positive integer", "model.peer.key_dim"),
    "expert_hidden": (_pos_int, "a positive integer", "model.peer.expert_hidden"),
    "q_lora_rank": (lambda v: v is None or _pos_int(v), "a positive integer or null",
                    "model.mla.q_lora_rank"),
    "kv_lora_rank": (_pos_int, "a positive integer", "model.mla.kv_lora_rank"),
    "attention_heads": (_pos_int, "a positive integer", "model.num_attention_heads"),
    "num_layers": (_pos_int, "a positive integer", "model.num_layers"),
    "hidden_size": (_pos_int, "a positive integer", "model.hidden_size"),
}
SPEC_KEYS = {"name", "config", "out_dir", "overrides", "layouts", "architectures",
             "isoflop", "slurm"}
ISOFLOP_KEYS = {"budget", "evals", "warmup_fraction"}
SLURM_KEYS = {"nodes", "gpus_per_node", "partition", "time", "sbatch_args", "script"}


@dataclass
class Axis:
    """One layout or architecture after sweep expansion."""
    name: str
    values: dict                 # the entry's own keys (tp, peer, ...) after expansion
    overrides: List[str]         # dotted.key=value for the trainer
    source: str                  # where it came from, for messages: "layouts[1]"


@dataclass
class Spec:
    path: str
    name: str
    config: str
    out_dir: str
    overrides: List[str]
    layouts: List[Axis]
    architectures: List[Axis]
    isoflop: Optional[dict] = None
    slurm: dict = field(default_factory=dict)


def fmt_value(v) -> str:
    """A value as the text of a dotted override (read back with yaml.safe_load)."""
    if isinstance(v, str):
        try:
            if yaml.safe_load(v) == v and "\n" not in v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)


def dotted(mapping: dict, where: str, source: str) -> List[str]:
    if not isinstance(mapping, dict):
        raise SpecError(f"{source}: '{where}' must be a mapping of dotted.key: value")
    out = []
    for k, v in mapping.items():
        if not isinstance(k, str) or not DOTTED_RE.match(k):
            raise SpecError(f"{source}: '{where}' has a bad key {k!r} (expected dotted.key)")
        out.append(f"{k}={fmt_value(v)}")
    return out


def _check_keys(data, known, where, source):
    if not isinstance(data, dict):
        raise SpecError(f"{source}: '{where}' must be a mapping, got {data!r}")
    for k in data:
        if k not in known:
            raise SpecError(f"{source}: unknown key '{where}.{k}' (known: {sorted(known)})"
                            if where else f"{source}: unknown key '{k}' (known: "
                            f"{sorted(known)})")


def _axis_overrides(values, keys, where, source, base_has_peer=None):
    out = []
    for k, v in values.items():
        check, what, target = keys[k]
        if not check(v):
            raise SpecError(f"{source}: '{where}.{k}' must be {what}, got {v!r}")
        if target is None:
            continue
        pairs = target(v) if callable(target) else [(target, v)]
        out += [f"{key}={fmt_value(val)}" for key, val in pairs]
    if "peer" in values:
        if values["peer"] is False:
            if "layers" in values and "P" in values["layers"]:
                raise SpecError(f"{source}: '{where}': peer: false contradicts layers: "
                                f"{values['layers']!r}")
            out.append("model.layer_pattern=D")
        elif "layers" not in values and base_has_peer is False:
            raise SpecError(f"{source}: '{where}.peer' is true but the base config has no "
                            "PEER layer: give 'layers' (e.g. DP)")
    return out


def _expand(entries, key, keys, source, base_has_peer):
    """A list of axis entries -> [Axis], expanding each entry's `sweep`."""
    if entries is None:
        return [Axis("base", {}, [], key)]
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{source}: '{key}' must be a non-empty list")
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        _check_keys(entry, set(keys) | {"name", "set", "sweep"}, where, source)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"{source}: '{where}.name' is required (a short name)")
        sweep = entry.get("sweep") or {}
        _check_keys(sweep, set(keys), f"{where}.sweep", source)
        for k, vals in sweep.items():
            if not isinstance(vals, list) or not vals:
                raise SpecError(f"{source}: '{where}.sweep.{k}' must be a non-empty list")
            if k in entry:
                raise SpecError(f"{source}: '{where}.{k}' is also swept in '{where}.sweep'")
        fixed = {k: v for k, v in entry.items() if k in keys}
        extra = dotted(entry.get("set") or {}, f"{where}.set", source)
        for combo in itertools.product(*sweep.values()):
            values = dict(fixed, **dict(zip(sweep, combo)))
            if "{" in name:
                try:
                    vname = name.format(**values)
                except (KeyError, IndexError, ValueError) as e:
                    raise SpecError(f"{source}: '{where}.name' {name!r} names an unknown "
                                    f"key {e}") from None
            else:
                vname = name + "".join(f"_{k}{_short(v)}" for k, v in zip(sweep, combo))
            if not NAME_RE.match(vname):
                raise SpecError(f"{source}: '{where}.name' gives {vname!r}: use letters, "
                                "digits and _ . + = -")
            ovs = _axis_overrides(values, keys, where, source, base_has_peer) + extra
            out.append(Axis(vname, values, ovs, where))
    names = [a.name for a in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{source}: '{key}' has repeated names {dup}")
    return out


def _short(v):
    return "x".join(map(str, v)) if isinstance(v, list) else str(v)


def load_spec(path: str) -> Spec:
    """Read and check an ablation spec file (paths inside are relative to the cwd)."""
    from ..config.loader import read_yaml_mapping
    data = read_yaml_mapping(path, SpecError, "spec")
    _check_keys(data, SPEC_KEYS, "", path)
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{path}: 'name' must be a short name (letters, digits, _ . -), "
                        f"got {name!r}")
    config = data.get("config")
    if not isinstance(config, str) or not config:
        raise SpecError(f"{path}: 'config' (the base training config) is required")
    if not os.path.isfile(config):
        raise SpecError(f"{path}: 'config' file not found: {config} (paths are relative to "
                        f"the directory you run from, {os.getcwd()})")
    out_dir = data.get("out_dir") or os.path.join("runs", "ablations", name)
    if not isinstance(out_dir, str):
        raise SpecError(f"{path}: 'out_dir' must be a path")
    overrides = dotted(data.get("overrides") or {}, "overrides", path)

    from ..config import ConfigError, load_config
    try:
        base = load_config(config, overrides, validate=False)
    except ConfigError as e:
        raise SpecError(f"{path}: 'overrides': {e}") from None
    base_has_peer = "P" in base.model.layer_pattern

    iso = data.get("isoflop")
    if iso is not None:
        _check_keys(iso, ISOFLOP_KEYS, "isoflop", path)
        b = iso.get("budget")
        if isinstance(b, str):
            try:
                b = float(b)
            except ValueError:
                pass
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise SpecError(f"{path}: 'isoflop.budget' must be a positive number of training "
                            f"FLOPs per variant, got {iso.get('budget')!r}")
        evals = iso.get("evals", 4)
        if not _pos_int(evals):
            raise SpecError(f"{path}: 'isoflop.evals' must be a positive integer, got {evals!r}")
        wf = iso.get("warmup_fraction")
        if wf is not None and (isinstance(wf, bool) or not isinstance(wf, (int, float))
                               or not 0 <= wf < 1):
            raise SpecError(f"{path}: 'isoflop.warmup_fraction' must be in [0, 1), got {wf!r}")
        iso = {"budget": float(b), "evals": evals, "warmup_fraction": wf}

    slurm = data.get("slurm") or {}
    _check_keys(slurm, SLURM_KEYS, "slurm", path)
    slurm = dict({"nodes": 1, "gpus_per_node": 8, "partition": None, "time": None,
                  "sbatch_args": [], "script": "slurm/pretrain_h100.sh"}, **slurm)
    if not _pos_int(slurm["nodes"]):
        raise SpecError(f"{path}: 'slurm.nodes' must be a positive integer")
    g = slurm["gpus_per_node"]
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise SpecError(f"{path}: 'slurm.gpus_per_node' must be an integer >= 0")
    if not isinstance(slurm["sbatch_args"], list) or \
            not all(isinstance(a, str) for a in slurm["sbatch_args"]):
        raise SpecError(f"{path}: 'slurm.sbatch_args' must be a list of strings")
    for k in ("partition", "time"):
        if slurm[k] is not None and not isinstance(slurm[k], str):
            raise SpecError(f"{path}: 'slurm.{k}' must be a string")

    layouts = _expand(data.get("layouts"), "layouts", LAYOUT_KEYS, path, base_has_peer)
    archs = _expand(data.get("architectures"), "architectures", ARCH_KEYS, path,
                    base_has_peer)
    return Spec(path, name, config, out_dir, overrides, layouts, archs, iso, slurm)
