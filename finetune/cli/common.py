"""What several commands share: the recipe flags generated from the recipe's fields, and the one
path from parsed flags to a :class:`~finetune.config.Recipe`.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_recipe_flags(parser)
>>> args = parser.parse_args(["--data", "photos", "--epochs", "3"])
>>> args.data, args.epochs
('photos', '3')
"""

from __future__ import annotations

import argparse

from finetune.config import SHORT_KEYS, Recipe, base_type, field_specs

__all__ = ["add_recipe_flags", "add_tta_arguments", "recipe_from_args"]

def add_tta_arguments(parser: argparse.ArgumentParser, extra_help: str = "") -> None:
    """``--tta`` (the image and its horizontal flip) and ``--five-crop`` (five crops and their flips) into
    ``args.tta`` (``None``, ``"flip"`` or ``"five-crop"``). Two flags rather than ``--tta [MODE]``: an
    optional value would swallow the next word, so ``predict RUN --tta img.jpg`` would fail.

    >>> parser = argparse.ArgumentParser()
    >>> add_tta_arguments(parser)
    >>> [parser.parse_args(a).tta for a in ([], ["--tta"], ["--five-crop"], ["--tta", "--five-crop"])]
    [None, 'flip', 'five-crop', 'five-crop']
    """
    group = parser.add_argument_group("test-time augmentation")
    group.add_argument("--tta", action=_FlipUnlessFiveCrop, nargs=0, default=None,
                       help="average the softmax over each image and its horizontal flip" + extra_help)
    group.add_argument("--five-crop", dest="tta", action="store_const", const="five-crop",
                       help="average over five crops (corners + centre after timm's crop_pct resize) and their "
                            "flips: ten views; implies --tta")


class _FlipUnlessFiveCrop(argparse.Action):
    """``--tta``: ``"flip"``, unless ``--five-crop`` came first (it includes the flips)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 -- argparse's signature
        if getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, "flip")


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """``--set`` plus one flag per short key, generated from the recipe's field metadata."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set optim.lr=3e-4 --set lora.enabled=true")
    specs = field_specs()
    for short, dotted in SHORT_KEYS.items():
        spec = specs[dotted]
        flag = "--" + short.replace("_", "-")
        kind = base_type(spec["type"])
        default = spec["default"]
        help_text = f"{spec['help']} [{dotted}]" + ("" if default is None or short == "data" else
                                                    f" (default: {default})")
        if kind is bool:
            parser.add_argument(flag, dest=short, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif short == "resume":  # `--resume` alone means the latest checkpoint of --out
            parser.add_argument(flag, dest=short, nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                                help=help_text)
        elif short == "check_images":  # --check-images [true|false|lazy]; --no-check-images = false
            parser.add_argument(flag, dest=short, nargs="?", const="true", default=None,
                                metavar="{true,false,lazy}", help=help_text)
            parser.add_argument("--no-check-images", dest=short, action="store_const", const="false",
                                help="same as --check-images false")
        else:
            # No argparse `choices`: the Recipe validates and answers in one line, like YAML recipes.
            parser.add_argument(flag, dest=short, default=None, metavar=short.upper(), help=help_text)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The one path from the command line to a Recipe: recipe file/name, then flags, then --set."""
    from finetune.config.lookup import find_recipe

    flags = [f"{SHORT_KEYS[short]}={value}" for short in SHORT_KEYS
             if (value := getattr(args, short, None)) is not None]
    overrides = flags + list(args.overrides)
    if args.recipe:
        return Recipe.from_yaml(find_recipe(args.recipe), overrides=overrides)
    recipe = Recipe.from_dict({}, overrides=overrides)
    recipe.require_data()
    return recipe
