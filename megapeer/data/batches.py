"""Micro-batches for one data-parallel rank, resumable from a sample count.

Megatron's pretraining-sampler convention: the global stream of sample indices is consumed
in order, in chunks of micro_batch_size * dp_size; rank r takes the r-th contiguous slice of
each chunk. consumed_samples counts the global stream, so a run resumed with the saved count
continues with the next unseen sample. Past the end of the dataset the stream wraps around
(index modulo length), so it never runs dry.
"""
import torch

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _collate(samples):
    out = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in KEYS}
    for k in ("tokens", "labels", "position_ids"):
        out[k] = out[k].to(torch.int64)
    out["loss_mask"] = out["loss_mask"].to(torch.float32)
    return out


class _IndexStream:
    """Infinite batch sampler: this rank's indices for each chunk from `start` on."""

    def __init__(self, start, n, mbs, dp_rank, dp_size):
        self.start, self.n, self.mbs, self.dp_rank, self.dp_size = start, n, mbs, dp_rank, dp_size

    def __iter__(self):
        pos = self.start
        while True:
            base = pos + self.dp_rank * self.mbs
            yield [(base + j) % self.n for j in range(self.mbs)]
            pos += self.mbs * self.dp_size


class BatchIterator:
    """Iterator of dicts of CPU tensors: tokens, labels, position_ids [b, s] int64 and
    loss_mask [b, s] float32. num_workers > 0 reads ahead in DataLoader worker processes
    (same batches, same order)."""

    def __init__(self, dataset, micro_batch_size, consumed_samples=0, dp_rank=0, dp_size=1,
                 num_workers=0):
        if dataset is None or len(dataset) == 0:
            raise ValueError("BatchIterator: the dataset is empty")
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"BatchIterator: bad micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"BatchIterator: consumed_samples={consumed_samples} < 0")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        stream = _IndexStream(consumed_samples, len(dataset), micro_batch_size, dp_rank, dp_size)
        if num_workers > 0:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=stream,
                                                 num_workers=num_workers, collate_fn=_collate)
            self._batches = iter(loader)
        else:
            self._batches = (_collate([dataset[i] for i in idx]) for idx in stream)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def state_dict(self):
        return {"consumed_samples": self.consumed_samples}
