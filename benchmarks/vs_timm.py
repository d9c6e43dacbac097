"""`finetune train` against timm's own ``train.py``, side by side (issue 16, deliverable 1).

timm's ``train.py`` is in neither timm's wheel nor its sdist and is **not vendored** here: pass its
path with ``--timm-train PATH`` (default: ``../shared/anchors/timm/train.py`` beside the repository).
Get it from github.com/huggingface/pytorch-image-models, ``train.py`` at the tag of your installed
timm version (``git clone -b v$(python -c 'import timm; print(timm.__version__)') ...``).

**What runs.** Every run is a fresh subprocess with ``OMP_NUM_THREADS = MKL_NUM_THREADS = --threads``
(torch's intra-op threads; timm's loader workers use 1 thread each, as torch sets them), the same
image folder (timm's ImageFolder layout ``D/train/<class>/*`` + ``D/validation/<class>/*``, which
``finetune`` reads as an already-split folder), model, input size, batch and epochs::

    timm best:    python TRAIN_PY --data-dir D --train-split train --val-split validation --model M
                  --num-classes 10 --device cpu --img-size PX -b B --epochs E -j 2 --log-interval 1
                  --seed 0 --output O --experiment X --channels-last
    timm default: the same without --channels-last
    finetune:     python -m finetune.cli train --data D --model M --img-size PX --batch-size B
                  --epochs E --seed 0 --no-progress --out RUN [--weights none]

``-j 2`` (loader workers) is passed explicitly to both timm columns (``--timm-workers``; timm's own
default is 4, the issue measured 2 on 2 cores); finetune keeps its own default (0 workers on 2 cores).
``--log-interval 1`` only makes timm log every update (its loop calls ``loss.item()`` each step anyway).
Each ``finetune`` run gets an empty ``FINETUNE_CACHE`` whose ``weights/`` links to the user's cached
offline weights, so no scan or feature cache from an earlier run helps it.

**Throughput** (``--weights none`` for finetune, no ``--pretrained`` for timm: random init on both, as
the issue's table; with random init finetune's default strategy trains the whole net every epoch).
Training images/s over the epochs after the first (warm-up), validation excluded:

* timm: the per-update lines of ``train_one_epoch`` (``Train: E [ i/N (p%)]  Loss: … Time: <s>s, <img/s>/s
  (…)  LR: …  Data: <s> (…)``); images / Σ update times of those epochs. An update's time runs from the
  end of the previous update to the end of this one, so it includes waiting for the loader;
  the first update of an epoch includes the loader's start.
* finetune: ``RUN/log.csv`` ``train_images_per_s`` of the same epochs (images / wall time of the
  training loop, which also includes waiting for the loader); over several epochs the harmonic mean.

Runs alternate per repeat (``--repeats``): timm-best, timm-default, finetune, then the reverse, …; the
table gives each column's median, ``finetune / timm best`` as the ratio of the medians and the
[min–max] of the per-repeat paired ratios.

**Loader time vs step time** (deliverable 2), per image over the same epochs: timm's ``Data:`` figure
(time the loop waited for the next batch; with 2 workers only what decode did not overlap) and the
rest of its update time; for finetune the time spent in its training loader's ``next()``, recorded by
wrapping the loader ``finetune.train.session`` passes to ``train_epoch`` (a pass-through: nothing else
changes; with 0 workers this is all of decode + augmentation), and the rest of the loop's time.

**Time to target** (``--target``, default val top-1 0.80) from the **same pretrained weights**, the
cached offline safetensors ``~/.cache/finetune-vision/weights/M.safetensors``: timm with
``--pretrained --pretrained-path FILE --channels-last --opt adamw --lr 1e-3 --sched cosine
--warmup-epochs 1 --smoothing 0.1 -j 2`` (timm documents no fine-tuning recipe; these are its best
flag plus the hyper-parameters that match finetune's documented defaults: AdamW, peak LR 1e-3, cosine,
warm-up, label smoothing 0.1), ``finetune train`` with its defaults (weights ``auto`` → the same
offline file; strategy ``auto``: one head-only epoch on cached features, then the body at 0.3× LR;
BatchNorm statistics frozen). Seconds = wall time from launching the process to the moment the
epoch's validation row appears in timm's ``summary.csv`` (``eval_top1``, a percentage) or finetune's
``log.csv`` (``val_top1``), polled every 50 ms; so start-up (imports, model build, scan, finetune's
memory-format probe, timm's worker start) is included, and printed apart as ``set-up s`` (timm: the
first ``Train`` line's arrival less its update time; finetune: the first row's arrival less its
``epoch_seconds``). One run per tool and model, on the whole embedded demo set (3,000 / 1,000 PNGs).

**Machine.** Dense fp32 ``torch.mm`` GFLOP/s (``benchmarks/scale.py``'s ``matmul_gflops``) at the start
and the end, the CPU name, and for every run the share of the CPUs other processes took meanwhile
(``/proc/stat`` less this benchmark's and its children's CPU time, scale.py's approach); rows where
it exceeds 10 % are flagged. Only ratios measured in one sitting, alternating, mean anything.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vs_timm.py            # full, ≈ 2–2.5 h on 2 idle cores
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vs_timm.py --quick    # smoke: 8 small runs, 1 model, 64 px

Durations are estimates from the issue's img/s (≈ 70 s per throughput run, ≈ 10 min per
time-to-target run), not timed on an idle machine; ``--quick`` took ≈ 10 min on a 2-core machine
that other processes kept ~75 % busy (most of it process start-up and timm's / finetune's set-up).

Full = 2 models × {128, 224} px × {PNG, camera JPEG} × 3 repeats × 3 columns (72 runs of 2 epochs on
600/300 train images) + 4 time-to-target runs (4 epochs of 3,000 images at 128 px). Data: the PNG set is
the embedded Fashion-MNIST (``finetune.data.demo.write_demo_folder``, 28 px greyscale); the camera set
is the same images upscaled to 1600×1200 RGB, blended 25 % with one of scikit-image's photos (chosen by
file index, not class, so it carries no label) for photo-like JPEG entropy, saved as JPEG quality 90.
Writes ``benchmarks/results/vs_timm.json`` (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from scale import busy_cpu_seconds, cpu_name, default_weights_dir, matmul_gflops, own_cpu_seconds  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_TIMM_TRAIN = REPO.parent / "shared" / "anchors" / "timm" / "train.py"
MODELS = ("tf_efficientnet_lite0", "mobilenetv2_100")
SIZES = (128, 224)
DATASETS = ("png", "camera")
NUM_CLASSES = 10
CAMERA_SIZE = (1600, 1200)
# train / val images per class per (data set, px): ~600 train images at 128 px, 300 at 224 px
FULL_PLAN = {("png", 128): (60, 10), ("png", 224): (30, 10), ("camera", 128): (60, 10), ("camera", 224): (30, 10)}
TIMM_FINETUNE_FLAGS = ["--channels-last", "--opt", "adamw", "--lr", "1e-3", "--sched", "cosine",
                       "--warmup-epochs", "1", "--smoothing", "0.1"]
COLUMNS = ("timm_default", "timm_best", "finetune")

TIMM_TRAIN_LINE = re.compile(
    r"Train: (?P<epoch>\d+) \[\s*(?P<idx>\d+)/(?P<n>\d+) \(\s*\d+%\)\]\s+Loss: (?P<loss>\S+) \(\S+\)\s+"
    r"Time: (?P<time>[\d.]+)s,\s+(?P<rate>[\d.]+)/s\s+\([\d.]+s,\s+[\d.]+/s\)\s+LR: (?P<lr>\S+)\s+"
    r"Data: (?P<data>[\d.]+) \([\d.]+\)")


# -- where timm's train.py is --------------------------------------------------------------------------
def find_timm_train(path: str | None) -> Path:
    """``path``, else ``../shared/anchors/timm/train.py`` beside the repository; SystemExit naming where to get it."""
    candidate = Path(path).expanduser() if path else DEFAULT_TIMM_TRAIN
    if candidate.is_file():
        return candidate.resolve()
    import timm

    raise SystemExit(f"timm's train.py not found at {candidate}: get train.py from "
                     f"github.com/huggingface/pytorch-image-models at tag v{timm.__version__} "
                     "and pass --timm-train PATH")


# -- data ----------------------------------------------------------------------------------------------
def write_png_set(root: Path, train_per_class: int, val_per_class: int) -> Path:
    """The embedded Fashion-MNIST PNGs as ``root/train/<class>/`` + ``root/validation/<class>/`` (reused if there)."""
    if (root / "validation").is_dir():
        return root
    from finetune.data.demo import write_demo_folder

    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_demo_folder(tmp, train_per_class=train_per_class, val_per_class=val_per_class)
    (tmp / "val").rename(tmp / "validation")
    tmp.rename(root)
    return root


def write_camera_set(root: Path, train_per_class: int, val_per_class: int, size: tuple[int, int] = CAMERA_SIZE,
                     quality: int = 90) -> Path:
    """The same images as camera-size JPEGs: upscaled to ``size``, 25 % of a scikit-image photo blended in."""
    if (root / "validation").is_dir():
        return root
    from PIL import Image
    from skimage import data as photos

    pngs = write_png_set(root.with_name(root.name + "-png-source"), train_per_class, val_per_class)
    backgrounds = [Image.fromarray(getattr(photos, name)()).convert("RGB").resize(size, Image.BICUBIC)
                   for name in ("astronaut", "coffee", "chelsea", "rocket")]
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for k, png in enumerate(sorted(pngs.glob("*/*/*.png"))):
        target = tmp / png.relative_to(pngs).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(png).convert("RGB").resize(size, Image.BICUBIC)
        Image.blend(image, backgrounds[k % len(backgrounds)], 0.25).save(target, quality=quality)
    tmp.rename(root)
    shutil.rmtree(pngs, ignore_errors=True)
    return root


# -- commands --------------------------------------------------------------------------------------------
def timm_command(train_py: Path, data: Path, model: str, px: int, batch: int, epochs: int, out: Path,
                 workers: int, extra: Iterable[str] = ()) -> list[str]:
    """The ``train.py`` command line (``extra``: ``--channels-last``, the fine-tuning flags, ...)."""
    return [sys.executable, str(train_py), "--data-dir", str(data), "--train-split", "train", "--val-split",
            "validation", "--model", model, "--num-classes", str(NUM_CLASSES), "--device", "cpu", "--img-size",
            str(px), "-b", str(batch), "--epochs", str(epochs), "-j", str(workers), "--log-interval", "1",
            "--seed", "0", "--output", str(out.parent), "--experiment", out.name, *extra]


def finetune_command(data: Path, model: str, px: int, batch: int, epochs: int, out: Path,
                     extra: Iterable[str] = ()) -> list[str]:
    """``finetune train`` with its defaults, through the loader-timing hook (:func:`hooked_finetune`)."""
    hook = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import vs_timm; "
            f"sys.exit(vs_timm.hooked_finetune({str(out / 'loader_timing.json')!r}, sys.argv[1:]))")
    return [sys.executable, "-c", hook, "train", "--data", str(data), "--model", model, "--img-size", str(px),
            "--batch-size", str(batch), "--epochs", str(epochs), "--seed", "0", "--no-progress", "--out", str(out),
            *extra]


class _TimedLoader:
    """A pass-through around a DataLoader that adds up the seconds spent in its iterator's ``next()``."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.seconds, self.batches = loader, 0.0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            tic = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - tic
                return
            self.seconds += time.perf_counter() - tic
            self.batches += 1
            yield batch


def hooked_finetune(timing_path: str, argv: list[str]) -> int:
    """Run ``finetune`` ``argv`` with the training loader timed per epoch; writes ``timing_path`` after each epoch."""
    import finetune.train.session as session
    from finetune.cli import main

    original, epochs = session.train_epoch, []

    def timed(net: Any, loader: Any, *args: Any, **kwargs: Any) -> Any:
        wrapped = _TimedLoader(loader)
        result = original(net, wrapped, *args, **kwargs)
        epochs.append({"epoch": kwargs.get("epoch"), "loader_s": wrapped.seconds, "batches": wrapped.batches})
        Path(timing_path).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_path).write_text(json.dumps(epochs))
        return result

    session.train_epoch = timed
    return main(argv) or 0


# -- running one command ---------------------------------------------------------------------------------
def count_rows(path: Path) -> int:
    """Data rows of a CSV file with a header (0 if it is not there yet)."""
    try:
        return max(0, sum(1 for line in path.read_text().splitlines() if line.strip()) - 1)
    except OSError:
        return 0


def run_timed(argv: list[str], log: Path, env: dict[str, str], rows_csv: Path, timeout: float) -> dict[str, Any]:
    """Run ``argv``; stdout+stderr lines with their arrival time (s after launch), arrival time of each new
    row of ``rows_csv`` (polled every 50 ms), wall time and the CPU share other processes took meanwhile."""
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[float, str]] = []
    busy_before, own_before = busy_cpu_seconds(), own_cpu_seconds()
    tic = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(REPO), bufsize=1)

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - tic, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    arrivals: list[float] = []
    while proc.poll() is None:
        now = time.perf_counter() - tic
        arrivals += [now] * (count_rows(rows_csv) - len(arrivals))
        if now > timeout:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=10)
    wall = time.perf_counter() - tic
    arrivals += [wall] * (count_rows(rows_csv) - len(arrivals))
    busy_after = busy_cpu_seconds()
    others = None if busy_before is None or busy_after is None else max(
        0.0, (busy_after - busy_before) - (own_cpu_seconds() - own_before)) / (wall * (os.cpu_count() or 1))
    log.write_text("".join(f"[{t:8.2f}] {text}\n" for t, text in lines))
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"`{' '.join(argv)}` exited with {proc.returncode} after {wall:.0f} s:\n{tail}")
    return {"lines": lines, "row_arrivals": arrivals, "wall_s": wall, "other_cpu_share": others,
            "argv": argv}


# -- parsing the two tools' output --------------------------------------------------------------------
def parse_timm_updates(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The per-update lines of timm's ``train_one_epoch`` (``--log-interval 1``) as dicts:
    epoch, idx, updates (per epoch), loss, time_s, images (rate × time, rounded), data_s."""
    updates = []
    for line in lines:
        match = TIMM_TRAIN_LINE.search(line)
        if match:
            time_s, rate = float(match["time"]), float(match["rate"])
            updates.append({"epoch": int(match["epoch"]), "idx": int(match["idx"]), "updates": int(match["n"]),
                            "loss": float(match["loss"]), "time_s": time_s, "images": round(rate * time_s),
                            "data_s": float(match["data"])})
    return updates


def timm_epochs(updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch (0-based, as timm counts): images, seconds (Σ update times), loader_s (Σ Data), img/s."""
    out: dict[int, dict[str, Any]] = {}
    for u in updates:
        e = out.setdefault(u["epoch"], {"epoch": u["epoch"], "images": 0, "seconds": 0.0, "loader_s": 0.0,
                                        "updates": 0, "updates_per_epoch": u["updates"]})
        e["images"] += u["images"]
        e["seconds"] += u["time_s"]
        e["loader_s"] += u["data_s"]
        e["updates"] += 1
    for e in out.values():
        e["images_per_s"] = e["images"] / max(e["seconds"], 1e-9)
    return [out[k] for k in sorted(out)]


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """All rows of a CSV file with a header (timm's summary.csv, finetune's log.csv)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def parse_timm_summary(path: Path) -> list[dict[str, float]]:
    """timm's ``summary.csv``: epoch (0-based) and eval_top1 as a fraction (timm writes a percentage)."""
    return [{"epoch": int(row["epoch"]), "val_top1": float(row["eval_top1"]) / 100.0,
             "train_loss": float(row["train_loss"])} for row in read_csv_rows(path)]


def parse_finetune_log(path: Path) -> list[dict[str, Any]]:
    """finetune's ``log.csv``: epoch (1-based), phase, val_top1, epoch_seconds, train_images_per_s."""
    return [{"epoch": int(row["epoch"]), "phase": row["phase"], "val_top1": float(row["val_top1"]),
             "epoch_seconds": float(row["epoch_seconds"]), "train_images_per_s": float(row["train_images_per_s"])}
            for row in read_csv_rows(path)]


def steady(values: list[dict[str, Any]], first_epoch: int) -> list[dict[str, Any]]:
    """The epochs after the first (warm-up); all of them when there is only one."""
    later = [v for v in values if v["epoch"] > first_epoch]
    return later or values


def time_to_target(curve: list[float], arrivals: list[float], target: float) -> tuple[float | None, int | None]:
    """(seconds, 1-based epoch) of the first epoch whose val top-1 reaches ``target``; (None, None) if none does."""
    for k, (top1, seconds) in enumerate(zip(curve, arrivals)):
        if top1 >= target:
            return seconds, k + 1
    return None, None


# -- one measured run per column --------------------------------------------------------------------------
def environment(threads: int, cache: Path | None = None) -> dict[str, str]:
    """The environment of every run: threads, offline hub, unbuffered output, this repository first."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        env["FINETUNE_CACHE"] = str(cache)
    return env


def fresh_cache(path: Path) -> Path:
    """An empty ``FINETUNE_CACHE`` whose ``weights/`` links to the user's cached offline weights."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / "weights").symlink_to(default_weights_dir(), target_is_directory=True)
    return path


def run_timm(train_py: Path, data: Path, model: str, px: int, batch: int, epochs: int, out: Path, threads: int,
             workers: int, extra: list[str], timeout: float) -> dict[str, Any]:
    """One timm run: per-epoch training figures from its log lines, the val curve from summary.csv."""
    shutil.rmtree(out, ignore_errors=True)
    argv = timm_command(train_py, data, model, px, batch, epochs, out, workers, extra)
    run = run_timed(argv, out.with_name(out.name + ".log"), environment(threads), out / "summary.csv", timeout)
    updates = parse_timm_updates(text for _, text in run["lines"])
    if not updates:
        raise RuntimeError(f"no `Train:` lines parsed from {out.with_name(out.name + '.log')}")
    epochs_ = timm_epochs(updates)
    first_line = next(t for t, text in run["lines"] if TIMM_TRAIN_LINE.search(text))
    summary = parse_timm_summary(out / "summary.csv")
    return {"tool": "timm", "argv": argv, "epochs": epochs_, "val_top1": [r["val_top1"] for r in summary],
            "row_arrivals": run["row_arrivals"], "wall_s": run["wall_s"], "other_cpu_share": run["other_cpu_share"],
            "setup_s": first_line - updates[0]["time_s"], "steady": steady(epochs_, 0)}


def run_finetune(data: Path, model: str, px: int, batch: int, epochs: int, out: Path, threads: int, cache: Path,
                 extra: list[str], timeout: float) -> dict[str, Any]:
    """One ``finetune train`` run: per-epoch figures from RUN/log.csv and the loader hook's timings."""
    shutil.rmtree(out, ignore_errors=True)
    argv = finetune_command(data, model, px, batch, epochs, out, extra)
    run = run_timed(argv, out.with_name(out.name + ".log"), environment(threads, fresh_cache(cache)),
                    out / "log.csv", timeout)
    rows = parse_finetune_log(out / "log.csv")
    timing = {t["epoch"]: t for t in json.loads((out / "loader_timing.json").read_text())}
    images = sum(1 for f in (data / "train").rglob("*") if f.is_file())  # every image, each epoch ...
    images -= int(images % batch == 1)  # ... except a last batch of one, which finetune drops
    epochs_ = []
    for row in rows:
        seconds = images / row["train_images_per_s"] if row["train_images_per_s"] > 0 else 0.0
        loader = timing.get(row["epoch"], {})
        epochs_.append({"epoch": row["epoch"], "phase": row["phase"], "images_per_s": row["train_images_per_s"],
                        "seconds": seconds, "images": images, "loader_s": loader.get("loader_s", 0.0)})
    meta = json.loads((out / "model.json").read_text()) if (out / "model.json").exists() else {}
    return {"tool": "finetune", "argv": argv, "epochs": epochs_, "val_top1": [r["val_top1"] for r in rows],
            "row_arrivals": run["row_arrivals"], "wall_s": run["wall_s"], "other_cpu_share": run["other_cpu_share"],
            "setup_s": run["row_arrivals"][0] - rows[0]["epoch_seconds"] if run["row_arrivals"] else None,
            "memory_format": meta.get("memory_format"), "steady": steady(epochs_, 1)}


def rate(run: dict[str, Any]) -> float:
    """Training images/s of a run's steady epochs (total images / total seconds)."""
    images = sum(e["images"] for e in run["steady"])
    seconds = sum(e["seconds"] for e in run["steady"])
    return images / max(seconds, 1e-9)


def loader_split(run: dict[str, Any]) -> dict[str, float]:
    """ms per image waiting for the loader and the rest of the loop (the step), over the steady epochs."""
    images = max(sum(e["images"] for e in run["steady"]), 1)
    seconds = sum(e["seconds"] for e in run["steady"])
    loader = sum(e["loader_s"] for e in run["steady"])
    return {"loader_ms_per_img": 1000 * loader / images, "step_ms_per_img": 1000 * (seconds - loader) / images,
            "loader_share": loader / max(seconds, 1e-9)}


# -- the benchmark -----------------------------------------------------------------------------------------
def measure_throughput(args: argparse.Namespace, train_py: Path, work: Path, plan: dict, models: list[str],
                       sizes: list[int]) -> list[dict[str, Any]]:
    """Every (data set, model, px): ``--repeats`` alternating runs of the three columns."""
    rows = []
    for dataset in args.datasets:
        for px in sizes:
            train_pc, val_pc = plan[(dataset, px)]
            writer = write_camera_set if dataset == "camera" else write_png_set
            tic = time.perf_counter()
            data = writer(work / f"data-{dataset}-{train_pc}-{val_pc}", train_pc, val_pc)
            print(f"\n{dataset} data: {train_pc} train / {val_pc} val per class at {data} "
                  f"({time.perf_counter() - tic:.1f} s)", flush=True)
            for model in models:
                row: dict[str, Any] = {"data": dataset, "model": model, "px": px, "train_per_class": train_pc,
                                       "val_per_class": val_pc, "runs": {c: [] for c in COLUMNS}}
                for repeat in range(args.repeats):
                    order = ["timm_best", "timm_default", "finetune"]
                    for column in (order if repeat % 2 == 0 else order[::-1]):
                        out = work / "runs" / f"{dataset}-{model}-{px}-{column}-{repeat}"
                        if column == "finetune":
                            run = run_finetune(data, model, px, args.batch, args.epochs, out, args.threads,
                                               work / "cache", ["--weights", "none"], args.timeout)
                        else:
                            extra = ["--channels-last"] if column == "timm_best" else []
                            run = run_timm(train_py, data, model, px, args.batch, args.epochs, out, args.threads,
                                           args.timm_workers, extra, args.timeout)
                        figures = {"images_per_s": rate(run), **loader_split(run), "wall_s": run["wall_s"],
                                   "other_cpu_share": run["other_cpu_share"], "epochs": run["epochs"],
                                   "argv": run["argv"], "memory_format": run.get("memory_format")}
                        row["runs"][column].append(figures)
                        print(f"  {model} {px}px {column:<12} {figures['images_per_s']:7.1f} img/s  loader "
                              f"{figures['loader_ms_per_img']:6.1f} ms/img, step {figures['step_ms_per_img']:6.1f} "
                              f"ms/img  others {100 * (run['other_cpu_share'] or 0):3.0f} %  ({run['wall_s']:.0f} s)",
                              flush=True)
                        shutil.rmtree(out, ignore_errors=True)
                summarise_row(row)
                rows.append(row)
    return rows


def summarise_row(row: dict[str, Any]) -> None:
    """Medians per column, ratio of the medians, [min–max] of the paired per-repeat ratios."""
    runs = row["runs"]
    for column in COLUMNS:
        row[column] = statistics.median(r["images_per_s"] for r in runs[column])
        for key in ("loader_ms_per_img", "step_ms_per_img", "loader_share"):
            row[f"{column}_{key}"] = statistics.median(r[key] for r in runs[column])
    for base in ("timm_best", "timm_default"):
        paired = [f["images_per_s"] / t["images_per_s"] for f, t in zip(runs["finetune"], runs[base])]
        row[f"finetune_over_{base}"] = row["finetune"] / row[base]
        row[f"finetune_over_{base}_paired"] = [min(paired), max(paired)]
    row["other_cpu_share_max"] = max((r["other_cpu_share"] or 0.0) for c in COLUMNS for r in runs[c])


def measure_time_to_target(args: argparse.Namespace, train_py: Path, work: Path, models: list[str],
                           train_pc: int | None, val_pc: int | None) -> list[dict[str, Any]]:
    """One run per tool and model from the same offline pretrained weights; seconds to ``--target``."""
    data = write_png_set(work / f"data-png-{train_pc}-{val_pc}", train_pc, val_pc)
    weights = default_weights_dir()
    rows = []
    print(f"\ntime to val top-1 ≥ {args.target} at {args.ttt_px} px, {args.ttt_epochs} epochs, data {data}",
          flush=True)
    for model in models:
        file = weights / f"{model}.safetensors"
        if not file.exists():
            raise SystemExit(f"no cached offline weights {file}: run `make install` (or `finetune models`) first")
        for tool in ("timm_best", "finetune"):
            out = work / "runs" / f"ttt-{model}-{tool}"
            if tool == "finetune":
                run = run_finetune(data, model, args.ttt_px, args.batch, args.ttt_epochs, out, args.threads,
                                   work / "cache", [], args.timeout)
            else:
                extra = ["--pretrained", "--pretrained-path", str(file), *TIMM_FINETUNE_FLAGS]
                run = run_timm(train_py, data, model, args.ttt_px, args.batch, args.ttt_epochs, out, args.threads,
                               args.timm_workers, extra, args.timeout)
            seconds, epoch = time_to_target(run["val_top1"], run["row_arrivals"], args.target)
            row = {"model": model, "tool": tool, "seconds_to_target": seconds, "epoch": epoch,
                   "val_top1": run["val_top1"], "row_arrivals": run["row_arrivals"], "setup_s": run["setup_s"],
                   "wall_s": run["wall_s"], "other_cpu_share": run["other_cpu_share"], "argv": run["argv"],
                   "images_per_s": rate(run)}
            rows.append(row)
            curve = " ".join(f"{v:.3f}" for v in run["val_top1"])
            print(f"  {model} {tool:<10} to target {seconds if seconds is None else round(seconds, 1)} s "
                  f"(epoch {epoch})  val {curve}  set-up {run['setup_s'] or 0:.1f} s  others "
                  f"{100 * (run['other_cpu_share'] or 0):.0f} %", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def fmt_ratio(row: dict[str, Any], base: str) -> str:
    lo, hi = row[f"finetune_over_{base}_paired"]
    return f"{row[f'finetune_over_{base}']:.2f} [{lo:.2f}–{hi:.2f}]"


def tables(rows: list[dict[str, Any]], ttt: list[dict[str, Any]], bar: float, smoke: bool = False) -> str:
    """The markdown tables: throughput (issue 16's columns), loader vs step, time to target; the bar is judged
    only at the issue's sizes (128, 224 px) and never in a ``--quick`` (smoke) run."""
    data_name = {"png": "Fashion-MNIST PNGs (28 px)", "camera": "JPEGs of 1600×1200 px"}
    lines = ["| data | model | px | timm default | timm `--channels-last` | `finetune train` (defaults) | "
             "finetune / timm best [paired min–max] | finetune / timm default | bar "
             f"{bar}× | others' CPU |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        verdict = ("meets" if r["finetune_over_timm_best"] >= bar else "MISSES") if r["px"] in SIZES and not smoke \
            else "— (smoke)" if smoke else "—"
        lines.append(f"| {r['train_per_class'] * NUM_CLASSES} {data_name[r['data']]} | {r['model']} | {r['px']} | "
                     f"{r['timm_default']:.1f} | {r['timm_best']:.1f} | {r['finetune']:.1f} | "
                     f"{fmt_ratio(r, 'timm_best')} | {fmt_ratio(r, 'timm_default')} | {verdict} | "
                     f"{100 * r['other_cpu_share_max']:.0f} % |")
    lines += ["", "| data | model | px | tool | loader wait ms/img | rest of step ms/img | loader share |",
              "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        for c in COLUMNS:
            lines.append(f"| {r['data']} | {r['model']} | {r['px']} | {c} | {r[f'{c}_loader_ms_per_img']:.2f} | "
                         f"{r[f'{c}_step_ms_per_img']:.2f} | {100 * r[f'{c}_loader_share']:.0f} % |")
    if ttt:
        lines += ["", "| model | tool | seconds to target | epoch | val top-1 by epoch | train img/s | set-up s | "
                      "timm time / this | others' CPU |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
        timm_time = {r["model"]: r["seconds_to_target"] for r in ttt if r["tool"] == "timm_best"}
        for r in ttt:
            s, base = r["seconds_to_target"], timm_time.get(r["model"])
            speed = "—" if r["tool"] == "timm_best" or s is None or base is None else f"{base / s:.2f}×"
            lines.append(f"| {r['model']} | {r['tool']} | {'not reached' if s is None else f'{s:.1f}'} | "
                         f"{r['epoch'] or '—'} | {' '.join(f'{v:.3f}' for v in r['val_top1'])} | "
                         f"{r['images_per_s']:.1f} | {r['setup_s'] or 0:.1f} | {speed} | "
                         f"{100 * (r['other_cpu_share'] or 0):.0f} % |")
    shares = [r["other_cpu_share_max"] for r in rows] + [r["other_cpu_share"] or 0.0 for r in ttt]
    if smoke:
        lines += ["", "smoke run (--quick): tiny data and one repeat check that the harness works; not a measurement"]
    if shares and max(shares) > 0.1:
        lines += ["", f"warning: other processes took up to {100 * max(shares):.0f} % of the CPUs during some runs; "
                      "these are not an idle machine's figures"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", default=None, help=f"timm's train.py (default {DEFAULT_TIMM_TRAIN})")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="input sizes, comma-separated")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="png, camera or both")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per column (median)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per throughput run (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                        help="OMP_NUM_THREADS / torch threads of every run")
    parser.add_argument("--timm-workers", type=int, default=2, help="timm's -j (its own default is 4)")
    parser.add_argument("--target", type=float, default=0.80, help="val top-1 for the time-to-target runs")
    parser.add_argument("--ttt-px", type=int, default=128)
    parser.add_argument("--ttt-epochs", type=int, default=4)
    parser.add_argument("--no-ttt", action="store_true", help="skip the time-to-target runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: mobilenetv2_100, 64 px, 4 train / 2 val images per class, batch 16, "
                             "1 repeat, time to target 0.2 in 2 epochs on 10 / 4 per class")
    parser.add_argument("--out", default=str(RESULTS / "vs_timm.json"))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    train_py = find_timm_train(args.timm_train)
    args.datasets = [d for d in args.datasets.split(",") if d]
    models, sizes = args.models.split(","), [int(s) for s in args.sizes.split(",")]
    plan: dict = dict(FULL_PLAN)
    ttt_data: tuple[int | None, int | None] = (None, None)  # the whole demo set
    if args.quick:
        models, sizes, args.repeats, args.batch = ["mobilenetv2_100"], [64], 1, 16
        args.ttt_px, args.ttt_epochs, args.target = 64, 2, 0.2
        plan = {(d, 64): (4, 2) for d in DATASETS}
        ttt_data = (10, 4)
    for key in [(d, px) for d in args.datasets for px in sizes if (d, px) not in plan]:
        plan[key] = (max(10, round(60 * (128 / key[1]) ** 2)), 10)  # other sizes: ~the same seconds per run

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    gflops_start = matmul_gflops()
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads"
    print(f"{machine}; fp32 matmul {gflops_start:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__}; timm train.py {train_py}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune-vs-timm-"))
    try:
        rows = measure_throughput(args, train_py, work, plan, models, sizes)
        ttt = [] if args.no_ttt else measure_time_to_target(args, train_py, work, models, *ttt_data)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    gflops_end = matmul_gflops()
    table = tables(rows, ttt, 1.25, smoke=args.quick)
    print(f"\n{machine}; fp32 matmul {gflops_start:.0f} GFLOP/s at the start, {gflops_end:.0f} at the end\n")
    print(table)
    import timm

    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "cpu": cpu_name(), "cpus": os.cpu_count(), "threads": args.threads,
              "matmul_gflops": {"start": gflops_start, "end": gflops_end}, "torch": torch.__version__,
              "timm": timm.__version__, "python": platform.python_version(), "timm_train": str(train_py),
              "quick": args.quick, "repeats": args.repeats, "epochs": args.epochs, "batch": args.batch,
              "timm_workers": args.timm_workers, "target": args.target, "ttt_px": args.ttt_px,
              "ttt_epochs": args.ttt_epochs, "timm_finetune_flags": TIMM_FINETUNE_FLAGS, "throughput": rows,
              "time_to_target": ttt, "table": table, "seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} in {result['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
