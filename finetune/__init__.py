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
    "Recipe": "finetune.config.recipe",
    "load_recipe": "finetune.config.lookup",
    "list_recipes": "finetune.config.lookup",
    "lr_find": "finetune.train.lr_find",
    "write_demo_folder": "finetune.data.demo",
    "export_run": "finetune.export",
    "apply_lora": "finetune.adapters",
    "merge_lora": "finetune.adapters",
    "FinetuneError": "finetune.errors",
    "evaluate": "finetune.inference",
    "predict": "finetune.inference",
    "Prediction": "finetune.inference",
    "load_model": "finetune.models.factory",
    "save_run": "finetune.models.factory",
    "fit": "finetune.train.trainer",
    "convert_to_separable": "finetune.convert",
    "apply_plan": "finetune.convert",
    "reestimate_batchnorm": "finetune.convert",
    "ConversionReport": "finetune.convert",
    "FitResult": "finetune.train.trainer",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
