"""Models: timm models with pretrained weights from the hub, a local file or offline registry
packages (:mod:`~finetune.models.weights`, :mod:`~finetune.models.offline`), the one state-dict
checker (:mod:`~finetune.models.state`) and builder references for models that are not in timm
(:mod:`~finetune.models.builders`). Run directories are :mod:`finetune.rundir`'s.

>>> from finetune.models import create_model
>>> model, cfg = create_model("mobilenetv3_small_050", weights="none", num_classes=4)
>>> model.num_classes, cfg["input_size"]
(4, (3, 224, 224))
"""

from finetune.models.builders import build_model, builder_ref, is_builder_ref, load_weights_into
from finetune.models.factory import (DEFAULT_DATA_CONFIG, create_model, default_data_config, family_models,
                                     resolve_data_config)
from finetune.models.offline import OFFLINE_MODELS, offline_available
from finetune.models.state import check_state_dict, read_state_dict
from finetune.models.weights import WeightsPlan, check_model_name, resolve_weights, weight_sources

__all__ = ["DEFAULT_DATA_CONFIG", "OFFLINE_MODELS", "WeightsPlan", "build_model", "builder_ref", "check_model_name",
           "check_state_dict", "create_model", "default_data_config", "family_models", "is_builder_ref",
           "load_weights_into", "offline_available", "read_state_dict", "resolve_data_config", "resolve_weights",
           "weight_sources"]
