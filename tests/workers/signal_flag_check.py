"""Worker for tests/test_train.py: the trainer's stop flag over two gloo ranks.

Rank 1 "receives" SIGUSR1 (10) before the third call. Every rank prints the answers of
five calls as JSON: the flag is read one call late on several ranks, the same on each.
"""
import json

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
    print(json.dumps({"rank": dist.get_rank(), "seen": seen}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
