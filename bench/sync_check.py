"""Where a training run makes the host wait for the GPU: synchronising calls per call site.

    python3 bench/sync_check.py <megapeer train arguments>

Runs `megapeer train` in this process under torch.cuda.set_sync_debug_mode("warn") and
prints every call site (the innermost megapeer / Megatron frames) that synchronised, with
its count. A site counted once per step (or per micro-batch) stalls the GPU every step:
the GPU drains its queue and idles until the host launches again. Expected ones: the
loss read back every logging.log_interval steps, evaluation, checkpoints.
Needs a CUDA GPU.
"""
import collections
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OURS = (os.sep + "megapeer" + os.sep, os.sep + "megatron" + os.sep)


def main(argv):
    if not torch.cuda.is_available():
        print("sync_check needs a CUDA GPU", file=sys.stderr)
        return 2
    sites = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if any(o in f.filename for o in OURS)]
        where = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in frames[::-1][:3])
        sites[where or f"{_short(filename)}:{lineno}"] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    add_filter = warnings.filterwarnings

    def keep_sync_warnings(*args, **kwargs):   # the trainer ignores Megatron's warnings
        add_filter(*args, **kwargs)
        add_filter("always", message=".*synchroniz")

    warnings.filterwarnings = keep_sync_warnings
    from megapeer.train import main as train_main
    torch.cuda.set_sync_debug_mode("warn")
    try:
        rc = train_main(argv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning, warnings.filterwarnings = show, add_filter
    print(f"\nsynchronising call sites ({sum(sites.values())} calls):")
    for where, n in sites.most_common():
        print(f"{n:7d}  {where}")
    return rc


def _short(path):
    for o in OURS:
        if o in path:
            return o.strip(os.sep) + os.sep + path.split(o, 1)[1]
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
