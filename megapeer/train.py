"""`python -m megapeer.train --config X.yaml [dotted.key=value ...]` (same as `megapeer train`)."""
import argparse
import sys


def build_parser(prog="megapeer train"):
    p = argparse.ArgumentParser(prog=prog, description="Pretrain an MLA + PEER model.")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--resume", default=None,
                   help="auto (latest checkpoint if any), none, or a checkpoint folder "
                        "(overrides checkpoint.resume)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p


def debug_hooks():
    """`kill -USR2 <pid>` prints every thread's Python stack to stderr (a hung rank);
    MEGAPEER_DUMP_STACKS_AFTER=S does it every S seconds."""
    import faulthandler
    import os
    import signal
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # USR1: checkpoint and stop
    every = os.environ.get("MEGAPEER_DUMP_STACKS_AFTER")
    if every:
        try:
            seconds = float(every)
        except ValueError:
            seconds = 0.0
        if not seconds > 0:
            raise SystemExit(f"MEGAPEER_DUMP_STACKS_AFTER={every!r}: expected a positive "
                             "number of seconds")
        faulthandler.dump_traceback_later(seconds, repeat=True)


def main(argv=None, prog="megapeer train"):
    args = build_parser(prog).parse_args(argv)
    debug_hooks()
    from .config import ConfigError, load_config
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .training.loop import NonFiniteError, train
    try:
        train(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def exit_quickly(code):
    """sys.exit(code) for a process that is done: gc.freeze() first, so that the
    interpreter's last collections skip the ~450k objects of torch, Dynamo and
    Megatron-Core (~0.9 of the ~1.3 s that exiting took on a CI core)."""
    import gc
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    exit_quickly(main())
