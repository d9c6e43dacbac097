"""Tasks built on training and conversion: ``finetune convert`` (:mod:`~finetune.tasks.convert`),
the ``task: convert`` recipe pipeline (:mod:`~finetune.tasks.pipeline`), ``finetune compare``
(:mod:`~finetune.tasks.compare`), ``finetune compress`` (:mod:`~finetune.tasks.compress`) and the demo (:mod:`~finetune.tasks.demo`), and
:func:`run_recipe`, which runs a recipe whatever its task.

>>> from finetune import Recipe, run_recipe                                                # doctest: +SKIP
>>> run_recipe(Recipe(data="~/photos", epochs=3))                # task: train -> finetune.fit  # doctest: +SKIP
"""

from __future__ import annotations

from finetune.config import Recipe
from finetune.tasks.pipeline import convert_pipeline
from finetune.train import FitResult, fit


def run_recipe(recipe: Recipe, *, progress: bool = True, overwrite: bool = False) -> FitResult:
    """Run ``recipe`` by its ``task``: ``train`` is :func:`finetune.fit`; ``convert`` trains a dense
    teacher (unless ``model.name`` is a trained run), converts it to separable convs and distills
    (:func:`~finetune.tasks.pipeline.convert_pipeline`). ``finetune train RECIPE`` calls this."""
    if recipe.task == "convert":
        return convert_pipeline(recipe, progress=progress, overwrite=overwrite)
    return fit(recipe, progress=progress, overwrite=overwrite)


__all__ = ["run_recipe"]
