"""Frozen-feature cache: while only the head trains, run the backbone once per image, not per epoch.

In a head-only phase (``strategy probe``, the first epoch of ``finetune``/``gradual``) with
BatchNorm statistics frozen, the backbone is a fixed function: its pooled features
(``forward_head(forward_features(x), pre_logits=True)`` in eval mode) depend only on the image
and its augmentation. They are computed once and the head (dropout + classifier) trains on them.

Augmented views: training augmentation is a function of (seed, epoch, index)
(:mod:`finetune.data.sampling`). With ``views`` = V, head epoch *k* (counted from 1) uses the
augmentation of epoch ``(k - 1) % V + 1``, so the first V head epochs see exactly what they would
see without the cache, and later ones cycle through those V views. Validation features (the
deterministic eval transform) are computed once.

Features are also kept on disk under ``$FINETUNE_CACHE/features/`` keyed by a SHA-256 of the
architecture, the backbone's weights, the transform, the data files (path, size, mtime), the
seed and the view, so a second probe of the same data (another LR, more epochs) starts from
them; any change to model, weights, transform or data gives a new key.

>>> import timm
>>> net = timm.create_model("mobilenetv3_small_050", num_classes=3)
>>> cache_unusable_reason(net, freeze_bn=True, mixes=False, distills=False, lora=False) is None
True
>>> cache_unusable_reason(net, freeze_bn=True, mixes=True, distills=False, lora=False)
'mixup/cutmix mix images, not features'
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from finetune.data.hf import split_fingerprint
from finetune.io import save_weights
from finetune.data import ImageDataset
from finetune.data.sampling import EpochSampler, SeededAugmentation
from finetune.models.weights import cache_dir


def cache_unusable_reason(model: nn.Module, *, freeze_bn: bool, mixes: bool, distills: bool,
                          lora: bool) -> str | None:
    """Why head-only epochs cannot train from cached features, or ``None`` when they can."""
    if not freeze_bn:
        return "BatchNorm statistics train (bn=train), so the backbone changes during head epochs"
    if mixes:
        return "mixup/cutmix mix images, not features"
    if distills:
        return "distillation needs the student's own forward pass"
    if lora:
        return "LoRA trains inside the backbone"
    if not all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier")):
        return f"{type(model).__name__} has no timm forward_features/forward_head"
    return None


class HeadOnly(nn.Module):
    """The part of a timm model after ``pre_logits``: dropout, then the classifier (shared parameters)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.classifier = model.get_classifier()
        self.dropout = nn.Dropout(float(getattr(model, "drop_rate", 0.0) or 0.0))

    def get_classifier(self) -> nn.Module:
        """The shared classifier (timm's name for it, so optimiser helpers find the head)."""
        return self.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled backbone features."""
        return self.classifier(self.dropout(features))


class _Keyed(Dataset):
    """Rows of a feature matrix addressed by the sampler's ``epoch * n + index`` keys."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(key) % len(self.labels)
        return self.features[index], self.labels[index]


class FeatureCache:
    """Pooled backbone features of the training views and of the validation set."""

    def __init__(self, model: nn.Module, train: ImageDataset, val: ImageDataset, *, seed: int, views: int,
                 batch_size: int, memory_format: torch.memory_format, device: torch.device,
                 description: str, root: Path | None = None) -> None:
        self.model, self.train, self.val = model, train, val
        self.seed, self.views, self.batch_size = seed, max(1, views), batch_size
        self.memory_format, self.device = memory_format, device
        self.root = (root or cache_dir()) / "features"
        self.key = self._key(description)
        self._memory: dict[str, torch.Tensor] = {}
        self.computed = 0  # images run through the backbone by this object (for tests and logs)

    # -- keys ----------------------------------------------------------------------------------
    def _key(self, description: str) -> str:
        digest = hashlib.sha256(description.encode())
        head = _classifier_prefix(self.model)
        for name, tensor in self.model.state_dict().items():
            if not name.startswith(head):  # the backbone's weights and BN statistics, not the head's
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        for dataset in (self.train, self.val):
            digest.update(repr(dataset.transform).encode())
            for path in dataset.paths:
                if str(path).startswith("hf:"):  # a data-set row: its split's fingerprint stands for size, mtime
                    digest.update(f"{path}|{split_fingerprint(path)}".encode())
                    continue
                stat = path.stat()
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(f"seed={self.seed}".encode())
        return digest.hexdigest()[:32]

    # -- features ------------------------------------------------------------------------------
    def view_of(self, head_epoch: int) -> int:
        """The augmentation epoch whose view head epoch ``head_epoch`` (1-based) trains on."""
        return (head_epoch - 1) % self.views + 1

    def train_features(self, view: int) -> torch.Tensor:
        """Pooled features of every training image under augmentation epoch ``view`` (memory, disk, or computed)."""
        n = len(self.train)
        keyed = SeededAugmentation(self.train, self.seed)
        return self._get(f"train-v{view}", lambda: self._compute(keyed, [view * n + i for i in range(n)]))

    def val_features(self) -> torch.Tensor:
        """Pooled features of the validation images (eval transform)."""
        return self._get("val", lambda: self._compute(self.val, list(range(len(self.val)))))

    def _get(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if name in self._memory:
            return self._memory[name]
        path = self.root / f"{self.key}-{name}.safetensors"
        if path.is_file():
            features = load_file(path)["features"]
        else:
            features = compute()
            save_weights({"features": features}, path)
        self._memory[name] = features
        return features

    @torch.no_grad()
    def _compute(self, dataset: Dataset, keys: list[int]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        loader = DataLoader(Subset(dataset, keys), batch_size=max(self.batch_size, 64), shuffle=False)
        chunks = []
        for images, _ in loader:
            images = images.to(self.device).contiguous(memory_format=self.memory_format)
            chunks.append(self.model.forward_head(self.model.forward_features(images), pre_logits=True).float().cpu())
            self.computed += len(images)
        self.model.train(was_training)
        return torch.cat(chunks)

    # -- loaders ---------------------------------------------------------------------------------
    def train_loader(self, view: int, batch_size: int, drop_last: bool) -> tuple[DataLoader, EpochSampler]:
        """Cached features of a view in the same shuffled order the image loader would use."""
        labels = torch.tensor(self.train.labels)
        sampler = EpochSampler(len(labels), self.seed)
        loader = DataLoader(_Keyed(self.train_features(view), labels), batch_size=batch_size, sampler=sampler,
                            drop_last=drop_last)
        return loader, sampler

    def val_loader(self, batch_size: int) -> DataLoader:
        """Cached validation features in the image loader's (unshuffled) order."""
        labels = torch.tensor(self.val.labels)
        return DataLoader(_Keyed(self.val_features(), labels), batch_size=batch_size, shuffle=False)


def _classifier_prefix(model: nn.Module) -> str:
    """``classifier.`` (or ``fc.`` …): state-dict prefix of the head, which the key leaves out."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    return "\0"
