"""Teacher → separable student → distilled student: accuracy, MACs, params, measured latency.

Data (``--source debian``, the default when ``/usr/share/datasets/fashion-mnist`` exists: Debian's
``dataset-fashion-mnist``, which ``.ci/run`` installs) is drawn, stratified and seeded, from the full
Fashion-MNIST IDX files, read with ``tools/build_demo_dataset.py``'s ``read_split``:

* ``train/``: ``--train-per-class`` images (default 1,000 → 10,000) from the official TRAIN split,
* ``val/``:   ``--val-per-class`` other images (default 200 → 2,000) from the official TRAIN split:
  best-epoch selection of every run, and the choice of the distillation LR,
* ``test/``:  ``--test-per-class`` images (default 200 → 2,000) from the official t10k split: every
  reported accuracy; no run trains, selects epochs or picks a hyper-parameter on it.

``--source embedded`` uses the 3,000 + 1,000 images that ship in ``finetune/assets`` instead
(default 240 train + 60 val per class from its train part, its 100 t10k images per class as test).

Protocol: a timm ``resnet18`` trained from random init at 32 px is the teacher (its val curve is
printed, to check it has flattened). It is converted at ``macs=0.4``, at ``macs=0.4`` with
``objective=latency`` and at ``rank=1`` (least-squares refit of the converted layers and BatchNorm
re-estimation on 256 training images), and each student is distilled from the teacher through
``finetune``'s training loop for ``--distill-epochs``. The distillation LR is picked from
``--lr-grid`` by the VALIDATION top-1 of the ``macs=0.4`` student and reused for the other two; only
the chosen LR's students are evaluated on test. Latency: the teacher and the distilled students are
timed interleaved at batch 1 (``finetune.convert.latency.time_modules``, paired per-round ratios,
``--latency-blocks`` blocks), reported as teacher time / student time (> 1 = faster).

Targets (issue "Benchmark: macs=0.4 student ..."), each row marked ``meets`` or ``MISSES``:
``macs=0.4`` distilled (≤ 5 epochs) within 0.5 test points of the teacher, ``rank=1`` distilled
within 1.5 points, the ``objective=latency`` student ≥ 1.5× faster than the teacher at batch 1.
Accuracy deltas come with their paired standard error over the test images.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/convert_resnet18.py     # full protocol, ≈ 20 min on 2 idle cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert_resnet18.py --train-per-class 50 \\
        --val-per-class 20 --test-per-class 20 --teacher-epochs 1 --distill-epochs 1 --lr-grid 1e-3   # smoke test

Writes OUT/convert_resnet18.json (default OUT = runs/bench-convert-resnet18); the image folders go to
OUT/data (rewritten only when the sample changes).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import build_demo_dataset as fmnist  # noqa: E402  (tools/ script: the one Fashion-MNIST IDX reader)

from finetune import Recipe, evaluate, fit, load_model  # noqa: E402
from finetune.tasks.convert import convert_run  # noqa: E402
from finetune.convert.latency import time_modules  # noqa: E402
from finetune.data.demo import DEMO_CLASSES, load_demo_arrays  # noqa: E402

DEBIAN_DIR = fmnist.DEFAULT_SOURCE_DIR
SPLITS = ("train", "val", "test")
# per-class defaults (train, val, test) by source; embedded: 300 train + 100 t10k images per class in all
DEFAULT_COUNTS = {"debian": (1000, 200, 200), "embedded": (240, 60, 100)}
TARGETS = {"macs=0.4": ("accuracy", -0.5), "rank=1": ("accuracy", -1.5), "macs=0.4 latency-obj": ("speedup", 1.5)}
MAX_TARGET_EPOCHS = 5


# ---------------------------------------------------------------------------------------------- data
def _load_source(source: str) -> dict[str, np.ndarray]:
    """``{train,test}_{images,labels}`` of the official splits (``test`` = t10k), and where they came from."""
    if source == "debian":
        arrays: dict = {"origin": str(DEBIAN_DIR)}
        for split in ("train", "test"):
            images, labels, _hashes = fmnist.read_split(DEBIAN_DIR, split)  # sha256-pinned payloads
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        return arrays
    demo = load_demo_arrays()  # its "val" part is drawn from the official t10k split
    return {"origin": "finetune/assets/fashion_mnist_demo.npz", "train_images": demo["train_images"],
            "train_labels": demo["train_labels"], "test_images": demo["val_images"], "test_labels": demo["val_labels"]}


def _sample(arrays: dict, per_class: dict[str, int], seed: int) -> dict[str, tuple[str, np.ndarray]]:
    """Rows of each split: train and val disjoint, both from the official train split; test from t10k."""
    rng = np.random.default_rng(seed)
    labels = arrays["train_labels"]
    both = fmnist.stratified_indices(labels, per_class["train"] + per_class["val"], rng)  # shuffled rows
    seen = np.zeros(len(DEMO_CLASSES), dtype=np.int64)
    train, val = [], []
    for row in both:  # the first train_per_class rows of each class train, the rest validate
        c = int(labels[row])
        (train if seen[c] < per_class["train"] else val).append(int(row))
        seen[c] += 1
    test = fmnist.stratified_indices(arrays["test_labels"], per_class["test"], rng)
    return {"train": ("train", np.array(train)), "val": ("train", np.array(val)), "test": ("test", test)}


def write_data(root: Path, source: str, per_class: dict[str, int], seed: int) -> tuple[Path, dict]:
    """Write ``root/{train,val,test}/<class>/<official split>-<row>.png`` (greyscale); reuse a matching one."""
    arrays = _load_source(source)
    try:
        rows = _sample(arrays, per_class, seed)
    except ValueError as exc:
        raise SystemExit(f"error: {exc} (source {source}: lower --train/--val/--test-per-class)") from None
    manifest = {"source": source, "origin": arrays["origin"], "seed": seed, "per_class": per_class,
                "rows": {split: {"official_split": official, "rows": idx.tolist()}
                         for split, (official, idx) in rows.items()}}
    marker = root / "manifest.json"
    expected = sum(len(idx) for _, idx in rows.values())
    if marker.is_file() and json.loads(marker.read_text()) == manifest and len(list(root.glob("*/*/*.png"))) == expected:
        return root, manifest
    if root.exists():  # ours to replace: an earlier sample (manifest) or only PNG folders (older versions)
        if not marker.is_file() and any(p.is_file() and p.suffix != ".png" for p in root.rglob("*")):
            raise SystemExit(f"error: {root} holds files this benchmark did not write; pass another --out")
        shutil.rmtree(root)
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (official, idx) in rows.items():
        for cls in DEMO_CLASSES:
            (tmp / split / cls).mkdir(parents=True)
        images, labels = arrays[f"{official}_images"], arrays[f"{official}_labels"]
        for row in idx:
            path = tmp / split / DEMO_CLASSES[labels[row]] / f"{official}-{int(row):05d}.png"
            Image.fromarray(np.ascontiguousarray(images[row])).save(path, format="PNG")  # uint8 2-D: mode L
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(root)
    return root, manifest


# ---------------------------------------------------------------------------------------------- metrics
def _test_eval(run_dir: Path, test: Path) -> dict:
    """Test top-1 and the per-image correctness (by path) from evaluate's predictions.csv."""
    metrics = evaluate(run_dir, test, out=Path(run_dir) / "eval-test")
    with open(Path(metrics["out_dir"]) / "predictions.csv", newline="") as fh:
        correct = {r["path"]: r["label"] == r["predicted"] for r in csv.DictReader(fh)}
    return {"top1": metrics["top1"], "correct": correct}


def _paired_delta(student: dict, teacher: dict) -> tuple[float, float]:
    """Student − teacher test top-1 in points, and its paired standard error over the same images."""
    d = np.array([float(student["correct"][p]) - float(ok) for p, ok in teacher["correct"].items()])
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return 100 * d.mean(), 100 * se


def _latency(run_dirs: dict[str, Path], img_size: int, blocks: int, repeats: int) -> dict[str, dict]:
    """Batch-1 speed-up over the teacher (teacher time / model time), median and range over blocks."""
    models = {}
    for key, run_dir in run_dirs.items():
        model, _ = load_model(run_dir, img_size=img_size)
        models[key] = model.eval()
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    per_block: dict[str, list[float]] = {key: [] for key in models}
    ms: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(blocks):
        timing = time_modules(models, x, reference="teacher", repeats=repeats, warmup=3, min_sample_s=0.02)
        for key, t in timing.items():
            per_block[key].append(1.0 / t.ratio)
            ms[key].append(t.seconds * 1000)
    return {key: {"speedup": statistics.median(v), "speedup_min": min(v), "speedup_max": max(v),
                  "ms": statistics.median(ms[key]), "blocks": v} for key, v in per_block.items()}


def _verdict(label: str, row: dict, distill_epochs: int) -> str:
    kind, line = TARGETS[label]
    if kind == "accuracy":
        if distill_epochs > MAX_TARGET_EPOCHS:
            return f"n/a (target is for ≤{MAX_TARGET_EPOCHS} ep)"
        value = row["delta_points"]
        return f"{'meets' if value >= line else 'MISSES'}: Δ {value:+.2f}p {'≥' if value >= line else '<'} {line:+.1f}p"
    value = row["latency_b1"]["speedup"]  # the median over the interleaved blocks
    return f"{'meets' if value >= line else 'MISSES'}: {value:.3f}x {'≥' if value >= line else '<'} {line:.1f}x"


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-convert-resnet18")
    parser.add_argument("--source", choices=("debian", "embedded"), default=None,
                        help=f"full Fashion-MNIST from {DEBIAN_DIR} (default when it exists) or the embedded subset")
    parser.add_argument("--train-per-class", type=int, default=None, help="default 1000 (debian) / 240 (embedded)")
    parser.add_argument("--val-per-class", type=int, default=None, help="default 200 (debian) / 60 (embedded)")
    parser.add_argument("--test-per-class", type=int, default=None, help="default 200 (debian) / 100 (embedded)")
    parser.add_argument("--seed", type=int, default=0, help="data sample and training seed")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--distill-epochs", type=int, default=5)
    parser.add_argument("--lr-grid", default="5e-4,1e-3,2e-3",
                        help="distillation LRs tried on the macs=0.4 student, picked by val top-1 (comma-separated)")
    parser.add_argument("--student-bn", choices=("auto", "frozen", "train"), default="auto",
                        help="BatchNorm statistics while distilling (auto = frozen for a converted run)")
    parser.add_argument("--latency-blocks", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=21)
    args = parser.parse_args()
    started = time.perf_counter()

    if args.source is None:
        args.source = "debian" if DEBIAN_DIR.is_dir() else "embedded"
        if args.source == "embedded":
            print(f"note: {DEBIAN_DIR} not found (Debian package dataset-fashion-mnist); using the embedded "
                  "3,000 + 1,000 image subset, which trains a weaker teacher (see --source)")
    defaults = DEFAULT_COUNTS[args.source]
    per_class = {split: given if given is not None else default for split, given, default in
                 zip(SPLITS, (args.train_per_class, args.val_per_class, args.test_per_class), defaults)}
    if min(per_class.values()) < 1:
        parser.error("--train/--val/--test-per-class must be >= 1")
    lr_grid = [float(v) for v in args.lr_grid.split(",") if v.strip()]
    if not lr_grid:
        parser.error("--lr-grid needs at least one LR")

    out = Path(args.out)
    data, manifest = write_data(out / "data", args.source, per_class, args.seed)
    test = data / "test"
    sizes = {split: len(manifest["rows"][split]["rows"]) for split in SPLITS}
    print(f"data ({args.source}, {manifest['origin']}): {sizes['train']:,} train / {sizes['val']:,} val from the "
          f"official train split, {sizes['test']:,} test from t10k → {data}")
    common = dict(data=str(data), img_size=args.img_size, batch_size=args.batch_size, seed=args.seed)

    teacher = fit(Recipe(model="resnet18", weights="none", epochs=args.teacher_epochs, lr=args.teacher_lr,
                         out=str(out / "teacher"), **common), progress=False, overwrite=True)
    curve = [row["val_top1"] for row in teacher.history]
    tail = curve[-max(2, len(curve) // 3):]
    print(f"teacher val top-1 by epoch: {' '.join(f'{v:.3f}' for v in curve)} (best epoch "
          f"{teacher.metrics.get('best_epoch')}; spread over the last {len(tail)} epochs "
          f"{100 * (max(tail) - min(tail)):.1f} points)")
    if len(curve) >= 3 and curve[-1] == max(curve) and 100 * (tail[-1] - tail[0]) > 1.0:
        print("warning: the teacher's val top-1 still rose by more than 1 point over its last epochs; it may be "
              "under-trained, which makes 'within N points' easier: raise --teacher-epochs")
    teacher_test = _test_eval(teacher.run_dir, test)

    def distill(sep_dir: Path, name: str, lr: float):
        return fit(Recipe(model=str(sep_dir), teacher=str(teacher.run_dir), epochs=args.distill_epochs, lr=lr,
                          bn=args.student_bn, out=str(out / name), **common), progress=False, overwrite=True)

    policies = (("macs=0.4", {"macs": 0.4}), ("macs=0.4 latency-obj", {"macs": 0.4, "objective": "latency"}),
                ("rank=1", {"rank": 1}))
    converted, grid, lr = {}, [], None
    students: dict[str, Path] = {}
    for label, policy in policies:
        slug = label.replace("=", "").replace(" ", "-")
        sep_dir = out / f"sep-{slug}"
        result = convert_run(teacher.run_dir, sep_dir, calib_data=data / "train", overwrite=True, seed=args.seed,
                             **policy)
        b1 = next(r for r in result["latency"] if r["batch_size"] == 1 and r["memory_format"] == "contiguous")
        converted[label] = {"dir": sep_dir, "report": result["report"], "convert_b1_speedup": b1["speedup"]}
        if lr is None:  # the first policy (macs=0.4) picks the LR, by validation top-1 only
            for candidate in lr_grid:
                run = distill(sep_dir, f"kd-{slug}-lr{candidate:g}", candidate)
                grid.append({"lr": candidate, "val_top1": run.metrics["top1"], "run_dir": str(run.run_dir)})
            lr = max(grid, key=lambda g: g["val_top1"])["lr"]  # ties: the first in --lr-grid order
            students[label] = Path(next(g["run_dir"] for g in grid if g["lr"] == lr))
            print("distillation LR grid (macs=0.4 student, val top-1; test not looked at): " + ", ".join(
                f"{g['lr']:g} → {g['val_top1']:.4f}{' (chosen)' if g['lr'] == lr else ''}" for g in grid))
        else:
            students[label] = distill(sep_dir, f"kd-{slug}", lr).run_dir

    latency = _latency({"teacher": teacher.run_dir, **students}, args.img_size, args.latency_blocks,
                       args.latency_repeats)
    rows = [{"model": "teacher (dense resnet18)", "test_top1": teacher_test["top1"], "delta_points": 0.0,
             "delta_se_points": 0.0, "macs_ratio": 1.0, "params_ratio": 1.0, "latency_b1": latency["teacher"],
             "status": ""}]
    for label, conv in converted.items():
        base = {"macs_ratio": conv["report"]["macs_ratio"], "params_ratio": conv["report"]["params_ratio"],
                "latency_b1": latency[label], "convert_b1_speedup": conv["convert_b1_speedup"]}
        for stage, run_dir in (("converted (refit + BN)", conv["dir"]),
                               (f"distilled {args.distill_epochs} ep, lr {lr:g}", students[label])):
            ev = _test_eval(run_dir, test)
            delta, se = _paired_delta(ev, teacher_test)
            row = {"model": f"{label} {stage}", "policy": label, "stage": stage.split()[0], "run_dir": str(run_dir),
                   "test_top1": ev["top1"], "delta_points": delta, "delta_se_points": se, **base}
            row["status"] = _verdict(label, row, args.distill_epochs) if row["stage"] == "distilled" else ""
            rows.append(row)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; test = {sizes['test']:,} held-out "
          f"Fashion-MNIST t10k images ({args.source}); Δ = student − teacher test top-1 ± paired s.e.; "
          "b1 speed-up = teacher / student time at batch 1, median [min–max] of "
          f"{args.latency_blocks} interleaved blocks")
    print(f"{'model':<46}{'test top-1':>11}{'Δ vs teacher':>16}{'MACs':>8}{'params':>8}{'b1 speed-up':>22}  target")
    for row in rows:
        lat = row["latency_b1"]
        speed = f"{lat['speedup']:.2f}x [{lat['speedup_min']:.2f}–{lat['speedup_max']:.2f}]"
        delta = f"{row['delta_points']:+.1f}±{row['delta_se_points']:.1f}p"
        print(f"{row['model']:<46}{row['test_top1']:>11.4f}{delta:>16}{row['macs_ratio']:>7.3f}x"
              f"{row['params_ratio']:>7.3f}x{speed:>22}  {row['status']}")
    verdicts = [(r["model"], r["status"]) for r in rows if r["status"] and not r["status"].startswith("n/a")]
    met = sum(s.startswith("meets") for _, s in verdicts)
    print(f"targets: {met} of {len(verdicts)} met; " + "; ".join(f"{m}: {s}" for m, s in verdicts))
    close = [r["model"] for r in rows if r["status"] and TARGETS[r["policy"]][0] == "accuracy"
             and abs(r["delta_points"] - TARGETS[r["policy"]][1]) < r["delta_se_points"]]
    if close:
        print(f"note: {', '.join(close)}: Δ lies within one paired s.e. of the target line; not conclusive")
    minutes = (time.perf_counter() - started) / 60
    print(f"total {minutes:.1f} min")
    (out / "convert_resnet18.json").write_text(json.dumps(
        {"rows": rows, "args": vars(args), "per_class": per_class, "data": str(data),
         "teacher_val_curve": curve, "lr_grid": grid, "chosen_lr": lr, "minutes": minutes,
         "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out / 'convert_resnet18.json'}")


if __name__ == "__main__":
    main()
