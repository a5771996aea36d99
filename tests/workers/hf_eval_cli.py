"""Run `megapeer eval` (megapeer.eval.cli.main) with the given arguments, e.g. under
torchrun for data-parallel evaluation."""
import sys

from megapeer.eval.cli import main

if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main(sys.argv[1:]))
