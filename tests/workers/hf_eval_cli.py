"""Run `megapeer eval` (megapeer.eval.cli.main) with the given arguments, e.g. under
torchrun for data-parallel evaluation."""
import sys

from megapeer.eval.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
