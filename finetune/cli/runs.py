"""``finetune eval``, ``predict``, ``report`` and ``push``: the commands that read a finished run."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from finetune.cli.common import add_tta_arguments
from finetune.errors import FinetuneError


def cmd_eval(args: argparse.Namespace) -> int:
    from finetune.inference import evaluate

    metrics = evaluate(args.run, args.data, out=args.out, batch_size=args.batch_size, labels=args.labels, tta=args.tta,
                       image_column=args.image_column, label_column=args.label_column)
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
        print(f"  {'without TTA':<18} top-1 {metrics['plain']['top1']:.4f}, loss {metrics['plain']['loss']:.4f} "
              f"(TTA: {metrics['tta']})")
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``predict``, ``report``, ``push`` to the ``finetune`` sub-commands."""
    ev = sub.add_parser("eval", help="metrics and confusion matrix of a run on a labelled folder")
    ev.add_argument("run", help="run directory written by `finetune train`")
    ev.add_argument("--data", required=True, help="labelled folder: DIR/<class>/* (or DIR/val/<class>/*), or a Hugging "
                    "Face data set: hf:DIR (save_to_disk; its test split, else validation) or hf:imagefolder:DIR")
    ev.add_argument("--image-column", default="image", help="image column of an hf: data set (default: image)")
    ev.add_argument("--label-column", default="label", help="label column of an hf: data set (default: label)")
    ev.add_argument("--labels", help="CSV or .jsonl manifest of the images in --data (path,label rows) instead of "
                    "class folders")
    ev.add_argument("--out", help="where to write metrics.json, confusion.png (default RUN/eval-<folder>)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_tta_arguments(ev, "; also reports the figures without it")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="top-k labels for image files and folders")
    pr.add_argument("run", help="run directory written by `finetune train`")
    pr.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--batch-size", type=int, default=32)
    add_tta_arguments(pr)
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
