"""``finetune compare``: a standard-convolution CNN against its depthwise-separable twin.

Both are trained from random init with the same budget on the same folder and evaluated on
held-out images; params, MACs (``torch.utils.flop_counter``), measured latency and accuracy are
printed side by side. The twin is the same timm architecture with every dense k×k convolution
replaced by a depthwise k×k + 1×1 pair of the given rank (built by the converter from the
random-init dense kernels, so both start from comparable weight scales).

>>> from finetune.tasks.compare import compare                                       # doctest: +SKIP
>>> rows = compare("~/photos", model="resnet18", rank=1, epochs=5, out="runs/compare")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from finetune.io import write_json
from finetune.config import Recipe
from finetune.tasks.convert import convert_run
from finetune.convert import count_macs
from finetune.convert.latency import measure_latency
from finetune.inference import evaluate
from finetune.rundir import load_model, read_run_meta, update_meta
from finetune.train import fit


def compare(
    data: str | os.PathLike,
    *,
    model: str = "resnet18",
    rank: int = 1,
    epochs: int = 5,
    img_size: int = 32,
    out: str | os.PathLike = "runs/compare",
    test_data: str | os.PathLike | None = None,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` and its rank-``rank`` separable twin from scratch; return the side-by-side rows.

    Accuracy is measured on ``test_data`` when given (a labelled folder never used in training),
    else on the validation split (used to pick the best epoch: slightly optimistic for both).
    Writes ``OUT/compare.json``.
    """
    out = Path(out).expanduser()
    common = dict(data=str(data), img_size=img_size, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  weights="none", strategy="full", bn="train")
    dense = fit(Recipe(model=model, out=str(out / "dense"), **common), progress=progress, overwrite=True)
    # The twin: the same architecture from a fresh random init, its k×k convs replaced by separable
    # pairs factorised from those random kernels; trained with the same budget as the dense model.
    twin_init = out / "separable-init"
    torch.manual_seed(seed)
    convert_run(model, twin_init, rank=rank, weights="none", num_classes=len(dense.classes), img_size=img_size,
                latency=False, overwrite=True)
    _copy_classes(dense.run_dir, twin_init)
    twin = fit(Recipe(model=str(twin_init), out=str(out / "separable"), **common), progress=progress,
               overwrite=True)

    rows = []
    for label, run in (("standard conv", dense), (f"separable (rank {rank})", twin)):
        net, data_config = load_model(run.run_dir)
        size = tuple(data_config["input_size"])
        top1 = evaluate(run.run_dir, test_data, out=run.run_dir / "eval-test")["top1"] if test_data else \
            run.metrics["top1"]
        rows.append({
            "model": label, "top1": top1, "params": sum(p.numel() for p in net.parameters()),
            "macs": count_macs(net, torch.randn(1, *size)),
            "latency_b1_ms": measure_latency(net, size, 1) * 1000,
            "latency_b32_ms": measure_latency(net, size, 32) * 1000,
            "run_dir": str(run.run_dir),
        })
    write_json(out / "compare.json", {"model": model, "rank": rank, "epochs": epochs, "img_size": img_size,
                                      "evaluated_on": str(test_data or "validation split"), "rows": rows})
    return rows


def _copy_classes(source_run: Path, target_run: Path) -> None:
    """The twin's run directory gets the dense run's class names (the data folder's)."""
    update_meta(target_run, classes=read_run_meta(source_run)["classes"])


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table the CLI prints."""
    lines = [f"{'model':<22}{'top-1':>8}{'params':>11}{'MACs':>11}{'b1 ms':>9}{'b32 ms':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<22}{r['top1']:>8.4f}{r['params'] / 1e6:>10.2f}M{r['macs'] / 1e6:>10.1f}M"
                     f"{r['latency_b1_ms']:>9.2f}{r['latency_b32_ms']:>9.1f}")
    return "\n".join(lines)
