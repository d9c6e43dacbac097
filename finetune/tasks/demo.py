"""``finetune demo``: fine-tune on the embedded Fashion-MNIST subset, pretrained vs from scratch.

The dataset ships inside the package (``finetune/assets``) and is written out as a real folder
of PNG files, then trained through exactly the code path of ``finetune train --data DIR``.

>>> from finetune.tasks.demo import run_demo
>>> summary = run_demo("runs/demo", quick=True)   # doctest: +SKIP
>>> summary["pretrained_val_acc"] > summary["scratch_val_acc"]   # doctest: +SKIP
True
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from finetune.io import write_json
from finetune.config import Recipe
from finetune.data.demo import write_demo_folder
from finetune.train import fit

#: The demo's training settings: one budget, shared by the pretrained and the scratch run.
DEMO_SETTINGS: dict[str, Any] = dict(model="tf_efficientnet_lite0", epochs=6, head_epochs=1, img_size=96,
                                     batch_size=32, lr=2e-3)
#: `--quick`: a smoke test of the same path (a few images a class, one small epoch each).
QUICK_SETTINGS: dict[str, Any] = dict(model="tf_efficientnet_lite0", epochs=2, head_epochs=1, img_size=64,
                                      batch_size=16, lr=2e-3)


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the demo folder, fine-tune from offline ImageNet weights and from scratch, compare.

    Returns (and writes to ``OUT/summary.json``) ``pretrained_val_acc``, ``scratch_val_acc``,
    ``seconds`` and the per-run details.
    """
    out = Path(out).expanduser()
    started = time.perf_counter()
    settings = QUICK_SETTINGS if quick else DEMO_SETTINGS
    per_class = dict(train_per_class=20, val_per_class=10) if quick else {}
    data = write_demo_folder(out / "data", **per_class)

    runs: dict[str, Any] = {}
    for label, weights in (("pretrained", "offline"), ("scratch", "none")):
        print(f"\n== {label}: {settings['model']} with weights={weights} ==")
        cfg = Recipe(data=str(data), weights=weights, out=str(out / label), **settings)
        result = fit(cfg, progress=progress, overwrite=True)
        runs[label] = {"val_acc": result.metrics["top1"], "seconds": round(result.seconds, 1),
                       "run_dir": str(result.run_dir), "strategy": cfg.resolved_strategy}

    summary = {
        "pretrained_val_acc": runs["pretrained"]["val_acc"],
        "scratch_val_acc": runs["scratch"]["val_acc"],
        "seconds": round(time.perf_counter() - started, 1),
        "data": str(data),
        "settings": settings,
        "runs": runs,
    }
    write_json(out / "summary.json", summary)
    _print_table(summary)
    return summary


def _print_table(summary: dict[str, Any]) -> None:
    print(f"\n{'run':<12} {'val accuracy':>12} {'seconds':>8}  run directory")
    for label in ("pretrained", "scratch"):
        run = summary["runs"][label]
        print(f"{label:<12} {run['val_acc']:>12.4f} {run['seconds']:>8.1f}  {run['run_dir']}")
    gain = summary["pretrained_val_acc"] - summary["scratch_val_acc"]
    print(f"\npretrained ImageNet weights: {gain * 100:+.1f} points over random init with the same budget; "
          f"demo took {summary['seconds']:.0f}s. Summary: {Path(summary['runs']['pretrained']['run_dir']).parent}"
          f"/summary.json")
