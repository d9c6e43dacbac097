"""Dense k×k convolutions → depthwise-separable ones, initialised by per-channel SVD.

Pure torch, plus timm for the conv subclasses it recognises and its ``pad_same``. Modules, each
importing only those listed above it:

* :mod:`~finetune.convert.svd` – the per-channel SVD (:class:`ChannelSVD`, :func:`channel_svd`)
  and the MAC/parameter cost model;
* :mod:`~finetune.convert.layers` – :class:`SeparableConv2d` (Form A / Form B, ``from_dense``,
  ``to_dense``) and :func:`effective_weight`;
* :mod:`~finetune.convert.policy` – rank per layer: ``rank``, ``energy``, ``macs`` budget;
* :mod:`~finetune.convert.latency` – measured latency: whole models (``measure_latency``) and
  one layer against its separable variants (``time_layer_variants``);
* :mod:`~finetune.convert.report` – :class:`LayerReport`, :class:`ConversionReport`;
* :mod:`~finetune.convert.latency_policy` – ``convert_to_separable(objective="latency")``:
  keep only variants measured faster than the dense layer;
* :mod:`~finetune.convert.macs` – :func:`count_macs` and running the example input;
* :mod:`~finetune.convert.surgery` – :func:`find_convertible`, :func:`convert_to_separable`,
  :func:`apply_plan`;
* :mod:`~finetune.convert.batchnorm` – :func:`reestimate_batchnorm`;
* :mod:`~finetune.convert.measure` – :func:`layer_output_errors` on calibration images;
* :mod:`~finetune.convert.refit` – :func:`refit_pointwise`, the least-squares refit.

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
from finetune.convert.layers import SeparableConv2d, effective_weight
from finetune.convert.macs import count_macs
from finetune.convert.measure import layer_output_errors
from finetune.convert.policy import LayerGeometry, allocate_macs, energy_rank
from finetune.convert.refit import refit_pointwise
from finetune.convert.report import ConversionReport, LayerReport
from finetune.convert.surgery import Plan, apply_plan, convert_to_separable, find_convertible
from finetune.convert.svd import ChannelSVD, channel_svd

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
