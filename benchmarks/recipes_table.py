"""Run every shipped recipe on the embedded Fashion-MNIST demo set; print the table for recipes/README.md.

Each recipe runs exactly as `finetune train NAME --data DEMO --set model.img_size=PX` would (the
image size is lowered from the models' 224 px so the whole table fits in ~15 minutes on 2 CPU
cores; pass --img-size 224 for the full size). The LoRA row is compared with the full fine-tune
of the same backbone at the same epochs (`mobilenetv2_folder`), the named baseline of the
LoRA bar ("within 3 points of full fine-tuning").

    .venv/bin/python benchmarks/recipes_table.py                 # all recipes, 96 px
    .venv/bin/python benchmarks/recipes_table.py --only mobilenetv2_folder mobilenetv2_lora
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from finetune.data.demo import write_demo_folder
from finetune.errors import FinetuneError
from finetune.config.lookup import list_recipes, load_recipe
from finetune.tasks import run_recipe  # train or convert, by the recipe's task

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--only", nargs="+", help="recipe names (default: all)")
    parser.add_argument("--out", default="runs/recipes-table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = write_demo_folder(out / "data")
    rows = []
    for entry in list_recipes():
        if args.only and entry.name not in args.only:
            continue
        overrides = [f"data.root={data}", f"runtime.out={out / entry.name}", f"model.img_size={args.img_size}"]
        if entry.task == "convert":
            overrides.pop()  # the convert recipe sets its own small size (32 px)
        recipe = load_recipe(entry.name, overrides)
        tic = time.perf_counter()
        try:
            result = run_recipe(recipe, progress=False, overwrite=True)
        except FinetuneError as exc:  # e.g. hub weights with no network: reported, not hidden
            rows.append({"recipe": entry.name, "error": str(exc)})
            print(f"{entry.name}: not run: {exc}", file=sys.stderr)
            continue
        model = recipe.model.name + (" → separable" if entry.task == "convert" else "")
        row = {"recipe": entry.name, "model": model, "epochs": recipe.optim.epochs,
               "img_size": recipe.model.img_size, "val_top1": result.metrics["top1"],
               "macro_f1": result.metrics["macro_f1"], "seconds": round(time.perf_counter() - tic, 1)}
        if "distillation" in result.metrics:
            row["distillation"] = {k: v for k, v in result.metrics["distillation"].items() if k != "teacher"}
        rows.append(row)
        print(json.dumps(row))
    by_name = {r["recipe"]: r for r in rows if "val_top1" in r}
    lora, full = by_name.get("mobilenetv2_lora"), by_name.get("mobilenetv2_folder")
    summary = {"rows": rows, "img_size": args.img_size, "threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__}
    if lora and full:
        summary["lora_minus_full_points"] = round(100 * (lora["val_top1"] - full["val_top1"]), 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipes_table.json").write_text(json.dumps(summary, indent=2))
    print("\n| recipe | model | epochs | px | val top-1 | macro F1 | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['recipe']}` | not run: {r['error']} | | | | | |")
            continue
        extra = ""
        if "distillation" in r:
            d = r["distillation"]
            extra = (f" (teacher {d['teacher_top1']:.3f}, converted before distillation "
                     f"{d['student_before_top1']:.3f})")
        print(f"| `{r['recipe']}` | {r['model']} | "
              f"{r['epochs']} | {r['img_size']} | {r['val_top1']:.3f}{extra} | {r['macro_f1']:.3f} | {r['seconds']} |")
    if "lora_minus_full_points" in summary:
        print(f"\nLoRA vs full fine-tuning (mobilenetv2_100, same epochs): {lora['val_top1']:.3f} vs "
              f"{full['val_top1']:.3f} = {summary['lora_minus_full_points']:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
