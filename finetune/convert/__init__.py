"""Dense k×k convolutions → depthwise-separable ones, initialised by per-channel SVD.

Pure torch (timm only matters for the timm conv subclasses it recognises). Modules:

* :mod:`~finetune.convert.layers` – :class:`SeparableConv2d` (Form A / Form B, ``from_dense``,
  ``to_dense``), the per-channel SVD and the MAC/parameter cost model;
* :mod:`~finetune.convert.policy` – rank per layer: ``rank``, ``energy``, ``macs`` budget;
* :mod:`~finetune.convert.surgery` – :func:`convert_to_separable`, :func:`apply_plan`,
  :class:`ConversionReport`, :func:`count_macs`;
* :mod:`~finetune.convert.batchnorm` – :func:`reestimate_batchnorm`.
* :mod:`~finetune.convert.latency` – measured latency: whole models (:func:`measure_latency`) and
  one layer against its separable variants (``convert_to_separable(objective="latency")``).

>>> import torch, timm
>>> from finetune.convert import convert_to_separable, reestimate_batchnorm
>>> model = timm.create_model("resnet18", num_classes=10)
>>> x = torch.randn(4, 3, 64, 64)
>>> sep = convert_to_separable(model, macs=0.4, example_input=x[:1])
>>> print(sep.conversion_report)                                           # doctest: +SKIP
>>> sep = reestimate_batchnorm(sep, [x])   # a few training batches in practice
>>> sep.separable_plan[0]["name"]
'layer1.0.conv1'
"""

from finetune.convert.batchnorm import reestimate_batchnorm
from finetune.convert.layers import ChannelSVD, SeparableConv2d, channel_svd, effective_weight
from finetune.convert.refit import layer_output_errors, refit_pointwise
from finetune.convert.policy import LayerGeometry, allocate_macs, energy_rank
from finetune.convert.surgery import (
    ConversionReport,
    LayerReport,
    Plan,
    apply_plan,
    convert_to_separable,
    count_macs,
    find_convertible,
)

__all__ = [
    "ChannelSVD",
    "ConversionReport",
    "LayerGeometry",
    "LayerReport",
    "Plan",
    "SeparableConv2d",
    "allocate_macs",
    "apply_plan",
    "channel_svd",
    "convert_to_separable",
    "count_macs",
    "effective_weight",
    "energy_rank",
    "find_convertible",
    "layer_output_errors",
    "refit_pointwise",
    "reestimate_batchnorm",
]
