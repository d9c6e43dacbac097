"""Reading WebDataset shards for training and validation: a seeded stream per process and loader worker.

Why the ``webdataset`` library and not timm's ``wds`` reader (``timm/data/readers/reader_wds.py``):
timm's reader needs its own ``_info.json``, takes the process rank from ``torch.distributed`` rather
than from accelerate, seeds the sample shuffle buffer from the loader worker's seed (which changes
from run to run and is not a function of the epoch, so nothing resumes exactly), skips unreadable
samples silently (``log_and_continue``) and is built into timm's dataset/transform factory, not a
plain ``IterableDataset``. Here webdataset's building blocks (``SimpleShardList``,
``tarfile_to_samples``, ``shuffle``, in a ``DataPipeline``) read the tars, and the choices that make
a run reproducible are ours:

* **Splitting.** The loader workers of all processes are ``S = processes × workers`` slots; slot
  ``rank × workers + worker`` reads shards ``order[slot::S]`` of the epoch's shard order. With fewer
  shards than slots every slot reads every shard and keeps samples ``i ≡ slot (mod S)``.
* **Shuffling.** Training: the shard order comes from ``(seed, epoch)``, the shuffle buffer
  (``shuffle_buffer`` samples) from ``(seed, epoch, slot)``, each image's augmentation from
  ``(seed, epoch, slot, position)``. Validation reads in order, unshuffled.
* **Fixed epoch length.** Every process runs ``ceil(N / (processes × batch))`` steps of full
  batches of ``batch`` images per epoch (``N`` from the index), so all processes step together. A
  slot that runs out before its share starts its shards again (in a new seeded order) -- these
  repeats pad the epoch, at most ``batch - 1`` images per slot beyond an even share when the shards
  are even; a slot with more images than its share stops early (others' shortfall and this surplus
  differ from epoch to epoch, as the shard order does). Validation sees every image exactly once:
  each process's stream is padded with blank images labelled :data:`PAD_LABEL` to the same number
  of full batches, and :func:`finetune.train.loop.gather_logits` drops those after gathering.

So an epoch's batches are a function of ``(seed, epoch, processes, workers)``: resuming at an epoch
boundary is exact, and resuming mid-epoch (:meth:`ShardLoader.skip`) reads and discards the batches
already consumed, which is exact as well (same number of processes and workers) at the cost of
decoding them again.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> from finetune.data.folder import scan_folder
>>> from finetune.data.shards import resolve_shards, write_shards
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("cat", "dog"):
...     (root / name).mkdir()
...     for i in range(5):
...         Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / name / f"{i}.png")
>>> _ = write_shards(scan_folder(root, val_fraction=0.2, seed=0), root / "s", shard_size="1KB")
>>> source = resolve_shards(f"wds:{root}/s")
>>> import torchvision.transforms.functional as F
>>> stream = ShardStream(source.urls, source.counts, batch_size=4, seed=0, train=True, transform=F.to_tensor)
>>> stream.set_epoch(1)
>>> [(tuple(images.shape), tuple(labels.shape)) for images, labels in stream]   # ceil(8 / 4) full batches
[((4, 3, 8, 8), (4,)), ((4, 3, 8, 8), (4,))]
"""

from __future__ import annotations

import io
import math
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from finetune.data.files import IMAGE_EXTENSIONS
from finetune.data.images import load_rgb
from finetune.data.sampling import sample_seed
from finetune.data.shards import webdataset_module
from finetune.errors import FinetuneError

__all__ = ["PAD_LABEL", "ShardLoader", "ShardStream", "check_shard", "rank_counts"]

#: Label of the blank images that pad a process's validation stream (dropped after gathering).
PAD_LABEL = -100
_EXTS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))


def _slot_shards(counts: Sequence[int], slot: int, slots: int, order: Sequence[int]) -> tuple[list[int], bool]:
    """(shard indices slot ``slot`` reads, whether it keeps only every ``slots``-th sample)."""
    if len(counts) >= slots:
        return list(order[slot::slots]), False
    return list(order), True


def rank_counts(counts: Sequence[int], processes: int) -> list[int]:
    """Images each process reads in one unshuffled pass (validation: one loader slot per process).

    >>> rank_counts([5, 3, 4], 2), rank_counts([7], 2)
    ([9, 3], [4, 3])
    """
    order = list(range(len(counts)))
    out = []
    for rank in range(processes):
        shards, modulo = _slot_shards(counts, rank, processes, order)
        total = sum(counts[i] for i in shards)
        out.append(len(range(rank, total, processes)) if modulo else total)
    return out


def check_shard(url: str) -> None:
    """Read the first sample of ``url``: it must have an image and a ``cls`` (one-line error if not).

    >>> check_shard("/nonexistent.tar")
    Traceback (most recent call last):
    ...
    finetune.errors.FinetuneError: cannot read shard `/nonexistent.tar` ([Errno 2] No such file or directory: '/nonexistent.tar')
    """
    wds = webdataset_module()

    try:
        first = next(iter(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())), None)
    except Exception as exc:  # noqa: BLE001 -- any reader failure, said in one line
        raise FinetuneError(f"cannot read shard `{url}` ({str(exc).splitlines()[0]})") from None
    if first is None:
        raise FinetuneError(f"shard `{url}` holds no samples; write the shards again with `finetune shard`")
    _image_key(first)
    _label(first)


def _image_key(sample: dict[str, Any]) -> str:
    for ext in _EXTS:
        if ext in sample:
            return ext
    raise FinetuneError(f"sample `{sample.get('__key__')}` of shard `{sample.get('__url__')}` has no image "
                        f"({'/'.join(_EXTS)}); its fields are {sorted(k for k in sample if not k.startswith('__'))}")


def _label(sample: dict[str, Any]) -> int:
    if "cls" not in sample:
        raise FinetuneError(f"sample `{sample.get('__key__')}` of shard `{sample.get('__url__')}` has no `cls` "
                            "(class index); write the shards with `finetune shard`")
    return int(sample["cls"])


class ShardStream(IterableDataset):
    """Batches ``(images, labels)`` from shards for one process (see the module docstring for the rules).

    ``counts`` are the shards' sample counts from the index; ``transform`` maps a PIL image to a
    tensor; ``rank``/``processes`` are accelerate's. ``__len__`` is the number of batches per epoch.
    Call :meth:`set_epoch` before each epoch (loader workers are forked anew for every epoch).
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], *, batch_size: int, seed: int, train: bool,
                 transform: Callable | None = None, rank: int = 0, processes: int = 1, shuffle_buffer: int = 1000,
                 draft_size: int | None = None, pad_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.urls, self.counts = list(urls), [int(c) for c in counts]
        self.batch_size, self.seed, self.train, self.transform = batch_size, seed, train, transform
        self.rank, self.processes, self.shuffle_buffer = rank, processes, shuffle_buffer
        self.draft_size, self.pad_shape, self.epoch = draft_size, pad_shape, 0
        total = sum(self.counts)
        if train:
            self.batches = max(1, math.ceil(total / (processes * batch_size)))
        else:
            self.batches = max(math.ceil(n / batch_size) for n in rank_counts(self.counts, processes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def _raw(self, slot: int, slots: int, round_: int) -> Iterator[dict[str, Any]]:
        """One pass of the slot's samples (shuffled when training)."""
        wds = webdataset_module()

        order = list(range(len(self.urls)))
        if self.train:
            random.Random(f"{self.seed}/{self.epoch}/shards/{round_}").shuffle(order)
        shards, modulo = _slot_shards(self.counts, slot, slots, order)
        stages: list[Any] = [wds.SimpleShardList([self.urls[i] for i in shards]), wds.tarfile_to_samples()]
        if modulo:
            stages.append(lambda samples: (s for i, s in enumerate(samples) if i % slots == slot))
        if self.train:
            rng = random.Random(f"{self.seed}/{self.epoch}/{slot}/{round_}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        return iter(wds.DataPipeline(*stages))

    def _decode(self, sample: dict[str, Any], key: int) -> tuple[Any, int]:
        label = _label(sample)
        image = load_rgb(io.BytesIO(sample[_image_key(sample)]), draft_size=self.draft_size)
        if self.transform is None:
            return image, label
        if not self.train:
            return self.transform(image), label
        seed = sample_seed(self.seed, self.epoch, key)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # as SeededAugmentation: the caller's streams untouched
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            try:
                return self.transform(image), label
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _samples(self, slot: int, slots: int, quota: int) -> Iterator[tuple[Any, int]]:
        position = 0
        if not self.train:
            for sample in self._raw(slot, slots, 0):
                yield self._decode(sample, position)
                position += 1
            for _ in range(quota - position):
                yield torch.zeros(self.pad_shape), PAD_LABEL
            return
        round_ = 0
        while position < quota:
            before = position
            for sample in self._raw(slot, slots, round_):
                if position >= quota:
                    return
                yield self._decode(sample, (slot << 40) + position)
                position += 1
            if position == before:
                raise FinetuneError(f"loader slot {slot} of {slots} got no images from its shards; "
                                    "use fewer loader workers or write smaller shards")
            round_ += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slot, slots = self.rank * workers + worker, self.processes * workers
        my_batches = self.batches // workers + (worker < self.batches % workers)
        batch: list[tuple[Any, int]] = []
        for item in self._samples(slot, slots, my_batches * self.batch_size):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []


class ShardLoader:
    """A :class:`ShardStream` in a ``DataLoader`` (``batch_size=None``: the stream batches), moving each
    batch to ``device``. Has what the training loop asks of a loader: ``len``, ``set_epoch`` and
    :meth:`skip` (mid-epoch resume); ``padded`` tells :func:`~finetune.train.loop.gather_logits` to
    drop :data:`PAD_LABEL` samples.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, device: torch.device | str = "cpu",
                 pin_memory: bool = False) -> None:
        self.stream, self.device, self.skipped = stream, torch.device(device), 0
        self.padded = not stream.train
        # not persistent: workers are forked per epoch, so they see the epoch set_epoch gave the stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def skip(self, batches: int) -> "ShardLoader":
        """This loader, passing over the first ``batches`` batches of the epoch (read and discarded)."""
        view = ShardLoader.__new__(ShardLoader)
        view.__dict__.update(self.__dict__, skipped=batches)
        return view

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (images, labels) in enumerate(self.loader):
            if i >= self.skipped:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
