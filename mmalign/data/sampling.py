"""Deterministic global batching.

The order of samples is a function of (seed, epoch) only, and every sample gets a seed of
its own from its global position. A process takes its slice of each global micro-batch, so
a 2-process run sees exactly the samples (and draws exactly the noise) of a 1-process run
with twice the batch, and a resumed run picks up at the step it stopped at.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class GlobalBatchSampler:
    def __init__(
        self, n: int, batch_size: int, world: int, rank: int, seed: int, start_micro_step: int = 0, shuffle: bool = True
    ):
        if n <= 0:
            raise ValueError("empty dataset")
        self.n, self.bs, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.micro_step, self.shuffle = start_micro_step, shuffle
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7_368_787 + epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._epoch = epoch
        return self._perm

    def __iter__(self):
        while True:
            start = (self.micro_step * self.world + self.rank) * self.bs
            batch = []
            for pos in range(start, start + self.bs):
                epoch, k = divmod(pos, self.n)
                batch.append((int(self._order(epoch)[k]), self.seed * 1_000_003 + pos))
            self.micro_step += 1
            yield batch


class Seeded(Dataset):
    """Wraps a dataset so that items are fetched by (index, seed) and carry their seed."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        i, seed = key
        item = dict(self.ds[i])
        item["seeds"] = torch.tensor(seed, dtype=torch.long)
        return item
