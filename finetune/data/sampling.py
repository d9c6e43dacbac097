"""Training order and augmentation as pure functions of (seed, epoch, image index).

PyTorch's usual pipeline draws augmentation parameters from whichever RNG stream happens to run
the transform: the main process's or each worker's, shifted by everything that ran before. That
makes a run depend on the number of workers, on how many processes share the data and on where
it was interrupted. Here the shuffled order of an epoch comes from ``(seed, epoch)`` alone and
each image's augmentation from ``(seed, epoch, index)`` alone, so:

* resuming mid-epoch only has to skip the batches already consumed (``skip_first_batches``),
  and the rest of the epoch sees exactly the images and augmentations it would have seen;
* 1 process with batch 32 and 2 processes with batch 16 each see the same 32 images with the
  same augmentations in every optimizer step (accelerate hands batch 2k to rank 0 and 2k+1 to
  rank 1), so their updates agree up to floating-point reduction order;
* the number of DataLoader workers does not change the result.

The sampler encodes the epoch into the index it yields (``epoch * n + i``), so the dataset
learns the epoch even inside persistent worker processes that never see ``set_epoch``.

>>> sampler = EpochSampler(4, seed=0)
>>> sampler.set_epoch(1)
>>> sorted(i % 4 for i in sampler), all(i // 4 == 1 for i in sampler)
([0, 1, 2, 3], True)
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one image's augmentation in one epoch (a fixed mix of the three)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) & _MASK


class EpochSampler(Sampler[int]):
    """A shuffled order per epoch from ``(seed, epoch)``; yields ``epoch * n + index``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> np.ndarray:
        """This epoch's order as an int64 array (8 bytes per image; a list of ints takes 36)."""
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return torch.randperm(self.n, generator=generator).numpy()

    def order(self) -> list[int]:
        return self.permutation().tolist()

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.n
        return (base + int(i) for i in self.permutation())

    def __len__(self) -> int:
        return self.n


class SeededAugmentation(Dataset):
    """Wraps a dataset: item ``epoch * n + i`` is item ``i`` transformed under seeded RNGs.

    The transform runs with torch's, Python's and NumPy's global generators seeded from
    :func:`sample_seed` and restored afterwards, so the caller's random streams are untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.dataset))
        seed = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
