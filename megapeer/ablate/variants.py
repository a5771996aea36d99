"""Spec -> Variants: trainer overrides, world size, isoFLOP steps, run folders.

A variant is one (architecture, layout) pair. Its overrides are applied in this order:
spec `overrides`, command-line overrides, the layout's, the architecture's, then the
isoFLOP steps and the run folder (those two always win).
"""
import json
import os
from dataclasses import asdict, dataclass
from typing import List

from .progress import checkpoint_step
from .spec import Spec, SpecError, fmt_value

ARGS_NAME = "train.args"         # one trainer argument per line: config, then overrides
VARIANT_NAME = "variant.json"


@dataclass
class Variant:
    name: str
    architecture: str
    layout: str
    world_size: int
    run_dir: str
    config: str                  # base config path (absolute)
    overrides: List[str]
    train_iters: int
    flops_per_token: float       # model FLOPs per token for a training step (fwd + bwd)
    tokens_per_step: int
    params_total: int
    params_active: int
    layout_values: dict
    arch_values: dict

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def train_args(self) -> List[str]:
        return [self.config] + self.overrides

    def finished(self) -> bool:
        return checkpoint_step(os.path.join(self.run_dir, "checkpoints")) >= self.train_iters


def model_flops(cfg):
    """(training FLOPs per token, total params, active params) of a config's model.

    The vocabulary is padded as at tensor parallel 1, so that every layout of one
    architecture gets the same count.
    """
    from ..models.counts import flops_per_token, padded_vocab_size, param_counts
    vocab = padded_vocab_size(cfg.model, 1)
    pc = param_counts(cfg.model, vocab)
    return flops_per_token(cfg.model, vocab_size=vocab), pc["total"], pc["active"]


def isoflop_steps(budget: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Steps whose training FLOPs come closest to `budget` (at least 1)."""
    return max(1, round(budget / (flops_per_token * tokens_per_step)))


def build_variants(spec: Spec, extra_overrides=(), out_dir=None) -> List[Variant]:
    """All variants of `spec`, each validated as the trainer would at its world size."""
    from ..config import ConfigError, load_config
    out_dir = os.path.abspath(out_dir or spec.out_dir)
    config = os.path.abspath(spec.config)
    variants = []
    for arch in spec.architectures:
        for lay in spec.layouts:
            parts = [a.name for a in (arch, lay) if "[" in a.source]  # not a default axis
            name = "--".join(parts) or "base"
            where = f"variant {name} ({arch.source} '{arch.name}', {lay.source} '{lay.name}')"
            world = (lay.values.get("tp", 1) * lay.values.get("pp", 1)
                     * lay.values.get("dp", 1))
            run_dir = os.path.join(out_dir, "runs", name)
            ovs = list(spec.overrides) + list(extra_overrides) + lay.overrides + arch.overrides
            try:
                cfg = load_config(config, ovs, world_size=world, validate=False)
            except ConfigError as e:
                raise SpecError(f"{spec.path}: {where}: {e}") from None
            fpt, total, active = model_flops(cfg)
            tokens = cfg.training.global_batch_size * cfg.model.seq_length
            iters = cfg.training.train_iters
            if spec.isoflop:
                iso = spec.isoflop
                iters = isoflop_steps(iso["budget"], fpt, tokens)
                warm = (round(iso["warmup_fraction"] * iters) if iso["warmup_fraction"]
                        is not None else min(cfg.training.warmup_iters, iters))
                ovs += [f"training.train_iters={iters}", f"training.warmup_iters={warm}",
                        f"training.eval_interval={max(1, iters // iso['evals'])}"]
            ovs += [f"logging.run_dir={fmt_value(run_dir)}", "checkpoint.dir=null"]
            try:
                load_config(config, ovs, world_size=world)
            except ConfigError as e:
                raise SpecError(f"{spec.path}: {where}: {e}") from None
            variants.append(Variant(name, arch.name, lay.name, world, run_dir, config, ovs,
                                    iters, fpt, tokens, total, active, lay.values,
                                    arch.values))
    return variants


def check_run_dir(v: Variant) -> None:
    """Refuse a run folder that holds a run with other settings.

    Its recorded config and overrides must equal this variant's: otherwise results
    of one experiment would be reported under another's name.
    """
    meta_path = os.path.join(v.run_dir, VARIANT_NAME)
    if not os.path.exists(meta_path):
        return
    with open(meta_path) as f:
        old = json.load(f)
    if old.get("overrides") != v.overrides or old.get("config") != v.config:
        raise SpecError(f"variant {v.name}: {v.run_dir} holds a run with other settings "
                        f"(its {VARIANT_NAME} differs); delete that folder or change "
                        "out_dir to run the new settings")


def prepare_run_dir(v: Variant) -> str:
    """Check the folder, write <run_dir>/variant.json and train.args (returns its path)."""
    check_run_dir(v)
    os.makedirs(v.run_dir, exist_ok=True)
    with open(os.path.join(v.run_dir, VARIANT_NAME), "w") as f:
        json.dump(dict(asdict(v), flops_per_step=v.flops_per_step), f, indent=1)
    args_path = os.path.join(v.run_dir, ARGS_NAME)
    with open(args_path, "w") as f:
        f.write("\n".join(v.train_args()) + "\n")
    return args_path
