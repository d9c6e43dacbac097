"""``finetune convert``, ``export``, ``compress`` and ``compare``: the commands that make a model smaller
and ship it."""

from __future__ import annotations

import argparse

from finetune.config.argtypes import classes_arg, json_object_arg, rank_arg
from finetune.errors import FinetuneError


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

    if args.int8:
        from finetune.export.quantize import quantize_run

        if args.format != "onnx":
            raise FinetuneError("--int8 writes ONNX (QDQ) models; drop --format torchscript")
        result = quantize_run(args.run, out=args.out, calib_data=args.calib_data, calib_images=args.calib_images,
                              calib_method=args.calib_method, max_drop=args.max_drop, force=args.force,
                              val_data=args.val_data, bias_correction=args.bias_correction,
                              latency=not args.no_latency, exporter=args.exporter)
        print(result.summary())
        return 0
    int8_only = [flag for flag, value in (("--calib-data", args.calib_data), ("--val-data", args.val_data),
                                          ("--force", args.force), ("--bias-correction", args.bias_correction))
                 if value]
    if int8_only:
        raise FinetuneError(f"{', '.join(int8_only)} apply to --int8 only; add --int8 or drop them")
    report = export_run(args.run, format=args.format, out=args.out, images=args.images, opset=args.opset,
                        exporter=args.exporter)
    print(report.summary())
    print(f"model: {report.model_path}\npreprocessing: {report.preprocessing_path}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from finetune.tasks.compress import compress

    report = compress(args.run, data=args.data, out=args.out, variants=args.variants, max_drop=args.max_drop,
                      calib_images=args.calib_images, calib_method=args.calib_method,
                      distill_epochs=args.distill_epochs,
                      progress=not args.no_progress)
    print(report.table())
    print(f"wrote {report.out}/report.json, report.csv, pareto.png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from finetune.tasks.compare import compare, format_rows

    rows = compare(args.data, model=args.model, rank=args.rank, epochs=args.epochs, img_size=args.img_size,
                   out=args.out, test_data=args.test_data, lr=args.lr, batch_size=args.batch_size,
                   progress=not args.no_progress)
    print(format_rows(rows))
    print(f"evaluated on {args.test_data or 'the validation split'}; details in {args.out}/compare.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert``, ``export``, ``compress``, ``compare`` to the ``finetune`` sub-commands."""
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
                               "  finetune export runs/photos-sep --format torchscript --images ~/photos/val\n"
                               "  finetune export runs/photos --int8 --calib-data ~/photos --max-drop 0.5",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("run", help="run directory (fine-tuned or converted)")
    ex.add_argument("--format", default="onnx", choices=("onnx", "torchscript"))
    ex.add_argument("--out", help="output folder (default RUN/export)")
    ex.add_argument("--images", help="folder of images for the parity check (default: the embedded "
                    "Fashion-MNIST images)")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    ex.add_argument("--exporter", default="dynamo", choices=("dynamo", "legacy"),
                    help="torch.onnx exporter: dynamo (default) or the legacy TorchScript-based one")
    q = ex.add_argument_group("int8 (static post-training quantization, ONNX Runtime QDQ, gated on accuracy)")
    q.add_argument("--int8", action="store_true", help="also write model.int8.onnx (int8 activations, per-channel "
                   "int8 weights), kept only if its validation top-1 is within --max-drop of fp32")
    q.add_argument("--calib-data", help="folder of images to calibrate on (default: the run's training split)")
    q.add_argument("--calib-images", type=int, default=300, help="calibration images (default 300)")
    q.add_argument("--calib-method", default="minmax", choices=("minmax", "entropy", "percentile"),
                   help="activation range estimate (default minmax)")
    q.add_argument("--max-drop", type=float, default=1.0, help="largest accepted top-1 drop in points (default 1.0)")
    q.add_argument("--force", action="store_true", help="write the int8 model even when it drops more")
    q.add_argument("--bias-correction", action="store_true", help="remove the mean output shift int8 weights "
                   "cause (measured on the calibration images), per layer")
    q.add_argument("--val-data", help="labelled folder to gate on (default: the run's validation split; needed "
                   "for runs without recipe.yaml)")
    q.add_argument("--no-latency", action="store_true", help="skip the fp32 vs int8 latency measurement")
    ex.set_defaults(func=cmd_export)

    cz = sub.add_parser("compress", help="build fp32 ONNX, int8 and separable variants of a run, measure each "
                        "here (validation top-1, size, latency) and recommend the fastest within --max-drop",
                        epilog="examples:\n  finetune compress runs/photos --out runs/photos-compressed\n"
                               "  finetune compress runs/r18 --variants fp32,int8,sep:macs=0.4,sep:rank=1+int8\n"
                               "stages resume: run the same command again after an interruption",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cz.add_argument("run", help="run directory (fine-tuned or converted)")
    cz.add_argument("--data", help="labelled folder to evaluate and calibrate on (default: the run's own "
                    "validation and training split, from its recipe.yaml)")
    cz.add_argument("--out", help="report folder (default RUN-compressed beside the run)")
    cz.add_argument("--variants", help="comma-separated: fp32, int8, sep:macs=X, sep:rank=R, sep:...+int8 (default "
                    "fp32,int8, plus sep:macs=0.5 and sep:macs=0.5+int8 for models with dense k×k convolutions)")
    cz.add_argument("--max-drop", type=float, default=1.0, help="tolerance of the recommendation, top-1 points "
                    "below fp32 (default 1.0)")
    cz.add_argument("--calib-images", type=int, default=300, help="calibration images per variant (default 300)")
    cz.add_argument("--calib-method", default="minmax", choices=("minmax", "entropy", "percentile"))
    cz.add_argument("--distill-epochs", type=int, default=0, help="distill each separable variant from the run "
                    "for this many epochs on its recipe data (default 0: not distilled)")
    cz.add_argument("--no-progress", action="store_true", help="no per-variant progress lines")
    cz.set_defaults(func=cmd_compress)

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
