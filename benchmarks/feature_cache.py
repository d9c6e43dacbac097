"""Probe epochs from the frozen-feature cache vs recomputing the backbone every epoch.

Both sides are the real `finetune train --strategy probe` on the embedded Fashion-MNIST folder
(3,000 train / 1,000 val images), same seed, threads, batch and size; the baseline is the same
command with `--no-feature-cache`. An epoch's time (`epoch_seconds` in log.csv) includes its
validation pass; the cached run's first epoch includes computing the features. The ratio is the
median epoch time after the first, recompute ÷ cache.

    .venv/bin/python benchmarks/feature_cache.py                 # both backbones, 128 px, 5 epochs
    .venv/bin/python benchmarks/feature_cache.py --quick         # mobilenetv2_100, 96 px, 3 epochs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

from finetune import Recipe, fit
from finetune.data.demo import write_demo_folder

RESULTS = Path(__file__).resolve().parent / "results"


def epoch_seconds(run_dir: Path) -> list[float]:
    return [float(r["epoch_seconds"]) for r in csv.DictReader((run_dir / "log.csv").open())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-feature-cache")
    args = parser.parse_args(argv)
    models = ["mobilenetv2_100"] if args.quick else ["tf_efficientnet_lite0", "mobilenetv2_100"]
    px, epochs = (96, 3) if args.quick else (args.img_size, args.epochs)
    out = Path(args.out)
    # a cache folder of the benchmark's own, emptied first: the cached run pays for computing its
    # features (features kept from an earlier run would make its first epoch look free)
    os.environ["FINETUNE_CACHE"] = str(out / "cache")
    shutil.rmtree(out / "cache" / "features", ignore_errors=True)
    data = write_demo_folder(out / "data")
    rows = []
    for model in models:
        times, top1 = {}, {}
        for label, cache in (("recompute", False), ("cache", True)):
            recipe = Recipe(data=str(data), model=model, weights="offline", strategy="probe", epochs=epochs,
                            img_size=px, feature_cache=cache, out=str(out / f"{model}-{label}"))
            result = fit(recipe, progress=False, overwrite=True)
            times[label], top1[label] = epoch_seconds(result.run_dir), result.metrics["top1"]
        recompute, cached = statistics.median(times["recompute"][1:]), statistics.median(times["cache"][1:])
        rows.append({"model": model, "img_size": px, "epochs": epochs,
                     "recompute_first_s": times["recompute"][0], "cache_first_s": times["cache"][0],
                     "recompute_later_s": recompute, "cache_later_s": cached, "speedup_later": recompute / cached,
                     "top1_recompute": top1["recompute"], "top1_cache": top1["cache"]})
    print(f"\ntorch threads {torch.get_num_threads()}; probe, {epochs} epochs, {px} px, 3,000 train / 1,000 val images")
    print("| model | first epoch recompute / cache (s) | later epochs recompute / cache (s) | speed-up | top-1 "
          "recompute / cache |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['recompute_first_s']:.1f} / {r['cache_first_s']:.1f} | "
              f"{r['recompute_later_s']:.2f} / {r['cache_later_s']:.3f} | {r['speedup_later']:.0f}× | "
              f"{r['top1_recompute']:.3f} / {r['top1_cache']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_cache.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
