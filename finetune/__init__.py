"""finetune-vision: fine-tune pretrained MobileNet/EfficientNet classifiers on a folder of images.

>>> import finetune                                                          # doctest: +SKIP
>>> result = finetune.fit(finetune.Recipe(data="~/photos", epochs=3))      # doctest: +SKIP
>>> finetune.predict(result.run_dir, ["cat.jpg"])                             # doctest: +SKIP

The public names are imported on first use (PEP 562), so ``import finetune`` and
``finetune --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune.version import __version__


_EXPORTS = {
    "FinetuneError": "finetune.errors",
    "Recipe": "finetune.config",
    "load_recipe": "finetune.config",
    "list_recipes": "finetune.config",
    "write_demo_folder": "finetune.data.demo",
    "create_model": "finetune.models",
    "convert_to_separable": "finetune.convert",
    "apply_plan": "finetune.convert",
    "reestimate_batchnorm": "finetune.convert",
    "ConversionReport": "finetune.convert",
    "apply_lora": "finetune.adapters",
    "merge_lora": "finetune.adapters",
    "load_model": "finetune.rundir",
    "save_run": "finetune.rundir",
    "fit": "finetune.train",
    "FitResult": "finetune.train",
    "lr_find": "finetune.train.lr_find",
    "run_recipe": "finetune.tasks",
    "evaluate": "finetune.inference",
    "predict": "finetune.inference",
    "Prediction": "finetune.inference",
    "export_run": "finetune.export",
    "quantize_run": "finetune.export",
    "compress": "finetune.tasks.compress",
    "CompressReport": "finetune.tasks.compress",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
