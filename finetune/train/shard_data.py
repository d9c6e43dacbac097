"""Training on WebDataset shards (``--data wds:…``): the split from the shard index and the two loaders.

The rules of the stream (splitting over processes and loader workers, shuffling, fixed epoch
length, padding) are :mod:`finetune.data.shard_stream`'s. What a shard run can and cannot do:

* **Resume.** Exact at epoch boundaries: an epoch's batches are a function of ``(seed, epoch)``, the
  number of processes and of loader workers (``data.num_workers``: keep it when resuming). Mid-epoch
  (a checkpoint of ``--checkpoint-every``, or a preempted run) resumes at the same batch: the
  batches already consumed are read again and discarded, so the rest of the epoch is the one an
  uninterrupted run would have seen, at the cost of decoding them once more.
* **Random access.** Shards are read as streams: ``data.sampler: balanced`` and
  ``check_images: lazy`` are refused with a one-line reason; the frozen-feature cache of head-only
  epochs is off (the backbone runs every epoch, said at the start); ``--class-balanced`` (loss
  weights from the index's class counts) works.
* **Outputs.** ``log.csv``, ``metrics.json``, ``model.safetensors``, ``report.html`` as a folder run
  (the report's gallery of wrong images is empty: the images are inside the tars).

>>> from finetune.config import Recipe
>>> check_shard_recipe(Recipe(data="wds:shards", sampler="balanced"))
Traceback (most recent call last):
...
finetune.errors.FinetuneError: data.sampler balanced draws images by index, which shards streamed in order cannot give; use --class-balanced (loss weights from the shard index's class counts) instead
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from finetune.config import Recipe
from finetune.data import FolderSplit, build_transform, draft_size
from finetune.data.shard_stream import ShardLoader, ShardStream, check_shard
from finetune.data.shards import resolve_shards, split_from_source
from finetune.errors import FinetuneError

__all__ = ["check_shard_recipe", "shard_loaders", "shard_split"]


def check_shard_recipe(recipe: Recipe) -> None:
    """One-line errors for what needs random access to the images or files on disk."""
    if recipe.data.sampler == "balanced":
        raise FinetuneError("data.sampler balanced draws images by index, which shards streamed in order cannot "
                            "give; use --class-balanced (loss weights from the shard index's class counts) instead")
    if recipe.data.check_images == "lazy":
        raise FinetuneError("check_images lazy: `finetune shard` already decoded every image when it wrote the "
                            "shards (skipped files are in the index); drop --check-images lazy")
    if recipe.data.labels:
        raise FinetuneError("data.labels: shards carry their labels (`cls`); pass the manifest to "
                            "`finetune shard SRC --labels FILE` instead")
    if recipe.distill.teacher is not None:
        raise FinetuneError("distillation re-labels validation images by path, which shards do not have; "
                            "distil from the image folder")


def shard_split(recipe: Recipe) -> FolderSplit:
    """The split of ``data.root`` (+ ``data.val_root``) shards, from the index; the first sample of every
    shard is read to check it has an image and a ``cls`` (one-line error otherwise)."""
    check_shard_recipe(recipe)
    train = resolve_shards(recipe.data.root, "train")
    val = resolve_shards(recipe.data.val_root or f"wds:{train.directory}", "val")
    for url in [*train.urls, *val.urls]:
        check_shard(url)
    split = split_from_source(train, val)
    split.shards = (train, val)
    return split


def shard_loaders(recipe: Recipe, split: FolderSplit, data_config: dict, accelerator: Accelerator,
                  workers: int) -> tuple[ShardLoader, ShardLoader]:
    """The training and validation :class:`~finetune.data.shard_stream.ShardLoader` of this process
    (not passed through ``accelerator.prepare``: each process already reads its own shards)."""
    train, val = split.shards
    aug = recipe.augment
    train_tf = build_transform(data_config, train=True, scale=(aug.scale, 1.0), hflip=aug.hflip,
                               auto_augment=aug.timm_auto_augment, re_prob=aug.random_erasing)
    eval_tf = build_transform(data_config, train=False)
    size = tuple(eval_tf(_blank(data_config)).shape)
    common = dict(batch_size=recipe.data.batch_size, seed=recipe.runtime.seed, rank=accelerator.process_index,
                  processes=accelerator.num_processes, draft_size=draft_size(data_config), pad_shape=size)
    pin = torch.cuda.is_available()
    train_loader = ShardLoader(ShardStream(train.urls, train.counts, train=True, transform=train_tf, **common),
                               num_workers=workers, device=accelerator.device, pin_memory=pin)
    # validation: one slot per process (no workers), so each process's share is known from the index
    val_loader = ShardLoader(ShardStream(val.urls, val.counts, train=False, transform=eval_tf, **common),
                             num_workers=0, device=accelerator.device, pin_memory=pin)
    return train_loader, val_loader


def _blank(data_config: dict):  # noqa: ANN202 -- a PIL image
    from PIL import Image

    return Image.new("RGB", tuple(data_config["input_size"][-2:]))
