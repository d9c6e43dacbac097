"""Training throughput of the offline backbones: channels_last (what `finetune train` uses by
default) against an NCHW fp32 baseline measured in the same run.

One "step" is exactly what the fine-tuning loop does per batch once the body is unfrozen:
forward, label-smoothed cross-entropy, backward, AdamW step, on real Fashion-MNIST images from
the demo folder passed through the model's timm train transform. Decoding/augmentation time is
measured separately (it is not in the step time) and printed so a data-loader bottleneck shows.

    python benchmarks/train_throughput.py            # 2 models x 96/128/224 px, ~10 min on 2 cores
    python benchmarks/train_throughput.py --quick    # 96 px only, fewer steps

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.data import ImageDataset, build_transform, scan_folder
from finetune.data.demo import write_demo_folder
from finetune.rundir import load_model

MODELS = ("tf_efficientnet_lite0", "mobilenetv2_100")


def load_batches(data_root: Path, data_config: dict, batch_size: int, count: int) -> tuple[list, float]:
    split = scan_folder(data_root, check_images=False)
    loader = DataLoader(ImageDataset(split.train, build_transform(data_config, train=True)),
                        batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches, tic = [], time.perf_counter()
    for images, labels in loader:
        batches.append((images, labels))
        if len(batches) == count:
            break
    per_image = (time.perf_counter() - tic) / (count * batch_size)
    return batches, per_image


def time_steps(model: nn.Module, batches: list, channels_last: bool, warmup: int, repeats: int) -> list[float]:
    """Images/s of full training steps, one figure per repeat (each over all batches)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = criterion(model(images.contiguous(memory_format=fmt)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for images, labels in batches[:warmup]:
        step(images, labels)
    rates = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for images, labels in batches[warmup:]:
            step(images, labels)
        seen = sum(len(labels) for _, labels in batches[warmup:])
        rates.append(seen / (time.perf_counter() - tic))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    sizes = args.sizes or ([96] if args.quick else [96, 128, 224])
    warmup, measured, repeats = (1, 2, 2) if args.quick else (2, 3, 3)

    data_root = write_demo_folder(Path(tempfile.gettempdir()) / "finetune-bench-data", train_per_class=20,
                                  val_per_class=5)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':<24}{'px':>5}{'NCHW img/s':>12}{'CL img/s':>10}{'CL/NCHW':>9}{'load ms/img':>12}")
    for name in MODELS:
        for size in sizes:
            model, data_config = load_model(name, weights="offline", num_classes=10, img_size=size)
            batches, load_per_image = load_batches(data_root, data_config, args.batch_size, warmup + measured)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            nchw = time_steps(model, batches, channels_last=False, warmup=warmup, repeats=repeats)
            model.load_state_dict(state)
            cl = time_steps(model, batches, channels_last=True, warmup=warmup, repeats=repeats)
            row = {"model": name, "img_size": size, "batch_size": args.batch_size,
                   "nchw_img_per_s": statistics.median(nchw), "channels_last_img_per_s": statistics.median(cl),
                   "load_ms_per_image": load_per_image * 1000}
            row["ratio_channels_last_vs_nchw"] = row["channels_last_img_per_s"] / row["nchw_img_per_s"]
            rows.append(row)
            print(f"{name:<24}{size:>5}{row['nchw_img_per_s']:>12.1f}{row['channels_last_img_per_s']:>10.1f}"
                  f"{row['ratio_channels_last_vs_nchw']:>9.2f}{row['load_ms_per_image']:>12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
