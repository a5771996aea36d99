#!/usr/bin/env python
"""Plot a run's training curves: tools/plot_run.py RUN_DIR [--out PNG]."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapeer.training.plots import plot_run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/plots/training.png)")
    a = p.parse_args(argv)
    print(plot_run(a.run_dir, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
