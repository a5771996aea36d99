#!/usr/bin/env python
"""Ablation sweeps: tools/ablate.py SPEC.yaml --local | --slurm [--wait] | --collect | --dry-run.

Spec format and outputs: docs/ablations.md. Run from the repository root.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapeer.ablate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
