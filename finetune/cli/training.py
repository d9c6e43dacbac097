"""``finetune train``, ``distill``, ``lr-find``, ``recipes`` and ``demo``: the commands that train."""

from __future__ import annotations

import argparse
import os

from finetune.cli.common import add_recipe_flags, recipe_from_args
from finetune.config import SHORT_KEYS, field_specs
from finetune.errors import FinetuneError
from finetune.train.launch import add_launch_arguments


EPILOG_TRAIN = """examples:
  finetune train --data ~/photos --epochs 5 --out runs/photos
  finetune train --data ~/photos --model mobilenetv2_100 --strategy probe
  finetune train efficientnet_lite0_folder --set data.root=~/photos --set optim.lr=3e-4
  finetune train recipes/mobilenetv2_lora.yaml --data ~/photos
  finetune train runs/photos/recipe.yaml --out runs/photos-again
every recipe key can be set with --set SECTION.KEY=VALUE (see `finetune recipes --keys`)
"""


def cmd_train(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)  # validated before the heavy import, so mistakes answer at once
    from finetune.train.launch import check_process_counts

    check_process_counts(args.num_processes, args.num_machines, args.machine_rank, args.max_restarts)
    several = args.num_processes > 1 or args.num_machines > 1 or args.max_restarts > 0
    if several and "TORCHELASTIC_RUN_ID" not in os.environ and "WORLD_SIZE" not in os.environ:
        from finetune.train.launch import launch, worker_argv
        from finetune.train.outputs import check_run_dir
        from finetune.train.trainer import check_sources

        check_sources(recipe)  # user mistakes answer once here, not once per worker and restart
        run_dir = check_run_dir(recipe, args.overwrite)
        return launch(worker_argv(args.argv, run_dir), args.num_processes, args.num_machines, args.machine_rank,
                      args.max_restarts, args.rdzv_endpoint, args.main_process_ip, args.main_process_port,
                      args.rdzv_id)
    from finetune.tasks import run_recipe

    run_recipe(recipe, progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    if args.teacher is None or args.model is None or args.data is None:
        raise FinetuneError("distill needs --teacher RUN, --student RUN and --data DIR")
    return cmd_train(args)


def cmd_lr_find(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    from finetune.train.lr_find import lr_find

    result = lr_find(recipe, out=args.plot, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    print(f"suggested learning rate: {result.suggestion:.2e} (steepest descent of the smoothed loss; "
          f"minimum at {result.min_loss_lr:.2e}); plot in {result.plot}")
    print(f"use it: --lr {result.suggestion:.1e}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from finetune.config.lookup import list_recipes

    if args.keys:
        for key, spec in field_specs().items():
            short = next((s for s, d in SHORT_KEYS.items() if d == key), None)
            print(f"{key:<26} {str(spec['default']):<22} {spec['help']}" + (f" (--{short.replace('_', '-')})"
                                                                              if short else ""))
        return 0
    entries = list_recipes()
    width = max([len(e.name) for e in entries] + [4])
    model_width = max([len(e.model) for e in entries] + [5])
    print(f"{'name':<{width}}  {'task':<7}  {'model':<{model_width}}  description")
    for e in entries:
        print(f"{e.name:<{width}}  {e.task:<7}  {e.model:<{model_width}}  {e.description}")
    print("\nrun one: finetune train NAME --set data.root=DIR   (show every key: finetune recipes --keys)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finetune.tasks.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``distill``, ``lr-find``, ``recipes``, ``demo`` to the ``finetune`` sub-commands."""
    train = sub.add_parser("train", help="fine-tune a model on an image folder",
                           epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", nargs="?", help="optional recipe: a name from `finetune recipes` or a YAML file "
                       "(e.g. a run's recipe.yaml); flags and --set override it")
    add_recipe_flags(train)
    add_launch_arguments(train)
    train.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    di = sub.add_parser(
        "distill", help="train a (converted) student run against its teacher run: KD + feature matching + CE",
        epilog="example:\n  finetune distill --teacher runs/photos --student runs/photos-sep --data ~/my_photos "
               "--epochs 5 --out runs/photos-sep-kd", formatter_class=argparse.RawDescriptionHelpFormatter)
    di.add_argument("recipe", nargs="?", help=argparse.SUPPRESS)
    di.add_argument("--student", dest="model", help="run directory of the student (e.g. from `finetune convert`)")
    add_recipe_flags(di)
    add_launch_arguments(di)
    di.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out directory")
    di.add_argument("--no-progress", action="store_true", help="no progress bars")
    di.set_defaults(func=cmd_distill)

    lf = sub.add_parser("lr-find", help="exponential LR sweep: loss-vs-LR plot and a suggested learning rate",
                        epilog="example:\n  finetune lr-find --data ~/photos --model mobilenetv2_100",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lf.add_argument("recipe", nargs="?", help="optional recipe name or YAML file")
    add_recipe_flags(lf)
    lf.add_argument("--steps", type=int, default=100, help="optimizer steps in the sweep (default 100)")
    lf.add_argument("--start-lr", type=float, default=1e-7)
    lf.add_argument("--end-lr", type=float, default=1.0)
    lf.add_argument("--plot", default="lr_find.png", help="where to save the loss-vs-LR plot (default lr_find.png)")
    lf.set_defaults(func=cmd_lr_find)

    re_ = sub.add_parser("recipes", help="list the shipped recipes (name, task, model, description)")
    re_.add_argument("--keys", action="store_true", help="list every recipe key with its default and meaning")
    re_.set_defaults(func=cmd_recipes)

    de = sub.add_parser("demo", help="fine-tune on the embedded Fashion-MNIST subset: pretrained vs scratch")
    de.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    de.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.set_defaults(func=cmd_demo)
