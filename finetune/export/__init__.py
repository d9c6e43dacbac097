"""Export a trained run to ONNX or TorchScript, checked against PyTorch on real images
(:mod:`~finetune.export.runner`), with a ``preprocessing.json`` sidecar
(:mod:`~finetune.export.sidecar`).

>>> from finetune.export import export_run                                       # doctest: +SKIP
>>> export_run("runs/photos").summary()                                          # doctest: +SKIP
"""

from finetune.export.runner import (DEFAULT_TOLERANCE, EXPORT_FORMATS, EXPORTERS, ROUNDING_FACTOR, ExportReport,
                                    export_run)
from finetune.export.sidecar import PREPROCESSING_FILE, describe_preprocessing

__all__ = ["DEFAULT_TOLERANCE", "EXPORTERS", "EXPORT_FORMATS", "ExportReport", "PREPROCESSING_FILE",
           "ROUNDING_FACTOR", "describe_preprocessing", "export_run"]
