"""The ``finetune`` command line: train, eval, predict, report, push, models, demo, convert, distill.

Every user mistake ends in one line on stderr (``finetune: error: …``) and exit code 2.

>>> from finetune.cli import main
>>> main(["models", "--offline-only"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Sequence

from finetune.version import __version__
from finetune.config import SHORT_KEYS, Recipe, base_type, field_specs
from finetune.config.argtypes import classes_arg, json_object_arg, rank_arg
from finetune.errors import FinetuneError, one_line
from finetune.train.launch import EXIT_PREEMPTED, add_launch_arguments, lost_peer
from finetune.train.preemption import Preempted

TTA_HELP = "test-time augmentation: mean softmax over each image and its horizontal flip"
EPILOG_TRAIN = """examples:
  finetune train --data ~/photos --epochs 5 --out runs/photos
  finetune train --data ~/photos --model mobilenetv2_100 --strategy probe
  finetune train efficientnet_lite0_folder --set data.root=~/photos --set optim.lr=3e-4
  finetune train recipes/mobilenetv2_lora.yaml --data ~/photos
  finetune train runs/photos/recipe.yaml --out runs/photos-again
every recipe key can be set with --set SECTION.KEY=VALUE (see `finetune recipes --keys`)
"""


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
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


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
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


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe_from_args(args)  # validated before the heavy import, so mistakes answer at once
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


def cmd_lr_find(args: argparse.Namespace) -> int:
    recipe = _recipe_from_args(args)
    from finetune.train.lr_find import lr_find

    result = lr_find(recipe, out=args.plot, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    print(f"suggested learning rate: {result.suggestion:.2e} (steepest descent of the smoothed loss; "
          f"minimum at {result.min_loss_lr:.2e}); plot in {result.plot}")
    print(f"use it: --lr {result.suggestion:.1e}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    if args.teacher is None or args.model is None or args.data is None:
        raise FinetuneError("distill needs --teacher RUN, --student RUN and --data DIR")
    return cmd_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from finetune.inference import evaluate

    metrics = evaluate(args.run, args.data, out=args.out, batch_size=args.batch_size, labels=args.labels, tta=args.tta)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("confusion",)}, indent=2))
        return 0
    print(f"{metrics['num_samples']} images from {metrics['data']}")
    summary = [("top-1", metrics["top1"]), ("top-5", metrics.get("top5")), ("macro F1", metrics["macro_f1"]),
               ("balanced accuracy", metrics["balanced_accuracy"]), ("ECE", metrics["ece"]), ("loss", metrics["loss"])]
    for label, value in summary:
        if value is not None:
            print(f"  {label:<18} {value:.4f}")
    if "plain" in metrics:  # --tta: the figures above are with it
        print(f"  {'without TTA':<18} top-1 {metrics['plain']['top1']:.4f}, loss {metrics['plain']['loss']:.4f}")
    print(f"  {'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>6}")
    for name, row in metrics["per_class"].items():
        print(f"  {name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {int(row['support']):>6}")
    if metrics["skipped_images"]:
        print(f"skipped {metrics['skipped_images']} unreadable image(s); see {metrics['out_dir']}/skipped.txt")
    print(f"metrics, confusion.png and predictions.csv in {metrics['out_dir']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from finetune.inference import predict

    results = predict(args.run, args.inputs, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta)
    if not results:
        raise FinetuneError("no images found in the given paths; pass image files or folders holding images")
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "label", "probability", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.path, "", "", "", r.error])
            for rank, (label, prob) in enumerate(zip(r.labels, r.probs), start=1):
                writer.writerow([r.path, rank, label, f"{prob:.6f}", ""])
    else:
        width = max([len(str(r.path)) for r in results] + [4])
        print(f"{'path':<{width}}  top-{args.top_k}")
        for r in results:
            cells = r.error and f"skipped: {r.error}" or "  ".join(f"{l} {p:.3f}" for l, p in zip(r.labels, r.probs))
            print(f"{str(r.path):<{width}}  {cells}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from finetune.inference import report_run

    print(f"wrote {report_run(args.run)}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from finetune.hub import push_run

    print(f"uploaded {args.run} to {push_run(args.run, args.repo_id, private=args.private)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import textwrap

    from finetune.models import family_models
    from finetune.models.weights import OFFLINE_MODELS, network_available, offline_weights_file, weight_sources

    if args.prepare:
        for name in OFFLINE_MODELS:
            print(f"{name}: {offline_weights_file(name)}")
        return 0
    print("Offline ImageNet-1k weights (work with no network; installed by `make install`):")
    for name in OFFLINE_MODELS:
        sources = weight_sources(name)
        print(f"  {name:<24} {sources['offline']:<14} hub: {sources['hub']}")
    if args.offline_only:
        return 0
    hub = "reachable" if network_available() else "unreachable (no network)"
    print(f"\nHugging Face hub: {hub}. Other MobileNet / EfficientNet models, by family "
          "(* = weights in the local hub cache):")
    families: dict[str, list[str]] = {}
    for name in family_models():
        if name in OFFLINE_MODELS:
            continue
        family = name.split("_")[0] if not name.startswith("tf_") else "tf_" + name.split("_")[1]
        cached = weight_sources(name).get("hub") == "cached"
        families.setdefault(family, []).append(name + ("*" if cached else ""))
    for family, names in families.items():
        print(textwrap.fill(", ".join(names), width=100, initial_indent=f"  {family}: ",
                            subsequent_indent=" " * (len(family) + 4)))
    print("\nAny model also trains from --weights PATH (.safetensors/.pth) or --weights none (random init).")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from finetune.tasks.convert import convert_run, format_summary

    result = convert_run(
        args.source, args.out, rank=args.rank, energy=args.energy, macs=args.macs, form=args.form,
        objective=args.objective, force=args.force, latency_batch_size=args.latency_batch,
        latency_memory_format=args.latency_memory_format,
        include=args.include, exclude=args.exclude, weights=args.weights, num_classes=args.num_classes,
        builder_kwargs=args.builder_kwargs, classes=args.classes, img_size=args.img_size,
        calib_data=args.calib_data, calib_images=args.calib_images, refit=not args.no_refit,
        latency=not args.no_latency, overwrite=args.overwrite,
    )
    print(format_summary(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import export_run

    report = export_run(args.run, format=args.format, out=args.out, images=args.images, opset=args.opset,
                        exporter=args.exporter)
    print(report.summary())
    print(f"model: {report.model_path}\npreprocessing: {report.preprocessing_path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from finetune.tasks.compare import compare, format_rows

    rows = compare(args.data, model=args.model, rank=args.rank, epochs=args.epochs, img_size=args.img_size,
                   out=args.out, test_data=args.test_data, lr=args.lr, batch_size=args.batch_size,
                   progress=not args.no_progress)
    print(format_rows(rows))
    print(f"evaluated on {args.test_data or 'the validation split'}; details in {args.out}/compare.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finetune.tasks.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse answers mistakes with usage + error on two lines; we keep the project's one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"finetune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="finetune", description="Fine-tune pretrained MobileNet/EfficientNet "
                                     "classifiers on a folder of images.")
    parser.add_argument("--version", action="version", version=f"finetune-vision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)

    train = sub.add_parser("train", help="fine-tune a model on an image folder",
                           epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", nargs="?", help="optional recipe: a name from `finetune recipes` or a YAML file "
                       "(e.g. a run's recipe.yaml); flags and --set override it")
    _add_recipe_flags(train)
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
    _add_recipe_flags(di)
    add_launch_arguments(di)
    di.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out directory")
    di.add_argument("--no-progress", action="store_true", help="no progress bars")
    di.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", help="metrics and confusion matrix of a run on a labelled folder")
    ev.add_argument("run", help="run directory written by `finetune train`")
    ev.add_argument("--data", required=True, help="labelled folder: DIR/<class>/* (or DIR/val/<class>/*)")
    ev.add_argument("--labels", help="CSV or .jsonl manifest of the images in --data (path,label rows) instead of "
                    "class folders")
    ev.add_argument("--out", help="where to write metrics.json, confusion.png (default RUN/eval-<folder>)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--tta", action="store_true", help=TTA_HELP + "; also reports the figures without it")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="top-k labels for image files and folders")
    pr.add_argument("run", help="run directory written by `finetune train`")
    pr.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--tta", action="store_true", help=TTA_HELP)
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output")
    pr.set_defaults(func=cmd_predict)

    rp = sub.add_parser("report", help="write RUN/report.html (metrics, curves, confusions, worst images)")
    rp.add_argument("run", help="run directory written by `finetune train`")
    rp.set_defaults(func=cmd_report)

    pu = sub.add_parser("push", help="upload a run to the Hugging Face Hub (timm format, with a model card)")
    pu.add_argument("run", help="run directory written by `finetune train`")
    pu.add_argument("--repo-id", required=True, help="NAMESPACE/NAME of the Hub model repository")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.set_defaults(func=cmd_push)

    mo = sub.add_parser("models", help="model families, where their weights come from, and availability")
    mo.add_argument("--offline-only", action="store_true", help="only the models with offline weights")
    mo.add_argument("--prepare", action="store_true", help="convert the offline weights into the cache now")
    mo.set_defaults(func=cmd_models)

    co = sub.add_parser(
        "convert", help="replace dense k×k convolutions by SVD-initialised depthwise-separable ones",
        epilog="examples:\n  finetune convert runs/photos --macs 0.4 --calib-data ~/photos --out runs/photos-sep\n"
               "  finetune convert resnet18 --weights none --num-classes 10 --rank 2 --out runs/r18-sep\n"
               "  finetune convert torchvision.models:resnet18 --builder-kwargs '{\"num_classes\": 10}' "
               "--weights r18.safetensors --classes cat,dog,... --macs 0.4 --out runs/r18-sep",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("source", help="run directory of `finetune train`, a timm model name, or a builder ref "
                    "`package.module:callable` (any nn.Module: torchvision, your own; it imports and runs that code)")
    co.add_argument("--out", required=True, help="run directory for the converted model")
    policy = co.add_mutually_exclusive_group(required=True)
    policy.add_argument("--rank", type=rank_arg, help="rank of every converted layer (an integer, or `full`: exact)")
    policy.add_argument("--energy", type=float, help="per-layer fraction of singular-value energy to keep (e.g. 0.9)")
    policy.add_argument("--macs", type=float, help="MAC budget as a fraction of the original model (e.g. 0.4)")
    co.add_argument("--form", default="auto", choices=("auto", "A", "B"),
                    help="A: depthwise then 1x1; B: 1x1 then depthwise; auto: the cheaper at equal error")
    co.add_argument("--objective", default="accuracy", choices=("accuracy", "latency"),
                    help="latency: time every layer variant on this device and never keep one slower than "
                         "the dense layer")
    co.add_argument("--force", action="store_true", help="with --objective latency: convert even slower layers")
    co.add_argument("--latency-batch", type=int, default=1,
                    help="with --objective latency: batch size to time layers at (your deployment batch; default 1)")
    co.add_argument("--latency-memory-format", default="contiguous", choices=("contiguous", "channels_last"),
                    help="with --objective latency: memory format to time layers in (default contiguous)")
    co.add_argument("--include", nargs="+", help="only layers whose names match these fnmatch patterns")
    co.add_argument("--exclude", nargs="+", help="leave layers matching these patterns dense")
    co.add_argument("--calib-data", help="image folder: re-estimate BatchNorm statistics on it (recommended)")
    co.add_argument("--calib-images", type=int, default=256, help="calibration images to use (default 256)")
    co.add_argument("--no-refit", action="store_true",
                    help="with --calib-data: skip the least-squares refit of the converted layers on the "
                         "teacher's outputs (BatchNorm is still re-estimated)")
    co.add_argument("--weights", default="auto", help="for a timm name: auto | offline | hub | none | PATH; for a "
                    "builder ref: PATH to the dense model's .safetensors/.pth state dict (default: the builder's own)")
    co.add_argument("--num-classes", type=int, help="for a timm name: size of the head (default: the model's)")
    co.add_argument("--builder-kwargs", type=json_object_arg, metavar="JSON",
                    help="for a builder ref: its keyword arguments as a JSON object, stored in the run "
                         "(e.g. '{\"num_classes\": 10}')")
    co.add_argument("--classes", type=classes_arg, metavar="NAMES",
                    help="for a timm name or builder ref: class names, `cat,dog,...` or a text file with one per line "
                         "(default class_0, class_1, ...)")
    co.add_argument("--img-size", type=int, help="input size for MACs and latency (default: the model's)")
    co.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    co.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out directory")
    co.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="export a run to ONNX or TorchScript, with a preprocessing sidecar and a "
                        "parity check against eager PyTorch on real images",
                        epilog="examples:\n  finetune export runs/photos                      # RUN/export/model.onnx\n"
                               "  finetune export runs/photos-sep --format torchscript --images ~/photos/val",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("run", help="run directory (fine-tuned or converted)")
    ex.add_argument("--format", default="onnx", choices=("onnx", "torchscript"))
    ex.add_argument("--out", help="output folder (default RUN/export)")
    ex.add_argument("--images", help="folder of images for the parity check (default: the embedded "
                    "Fashion-MNIST images)")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    ex.add_argument("--exporter", default="dynamo", choices=("dynamo", "legacy"),
                    help="torch.onnx exporter: dynamo (default) or the legacy TorchScript-based one")
    ex.set_defaults(func=cmd_export)

    cp = sub.add_parser("compare", help="train a standard-conv CNN and its depthwise-separable twin from scratch, "
                        "side by side: accuracy, params, MACs, measured latency")
    cp.add_argument("--data", required=True, help="labelled image folder (DIR/<class>/* or DIR/train + DIR/val)")
    cp.add_argument("--test-data", help="held-out labelled folder for the final accuracy (default: the val split)")
    cp.add_argument("--model", default="resnet18", help="timm CNN with dense k×k convolutions (default resnet18)")
    cp.add_argument("--rank", type=int, default=1, help="rank of the separable twin's layers (default 1)")
    cp.add_argument("--epochs", type=int, default=5)
    cp.add_argument("--img-size", type=int, default=32)
    cp.add_argument("--lr", type=float, default=2e-3)
    cp.add_argument("--batch-size", type=int, default=64)
    cp.add_argument("--out", default="runs/compare")
    cp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cp.set_defaults(func=cmd_compare)

    re_ = sub.add_parser("recipes", help="list the shipped recipes (name, task, model, description)")
    re_.add_argument("--keys", action="store_true", help="list every recipe key with its default and meaning")
    re_.set_defaults(func=cmd_recipes)

    lf = sub.add_parser("lr-find", help="exponential LR sweep: loss-vs-LR plot and a suggested learning rate",
                        epilog="example:\n  finetune lr-find --data ~/photos --model mobilenetv2_100",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lf.add_argument("recipe", nargs="?", help="optional recipe name or YAML file")
    _add_recipe_flags(lf)
    lf.add_argument("--steps", type=int, default=100, help="optimizer steps in the sweep (default 100)")
    lf.add_argument("--start-lr", type=float, default=1e-7)
    lf.add_argument("--end-lr", type=float, default=1.0)
    lf.add_argument("--plot", default="lr_find.png", help="where to save the loss-vs-LR plot (default lr_find.png)")
    lf.set_defaults(func=cmd_lr_find)

    de = sub.add_parser("demo", help="fine-tune on the embedded Fashion-MNIST subset: pretrained vs scratch")
    de.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    de.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finetune`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except FinetuneError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `finetune predict … | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "TORCHELASTIC_RUN_ID" not in os.environ or not lost_peer(exc):
            raise
        # another worker died; the agent restarts or stops the group and says which one
        print(f"finetune: process {os.environ.get('RANK')} stopped: {one_line(exc, 120)}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"finetune: {exc}; continue with --resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
