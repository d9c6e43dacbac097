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

:class:`BalancedSampler` (``data.sampler: balanced``) keeps that contract: its draws with
replacement, ∝ 1/count(class), come from ``(seed, epoch)`` alone as well.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

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


class BalancedSampler(EpochSampler):
    """Class-balanced draws per epoch: ``n`` indices with replacement, index ``i`` drawn with
    probability ∝ ``1 / count(labels[i])``, so every class is expected equally often per epoch.

    The draws are a function of ``(seed, epoch)`` only (a seeded ``torch.multinomial``), so exact
    resume (``skip_first_batches``) and the process-count invariance of :class:`EpochSampler` hold.
    An image drawn twice in one epoch gets the same augmentation both times (it is keyed by
    ``(seed, epoch, index)``).

    Compare ``data.class_balanced`` (``--class-balanced``): that keeps the shuffled order and
    weights the loss by inverse class frequency; this changes *which* images are seen (rare
    classes repeat, common ones are subsampled) and leaves the loss unweighted. Use one or the
    other: both at once over-correct.

    >>> sampler = BalancedSampler([0, 0, 0, 1], seed=0)
    >>> sampler.set_epoch(2)
    >>> draws = list(sampler)
    >>> len(draws), all(d // 4 == 2 for d in draws), draws == list(sampler)
    (4, True, True)
    >>> sampler.weights.tolist()
    [0.3333333432674408, 0.3333333432674408, 0.3333333432674408, 1.0]
    """

    def __init__(self, labels: Sequence[int], seed: int) -> None:
        super().__init__(len(labels), seed, shuffle=True)
        targets = torch.as_tensor(list(labels), dtype=torch.long)
        counts = torch.bincount(targets) if len(targets) else torch.zeros(0, dtype=torch.long)
        self.weights = (1.0 / counts.clamp(min=1).float())[targets]

    def permutation(self) -> np.ndarray:
        """This epoch's draws (not a permutation: indices repeat) as an int64 array."""
        if self.n == 0:
            return np.zeros(0, dtype=np.int64)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -2))
        return torch.multinomial(self.weights, self.n, replacement=True, generator=generator).numpy()


def epoch_sampler(kind: str, labels: Sequence[int], seed: int) -> EpochSampler:
    """The training sampler of ``data.sampler``: ``shuffle`` (:class:`EpochSampler`) or ``balanced``.

    >>> type(epoch_sampler("balanced", [0, 1], seed=0)).__name__, len(epoch_sampler("shuffle", [0, 1], seed=0))
    ('BalancedSampler', 2)
    """
    if kind == "balanced":
        return BalancedSampler(labels, seed)
    if kind == "shuffle":
        return EpochSampler(len(labels), seed)
    raise ValueError(f"unknown sampler `{kind}`; choose shuffle or balanced")


class SeededAugmentation(Dataset):
    """Wraps a dataset: item ``epoch * n + i`` is item ``i`` transformed under seeded RNGs.

    The transform runs with torch's (CPU), Python's and NumPy's global generators seeded from
    :func:`sample_seed` and restored afterwards, so the caller's random streams are untouched.
    Only the CPU generator is seeded (the transforms run on the CPU): ``torch.manual_seed`` also
    queues a seed for every accelerator backend, formatting a stack trace each time while CUDA is
    not initialised (0.2 ms per image, a twentieth of a training step at 32 px on 2 cores), and
    reseeds the CUDA generator -- which ``fork_rng(devices=[])`` does not restore -- once it is.
    The CPU stream is the one ``torch.manual_seed`` sets, so the augmentations are unchanged.
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
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
