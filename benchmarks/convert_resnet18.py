"""Teacher → separable student → distilled student: accuracy, MACs, params, measured latency.

A timm ``resnet18`` trained from random init on the embedded Fashion-MNIST subset (Debian's
``dataset-fashion-mnist``; see finetune/assets) is the teacher: its 3,000 training images are split
80/20 into train/validation (best-epoch selection), and every accuracy below is measured on the
1,000 held-out images from the official test split, which no run trains or selects on.
It is converted at ``macs=0.4`` and at ``rank=1`` (least-squares refit of the converted layers
and BatchNorm re-estimation on 256 training images), each student is distilled for a few epochs
through ``finetune``'s training loop, and the teacher / converted / distilled validation accuracies are printed with the MAC and parameter
ratios and the measured batch-1 latency ratio (teacher time / student time; > 1 = faster).

    .venv/bin/python benchmarks/convert_resnet18.py                 # ≈ 2 min on 2 idle cores
    .venv/bin/python benchmarks/convert_resnet18.py --teacher-epochs 2 --distill-epochs 1   # quick

Writes OUT/convert_resnet18.json (default OUT = runs/bench-convert-resnet18).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from finetune import TrainConfig, evaluate, fit
from finetune.conversion import convert_run
from finetune.demo_data import write_demo_folder


def _test_top1(run_dir: Path, test: Path) -> float:
    return evaluate(run_dir, test, out=Path(run_dir) / "eval-test")["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-convert-resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--distill-epochs", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    data = write_demo_folder(out / "data")
    test = data / "val"  # official Fashion-MNIST test images: held out from training and selection
    common = dict(data=str(data / "train"), img_size=args.img_size, batch_size=64)

    teacher = fit(TrainConfig(model="resnet18", weights="none", epochs=args.teacher_epochs, lr=2e-3,
                              out=str(out / "teacher"), **common), progress=False, overwrite=True)
    rows = [{"model": "teacher (dense resnet18)", "test_top1": _test_top1(teacher.run_dir, test),
             "macs_ratio": 1.0, "params_ratio": 1.0, "latency_ratio_b1": 1.0}]
    policies = (("macs=0.4", {"macs": 0.4}), ("macs=0.4 latency-obj", {"macs": 0.4, "objective": "latency"}),
                ("rank=1", {"rank": 1}))
    for label, policy in policies:
        slug = label.replace("=", "").replace(" ", "-")
        sep_dir = out / f"sep-{slug}"
        converted = convert_run(teacher.run_dir, sep_dir, calib_data=data / "train", overwrite=True, **policy)
        report = converted["report"]
        b1 = next(r for r in converted["latency"] if r["batch_size"] == 1 and r["memory_format"] == "contiguous")
        before = _test_top1(sep_dir, test)
        distilled = fit(TrainConfig(model=str(sep_dir), teacher=str(teacher.run_dir), epochs=args.distill_epochs,
                                    out=str(out / f"kd-{slug}"), **common),
                        progress=False, overwrite=True)
        base = {"macs_ratio": report["macs_ratio"], "params_ratio": report["params_ratio"],
                "latency_ratio_b1": b1["speedup"]}
        rows.append({"model": f"{label} converted (refit + BN)", "test_top1": before, **base})
        rows.append({"model": f"{label} distilled {args.distill_epochs} ep",
                     "test_top1": _test_top1(distilled.run_dir, test), **base})

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; test = 1,000 held-out Fashion-MNIST "
          "test images")
    print(f"{'model':<44}{'test top-1':>11}{'Δ vs teacher':>14}{'MACs':>8}{'params':>8}{'b1 speed-up':>13}")
    for row in rows:
        delta = (row["test_top1"] - rows[0]["test_top1"]) * 100
        print(f"{row['model']:<44}{row['test_top1']:>11.4f}{delta:>+13.1f}p{row['macs_ratio']:>7.3f}x"
              f"{row['params_ratio']:>7.3f}x{row['latency_ratio_b1']:>12.2f}x")
    (out / "convert_resnet18.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    print(f"wrote {out / 'convert_resnet18.json'}")


if __name__ == "__main__":
    main()
