"""fp32 vs static int8 ONNX (finetune export --int8) on fine-tuned, offline-pretrained models.

For each model: fine-tune on the embedded Fashion-MNIST demo set (its offline ImageNet weights,
``finetune train``), then :func:`finetune.export.quantize_run` -- calibration on the run's own
training split, gate on its validation split -- and print fp32 vs int8 top-1, agreement, max
|logit diff|, file size and ONNX Runtime latency at batch 1 and 32 (interleaved medians, threads
stated). Baseline: the fp32 ONNX model of the same run.

    python benchmarks/int8.py                                   # tf_efficientnet_lite0 + mobilenetv2_100
    python benchmarks/int8.py --models mobilenetv2_100 --img-size 96 --epochs 2

Writes benchmarks/results/int8.json. Timing on a shared machine is noisy: run it idle.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from finetune.config import Recipe
from finetune.data.demo import write_demo_folder
from finetune.export.quantize import quantize_run
from finetune.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tf_efficientnet_lite0,mobilenetv2_100")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--calib-method", default="minmax")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/int8.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_folder(Path(tmp) / "data", args.train_per_class, args.val_per_class)
        for name in args.models.split(","):
            start = time.time()
            recipe = Recipe(data=str(data), model=name, weights="offline", epochs=args.epochs, img_size=args.img_size,
                            out=str(Path(tmp) / name))
            run_dir = fit(recipe, progress=False).run_dir
            trained = time.time() - start
            report = quantize_run(run_dir, out=Path(tmp) / name / "export", calib_images=args.calib_images,
                                  calib_method=args.calib_method, threads=args.threads, force=True)
            print(f"== {name} at {args.img_size} px, fine-tuned {args.epochs} epochs in {trained:.0f} s")
            print(report.summary())
            results.append({"model": name, "img_size": args.img_size, "epochs": args.epochs, **report.to_dict()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
