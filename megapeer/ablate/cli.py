"""tools/ablate.py SPEC.yaml --local | --slurm [--wait] | --collect | --dry-run [key=value ...]"""
import argparse
import os
import shlex
import sys

from .spec import SpecError, load_spec

USAGE = """Expand an ablation spec (docs/ablations.md) into variants, run them, and collect
results.csv, results.md, loss_vs_flops.png and throughput.png into the sweep folder.
Finished variants are skipped; unfinished ones resume from their latest checkpoint."""


def build_parser():
    p = argparse.ArgumentParser(prog="tools/ablate.py", description=USAGE)
    p.add_argument("spec", help="ablation spec (YAML)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true",
                      help="run the variants here, one after another (torchrun for >1 rank)")
    mode.add_argument("--slurm", action="store_true",
                      help="submit one SLURM job array per world size (slurm/pretrain_h100.sh)")
    mode.add_argument("--collect", action="store_true", help="only collect the results")
    mode.add_argument("--dry-run", action="store_true",
                      help="print the variants and their commands; run nothing")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the jobs, then "
                   "collect")
    p.add_argument("--out", default=None, help="sweep folder (default: the spec's out_dir)")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help="restrict to these variant names")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between queue checks")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for every variant")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_intermixed_args(argv)
    if a.wait and not a.slurm:
        print("--wait goes with --slurm", file=sys.stderr)
        return 2
    from .variants import build_variants, check_run_dir
    try:
        spec = load_spec(a.spec)
        out = os.path.abspath(a.out or spec.out_dir)
        variants = build_variants(spec, a.overrides, out)
        if a.only:
            names = {v.name for v in variants}
            unknown = sorted(set(a.only) - names)
            if unknown:
                raise SpecError(f"--only: no variant named {unknown} (variants: "
                                f"{sorted(names)})")
            variants = [v for v in variants if v.name in a.only]
        if not a.dry_run:
            for v in variants:
                check_run_dir(v)
    except SpecError as e:
        print(f"spec error: {e}", file=sys.stderr)
        return 2
    print(f"{spec.name}: {len(variants)} variant(s) in {out}")
    for v in variants:
        print(f"  {v.name}: world {v.world_size}, {v.train_iters} steps, "
              f"{v.flops_per_token:.3g} FLOPs/token, {v.train_iters * v.flops_per_step:.3g} "
              f"training FLOPs{' (finished)' if v.finished() else ''}")
    from . import runner
    if a.dry_run:
        from .runner import train_command
        for v in variants:
            print(shlex.join(train_command(v)))
        return 0
    failed = []
    if a.local:
        failed = runner.run_local(variants)
    elif a.slurm:
        try:
            jobs = runner.submit_slurm(spec, variants, out)
        except (SpecError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not a.wait:
            print(f"submitted {jobs or 'nothing'}; collect later with: tools/ablate.py "
                  f"{a.spec} --collect{' --out ' + a.out if a.out else ''}")
            return 0
        runner.wait_slurm(jobs, a.poll)
    from .results import collect
    res = collect(variants, out, f"Ablation {spec.name}")
    for key in ("csv", "md", "loss_plot", "throughput_plot"):
        print(res[key])
    unfinished = [r["variant"] for r in res["rows"] if r["status"] != "finished"]
    if failed or unfinished:
        print(f"not finished: {sorted(set(failed) | set(unfinished))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
