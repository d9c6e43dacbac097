"""Re-estimate BatchNorm statistics after a lossy conversion.

A converted layer's outputs drift from the dense ones, so the running mean/var of the BN right
after it (and of every BN downstream) no longer match. Measured on a ResNet-18 trained on
Fashion-MNIST (28 px, test accuracy 0.903) converted at uniform rank, Form A, with no training:
recomputing them on training images alone, with no gradient step, lifts test accuracy from
0.24 / 0.33 / 0.36 to 0.75 / 0.83 / 0.87 at rank 1 / 2 / 3.

Hand-written because torch's ``torch.optim.swa_utils.update_bn`` puts the *whole* model in
train mode (dropout / stochastic depth then perturb the statistics) and does not accept
(image, label) batches with a cap on their number.

>>> import torch
>>> from torch import nn
>>> from finetune.convert import reestimate_batchnorm
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
>>> _ = reestimate_batchnorm(net, [torch.randn(8, 3, 8, 8) + 2.0 for _ in range(3)])
>>> bool(net[1].running_mean.abs().sum() > 0), net[1].momentum
(True, 0.1)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import FinetuneError

__all__ = ["reestimate_batchnorm"]


def _images(batch: Any) -> Any:
    """The model input of a batch: the batch itself, the first item of (images, labels), or a
    dict's ``"image"``/``"images"``/``"pixel_values"`` entry."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("image", "images", "pixel_values", "input"):
            if key in batch:
                return batch[key]
        raise FinetuneError(f"cannot find the images in a batch dict with keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise FinetuneError(f"unsupported batch type `{type(batch).__name__}`: pass tensors or (images, labels)")


def reestimate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
) -> nn.Module:
    """Reset every BatchNorm's running statistics and recompute them as a cumulative average
    (``momentum=None``) over ``batches`` (tensors or ``(images, labels)``; at most
    ``max_batches``), without gradients. Only the BN layers run in train mode, so dropout and
    stochastic depth stay off. Momentum and train/eval flags are restored afterwards. Returns
    ``model`` (modified in place; a model without BatchNorm comes back as is). Raises
    :class:`FinetuneError` on an empty ``batches`` before touching any statistics.

    Use training images (augmented as for training, or at least the eval transform), a few
    hundred to a few thousand in all.

    >>> import torch, timm
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> loader = [(torch.randn(4, 3, 32, 32), torch.zeros(4)) for _ in range(2)]
    >>> model = reestimate_batchnorm(model, loader)
    >>> int(model.bn1.num_batches_tracked)
    2
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    if max_batches is not None and max_batches < 1:
        raise FinetuneError(f"max_batches must be ≥ 1, got {max_batches}")
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    device = next((p.device for p in model.parameters()), None)
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                x = _images(batch)
                if seen == 0:  # reset only once a batch exists, so an empty loader changes nothing
                    model.eval()
                    for m in norms:
                        m.reset_running_stats()
                        m.momentum = None  # cumulative moving average over all batches
                        m.train()
                if device is not None and isinstance(x, torch.Tensor):
                    x = x.to(device)
                model(x)
                seen += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in flags.items():
            m.training = flag
    if seen == 0:
        raise FinetuneError("reestimate_batchnorm got no batches: pass a few batches of training images")
    return model
