#!/usr/bin/env python
"""CLI for megapeer.convert.cli.export_main (run with --help for the flags)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapeer.convert.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
