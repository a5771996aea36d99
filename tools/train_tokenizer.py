#!/usr/bin/env python
"""CLI for megapeer.data.train_tokenizer (run with --help for the flags)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapeer.data.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
