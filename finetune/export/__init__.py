"""Export a trained run to ONNX or TorchScript, checked against PyTorch on real images
(:mod:`~finetune.export.runner`), with a ``preprocessing.json`` sidecar
(:mod:`~finetune.export.sidecar`); static int8 QDQ ONNX gated on validation accuracy
(:mod:`~finetune.export.quantize`, :mod:`~finetune.export.biascorr`, timing in
:mod:`~finetune.export.ortbench`).

>>> from finetune.export import export_run                                       # doctest: +SKIP
>>> export_run("runs/photos").summary()                                          # doctest: +SKIP
"""

from finetune.export.runner import (DEFAULT_TOLERANCE, EXPORT_FORMATS, EXPORTERS, ROUNDING_FACTOR, ExportReport,
                                    export_run)
from finetune.export.quantize import CALIB_METHODS, INT8_FILE, Int8Report, quantize_run
from finetune.export.sidecar import PREPROCESSING_FILE, describe_preprocessing

__all__ = ["CALIB_METHODS", "DEFAULT_TOLERANCE", "EXPORTERS", "EXPORT_FORMATS", "ExportReport", "INT8_FILE",
           "Int8Report", "PREPROCESSING_FILE", "ROUNDING_FACTOR", "describe_preprocessing", "export_run",
           "quantize_run"]
