"""Finding recipes: by path, or by name among the ones shipped inside the package.

The shipped recipes are package data, ``finetune/recipes/*.yaml`` (:data:`SHIPPED`), so an
installed wheel finds them too; the ``recipes/*.yaml`` at the top of the repository are symlinks
to them. Search order for a name: the path as given, ``./recipes/NAME.yaml`` (relative to the
working directory), the folders listed in ``$FINETUNE_RECIPES`` (``os.pathsep``-separated), then
the recipes shipped inside the package (``finetune/recipes/``); the first match wins.

>>> from finetune.config.lookup import list_recipes, load_recipe
>>> "efficientnet_lite0_folder" in [entry.name for entry in list_recipes()]
True
>>> load_recipe("efficientnet_lite0_folder", ["data.root=~/photos"]).model.name
'tf_efficientnet_lite0'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from finetune.config.recipe import Recipe
from finetune.errors import FinetuneError, did_you_mean

__all__ = ["SHIPPED", "RecipeEntry", "find_recipe", "list_recipes", "load_recipe", "recipe_dirs"]

#: The recipes shipped inside the package (package data): ``finetune/recipes/*.yaml``.
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class RecipeEntry:
    """One recipe file as ``finetune recipes`` lists it."""

    name: str
    path: Path
    task: str
    model: str
    description: str


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes by name, first match wins: ``./recipes``, ``$FINETUNE_RECIPES``, :data:`SHIPPED`.

    Folders that do not exist are left out, and each folder is listed once.
    """
    extra = [Path(p).expanduser() for p in os.environ.get("FINETUNE_RECIPES", "").split(os.pathsep) if p]
    dirs = [Path("recipes"), *extra, SHIPPED]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def find_recipe(ref: str | os.PathLike) -> Path:
    """The recipe file for a path or a name (``mobilenetv2_lora``), in the search order of this module.

    >>> find_recipe("mobilenetv2_lora").name
    'mobilenetv2_lora.yaml'
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or os.sep in str(ref):
        if path.is_dir():
            raise FinetuneError(f"`{path}` is a folder, not a recipe file; to train on it use --data {path}")
        raise FinetuneError(f"recipe file `{path}` does not exist; pass a .yaml file or a name from `finetune recipes`")
    for folder in recipe_dirs():
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{ref}{suffix}"
            if candidate.is_file():
                return candidate
    if path.is_dir():
        raise FinetuneError(f"`{path}` is a folder, not a recipe; to train on it use --data {path}")
    hint = did_you_mean(ref, [entry.name for entry in list_recipes()])
    raise FinetuneError(f"no recipe named `{ref}`; {hint}see `finetune recipes` for the shipped ones, "
                        "or pass a path to a .yaml file")


def load_recipe(ref: str | os.PathLike, overrides: Iterable[str] | dict | None = None) -> Recipe:
    """Load a recipe by path or name, with dotted ``KEY=VALUE`` overrides."""
    return Recipe.from_yaml(find_recipe(ref), overrides)


def list_recipes() -> list[RecipeEntry]:
    """Every recipe in the search folders, validated (a broken one raises, naming its file)."""
    entries: dict[str, RecipeEntry] = {}
    for folder in recipe_dirs():
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.stem in entries:
                continue
            recipe = Recipe.from_yaml(path)
            entries[path.stem] = RecipeEntry(name=path.stem, path=path, task=recipe.task, model=recipe.model.name,
                                             description=recipe.description.strip().splitlines()[0]
                                             if recipe.description.strip() else "")
    return list(entries.values())
