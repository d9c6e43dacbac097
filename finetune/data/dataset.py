"""Images as a torch dataset: :class:`ImageDataset`, timm's transforms, the eval loader, class weights.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
>>> Image.new("RGB", (40, 50)).save(p)
>>> cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
>>> image, label = ImageDataset([Sample(p, 0)], build_transform(cfg, train=False))[0]
>>> tuple(image.shape), label
((3, 32, 32), 0)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import timm.data
import torch

from finetune.data.folder import Sample
from finetune.data.images import failure_reason, load_rgb
from finetune.data.skiplog import SkipLog
from finetune.errors import FinetuneError

__all__ = ["BadImageWarning", "FiveCrop", "ImageDataset", "PathTable", "build_transform", "class_weights", "draft_size",
           "eval_loader"]


class PathTable(Sequence[Path]):
    """Paths packed into one ``bytes`` buffer with NumPy offsets: an immutable sequence of ``Path``.

    About ``len(path) + 8`` bytes per path, where a list of ``Path`` objects takes some 400; the
    ``Path`` is made when an item is read. Pickles as two buffers (quick to hand to spawned workers).

    >>> table = PathTable(["a/b.png", Path("c.jpg")])
    >>> len(table), table[1], list(table) == [Path("a/b.png"), Path("c.jpg")]
    (2, PosixPath('c.jpg'), True)
    """

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        encoded = [os.fsencode(p) for p in paths]  # any file name: undecodable bytes round-trip
        self._data = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):  # noqa: ANN001 -- int or slice, as for a list
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} paths")
        index %= n
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return Path(os.fsdecode(self._data[start:end]))

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths)"


def _load(path: Path, draft_size: int | None) -> object:
    """A file's image, or a Hugging Face data-set row's (its :func:`~finetune.data.hf.row_path`)."""
    if os.fspath(path).startswith("hf:"):
        from finetune.data.hf import load_row

        return load_row(path, draft_size=draft_size)
    return load_rgb(path, draft_size=draft_size)


class BadImageWarning(UserWarning):
    """An image failed to load during training and another sample was used instead."""


class ImageDataset(torch.utils.data.Dataset):
    """``(transform(load_rgb(path)), label)`` pairs from :class:`~finetune.data.folder.Sample` s or bare paths.

    Bare paths get label -1. If a file fails to load (it changed on disk after scanning, or
    nothing was decoded up front: ``check_images: lazy``), the default for samples
    (``on_error="substitute"``) is not to crash the epoch: a :class:`BadImageWarning` is issued
    once per file (per worker process), the file is recorded in ``skip_log`` if one is given
    (:class:`~finetune.data.skiplog.SkipLog`: it reaches the main process from loader workers
    too), and the next loadable index (wrapping around) is returned instead; the file is not
    retried. For bare paths (prediction) the default is ``on_error="raise"``: a
    :class:`FinetuneError` naming the file, since a substitute would be reported under the
    wrong path.

    Memory: ``paths`` is a :class:`PathTable` and ``labels`` a NumPy array -- about the path's length
    plus 16 bytes per image, with no Python object per image. DataLoader workers forked from the
    training process then share these pages for good: reading an object bumps its reference count,
    which copies its page into the worker, so a list of ``Path`` objects ended up copied once per
    worker (about 230 bytes per image each).

    Exact resume holds with substitutes: what index ``i`` returns is the first loadable index
    from ``i`` on, a function of ``i`` and of which files fail, not of what this process tried
    before (the set of known-bad files only saves retries), and the augmentation is seeded by
    the requested ``(epoch, i)`` (:class:`~finetune.data.sampling.SeededAugmentation`). So as
    long as the same files fail, the batches after a resume are the ones an uninterrupted run
    would have seen.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
    >>> Image.new("RGB", (8, 8)).save(p)
    >>> ds = ImageDataset([Sample(p, 3)], transform=lambda im: im.size)
    >>> ds[0]
    ((8, 8), 3)
    """

    def __init__(
        self,
        items: Sequence[Sample] | Sequence[str | os.PathLike],
        transform: Callable | None = None,
        *,
        draft_size: int | None = None,
        on_error: str | None = None,
        skip_log: SkipLog | None = None,
    ) -> None:
        items = list(items)
        if all(isinstance(x, Sample) for x in items):
            self.paths = PathTable(s.path for s in items)
            self.labels = np.fromiter((s.label for s in items), dtype=np.int64, count=len(items))
            default = "substitute"
        elif all(isinstance(x, (str, os.PathLike)) for x in items):
            self.paths = PathTable(items)
            self.labels = np.full(len(items), -1, dtype=np.int64)
            default = "raise"
        else:
            raise TypeError("items must be all Sample objects or all paths")
        on_error = on_error or default
        if on_error not in ("substitute", "raise"):
            raise ValueError(f"on_error must be 'substitute' or 'raise', got {on_error!r}")
        self.transform = transform
        self.draft_size = draft_size
        self.on_error = on_error
        self.skip_log = skip_log
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[object, int]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                img = _load(self.paths[i], self.draft_size)
            except Exception as exc:  # noqa: BLE001 -- any decoder failure
                if self.on_error == "raise":
                    raise FinetuneError(
                        f"cannot load `{self.paths[i]}` ({failure_reason(exc)}); it changed on disk "
                        "after it was listed: fix or remove it and run again"
                    ) from exc
                self._bad.add(i)
                if self.skip_log is not None:
                    self.skip_log.record(self.paths[i], failure_reason(exc))
                warnings.warn(
                    f"cannot load `{self.paths[i]}` ({failure_reason(exc)}); using another image "
                    "in its place for the rest of this run",
                    BadImageWarning,
                    stacklevel=2,
                )
                continue
            return (self.transform(img) if self.transform else img), int(self.labels[i])
        raise FinetuneError(
            f"none of the {n} images of the dataset can be loaded (e.g. `{self.paths[index]}`); "
            "check that the data folder is still there"
        )


# --------------------------------------------------------------------------- transforms, weights


def build_transform(
    data_config: dict,
    train: bool,
    img_size: int | None = None,
    scale: tuple[float, float] = (0.25, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = None,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
) -> Callable:
    """timm's transform for a model's data config (``timm.data.resolve_data_config``).

    Training: random-resized crop with ``scale``, horizontal flip with probability
    ``hflip``, optional colour jitter, auto-augment (e.g. ``"rand-m9-mstd0.5"``) and random
    erasing with probability ``re_prob``.
    Eval: resize by ``crop_pct`` and centre crop -- deterministic. ``img_size`` overrides
    the config's input size (square). Input is a PIL RGB image, output a CHW float tensor.

    >>> from PIL import Image
    >>> cfg = dict(input_size=(3, 224, 224), interpolation="bilinear",
    ...            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875)
    >>> tf = build_transform(cfg, train=False, img_size=32)
    >>> tuple(tf(Image.new("RGB", (40, 50))).shape)
    (3, 32, 32)
    """
    missing = [k for k in ("input_size", "interpolation", "mean", "std") if k not in data_config]
    if missing:
        raise ValueError(
            f"data_config lacks {missing}; build it with timm.data.resolve_data_config"
        )
    input_size = tuple(data_config["input_size"])
    if img_size is not None:
        if int(img_size) != img_size or img_size < 1:
            raise FinetuneError(f"img_size must be a positive integer, got `{img_size}`")
        input_size = (input_size[0], int(img_size), int(img_size))
    kwargs: dict = dict(
        input_size=input_size,
        is_training=train,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
    )
    if train:
        lo, hi = scale
        if not 0 < lo <= hi <= 1:
            raise FinetuneError(f"scale must be (min, max) with 0 < min <= max <= 1, got `{scale}`")
        if not 0 <= hflip <= 1:
            raise FinetuneError(f"hflip is a probability in [0, 1], got `{hflip}`")
        if color_jitter is not None and color_jitter < 0:
            raise FinetuneError(f"color_jitter must be >= 0 or None, got `{color_jitter}`")
        kwargs.update(
            scale=(float(lo), float(hi)),
            hflip=hflip,
            color_jitter=color_jitter or None,
            auto_augment=auto_augment or None,
            re_prob=float(re_prob),
        )
    return timm.data.create_transform(**kwargs)


class FiveCrop:
    """The eval transform with its centre crop replaced by five crops (four corners and the centre, in
    torchvision's order): what the eval transform resizes to (``img_size / crop_pct``, timm's rule) is
    cut into five ``img_size`` crops, each converted and normalised as usual; output ``[5, C, H, W]``.
    The last crop is the plain eval view.

    >>> from PIL import Image
    >>> cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
    >>> plain, five = build_transform(cfg, train=False), FiveCrop(build_transform(cfg, train=False))
    >>> image = Image.effect_noise((40, 50), 64).convert("RGB")
    >>> crops = five(image)
    >>> tuple(crops.shape), bool((crops[4] == plain(image)).all()), bool((crops[0] == crops[4]).all())
    ((5, 3, 32, 32), True, False)
    """

    def __init__(self, eval_transform: Callable) -> None:
        from torchvision import transforms

        steps = list(getattr(eval_transform, "transforms", []))
        at = next((i for i, t in enumerate(steps) if type(t).__name__ in ("CenterCrop", "CenterCropOrPad")), None)
        if at is None:
            raise FinetuneError("five-crop test-time augmentation needs an eval transform with a centre crop "
                                f"(got {eval_transform!r})")
        size = steps[at].size
        self.before = transforms.Compose(steps[:at])
        self.crop = transforms.FiveCrop(size)
        self.after = transforms.Compose(steps[at + 1:])

    def __call__(self, image: object) -> torch.Tensor:
        return torch.stack([self.after(crop) for crop in self.crop(self.before(image))])


def draft_size(data_config: dict) -> int:
    """JPEG draft size for a model's input: twice its side, so crops and resizes keep full detail.

    >>> draft_size({"input_size": (3, 96, 96)})
    192
    """
    return 2 * int(max(data_config["input_size"][-2:]))


def eval_loader(items: Sequence[Sample] | Sequence[str | os.PathLike], data_config: dict,
                batch_size: int = 64, num_workers: int = 0, five_crop: bool = False) -> torch.utils.data.DataLoader:
    """Deterministic, in-order loader with the model's eval transform (JPEG draft decoding on); with
    ``five_crop`` each image is a ``[5, C, H, W]`` stack of crops (:class:`FiveCrop`).

    >>> loader = eval_loader([], {"input_size": (3, 32, 32), "interpolation": "bilinear",
    ...                           "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    >>> len(loader)
    0
    """
    transform = build_transform(data_config, train=False)
    dataset = ImageDataset(items, FiveCrop(transform) if five_crop else transform, draft_size=draft_size(data_config))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (float32), normalised to mean 1.

    Classes with no samples get weight 1 (they never weight a loss term), which keeps the
    mean at 1 over all classes.

    >>> from pathlib import Path
    >>> s = [Sample(Path("a"), 0)] * 3 + [Sample(Path("b"), 1)]
    >>> class_weights(s, 2).tolist()
    [0.5, 1.5]
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("class_weights needs at least one sample")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.ones(num_classes, dtype=torch.float64)
    present = counts > 0
    inverse = 1.0 / counts[present]
    weights[present] = inverse / inverse.mean()
    return weights.float()
