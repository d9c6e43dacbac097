"""Recipes: the sections a run is configured by, the :class:`Recipe` that holds them, and the
lookup of shipped recipes by name.

>>> from finetune.config import Recipe
>>> Recipe(data="photos", epochs=2).optim.epochs
2
"""

from finetune.config.recipe import *  # noqa: F401,F403
from finetune.config.recipe import (SECTIONS, SHORT_KEYS, Recipe, base_type, did_you_mean,  # noqa: F401
                                    field_specs)
from finetune.config.lookup import RecipeEntry, find_recipe, list_recipes, load_recipe, recipe_dirs  # noqa: F401
