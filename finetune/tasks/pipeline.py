"""``task: convert`` recipes: train a dense teacher, convert it to separable convs, distill.

Three run directories under ``runtime.out``: ``teacher/`` (skipped when ``model.name`` already
is a trained run), ``converted/`` (``finetune convert``: SVD init, refit and BatchNorm
re-estimation on the training folder) and ``distilled/`` (``finetune distill``, the result).

>>> from finetune import load_recipe, run_recipe                                             # doctest: +SKIP
>>> run_recipe(load_recipe("convert_resnet18_separable", ["data.root=~/photos", "runtime.out=runs/r18"]))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from finetune.io import write_json
from finetune.config import Recipe
from finetune.tasks.convert import convert_run, format_summary
from finetune.train import FitResult, fit


def convert_pipeline(recipe: Recipe, *, progress: bool = True, overwrite: bool = False) -> FitResult:
    """Run the three stages; returns the distilled run's :class:`~finetune.train.FitResult`."""
    recipe.require_data()
    out = Path(recipe.runtime.out or f"runs/{Path(recipe.model.name).name}-separable").expanduser()
    base = recipe.to_dict()
    base["task"] = "train"
    if recipe.starts_from_run:
        teacher_dir = Path(recipe.model.name)
    else:
        teacher = Recipe.from_dict(base, {"optim.epochs": recipe.convert.teacher_epochs,
                                          "runtime.out": str(out / "teacher")})
        teacher_dir = fit(teacher, progress=progress, overwrite=overwrite).run_dir
    c = recipe.convert
    rank = None if c.rank is None else (c.rank if c.rank == "full" else int(c.rank))
    policy = {"rank": rank} if rank is not None else {"energy": c.energy} if c.energy is not None else {"macs": c.macs}
    summary = convert_run(teacher_dir, out / "converted", **policy, objective=c.objective,
                          calib_data=recipe.data.root if c.calib_images else None, calib_images=c.calib_images,
                          img_size=recipe.model.img_size, overwrite=overwrite, seed=recipe.runtime.seed)
    print(format_summary(summary))
    student = Recipe.from_dict(base, {"model.name": str(out / "converted"), "distill.teacher": str(teacher_dir),
                                      "runtime.out": str(out / "distilled"), "strategy.name": "full"})
    result = fit(student, progress=progress, overwrite=overwrite)
    write_json(out / "pipeline.json", {"teacher": str(teacher_dir), "converted": str(out / "converted"),
                                       "distilled": str(result.run_dir), "metrics": result.metrics.get("distillation")})
    return result
