"""Recipes: the fixed choices of fields (:mod:`~finetune.config.choices`), the sections a run is
configured by (:mod:`~finetune.config.sections`), the :class:`Recipe` that holds them
(:mod:`~finetune.config.recipe`) and the lookup of recipes by name (:mod:`~finetune.config.lookup`).

>>> from finetune.config import Recipe
>>> Recipe(data="photos", epochs=2).optim.epochs
2
"""

from __future__ import annotations

from finetune.config.choices import (AUTO_AUGMENT, BN_MODES, MEMORY_FORMATS, MIXED_PRECISION, OBJECTIVES, STRATEGIES,
                                     TASKS, TRACKERS)
from finetune.config.lookup import SHIPPED, RecipeEntry, find_recipe, list_recipes, load_recipe, recipe_dirs
from finetune.config.recipe import SECTION_SHORTHAND, SHORT_KEYS, Recipe
from finetune.config.sections import (SECTIONS, AugmentConfig, ConvertConfig, DataConfig, DistillConfig, LoraConfig,
                                      ModelConfig, OptimConfig, RuntimeConfig, StrategyConfig, base_type, field_specs)

__all__ = [
    "AUTO_AUGMENT",
    "BN_MODES",
    "MEMORY_FORMATS",
    "MIXED_PRECISION",
    "OBJECTIVES",
    "SECTIONS",
    "SECTION_SHORTHAND",
    "SHIPPED",
    "SHORT_KEYS",
    "STRATEGIES",
    "TASKS",
    "TRACKERS",
    "AugmentConfig",
    "ConvertConfig",
    "DataConfig",
    "DistillConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeEntry",
    "RuntimeConfig",
    "StrategyConfig",
    "base_type",
    "field_specs",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_dirs",
]
