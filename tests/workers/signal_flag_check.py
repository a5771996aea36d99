"""Worker for tests/test_train.py: the trainer's stop flag over two gloo ranks.

Rank 1 "receives" SIGUSR1 (10) before the third call. Every rank writes the answers of
five calls to OUT_DIR/rank<r>.json (files: the ranks' stdout lines interleave): the flag
is read one call late on several ranks, the same on each.

    torchrun --nproc_per_node=2 tests/workers/signal_flag_check.py OUT_DIR
"""
import json
import os
import sys

import torch.distributed as dist

from megapeer.training.loop import _SignalFlag


def main():
    dist.init_process_group("gloo")
    flag = _SignalFlag(enabled=False)
    seen = []
    for call in range(5):
        if call == 2 and dist.get_rank() == 1:
            flag.signum = 10
        seen.append(flag.any_rank())
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"rank": dist.get_rank(), "seen": seen}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    from megapeer.train import exit_quickly  # skips ~1 s of interpreter teardown
    exit_quickly(main())
