"""`finetune train` against a plain accelerate loop: training images/s and time to a target accuracy.

The baseline is the loop of accelerate's ``examples/cv_example.py`` with timm's transforms:
torchvision ``ImageFolder`` + ``timm.data.create_transform(**resolve_data_config(model))``,
``DataLoader(shuffle=True)``, ``Accelerator(cpu=True)``, one ``prepare``, AdamW at lr/25 with
``OneCycleLR(max_lr=lr)`` stepped per batch, cross-entropy, ``accelerator.backward``, NCHW fp32,
every parameter trained; after each epoch an eval pass with ``gather_for_metrics``. The other
side is the real ``finetune.fit`` (what ``finetune train`` runs) with its defaults except
``strategy=full`` (so every epoch trains the whole network, as the baseline does). Both start
from the same offline weights (``finetune.load_model(weights="offline")``), use the same
image folder, batch size, input size, learning rate, epochs, DataLoader workers
(``finetune.train.build.default_num_workers()``) and ``torch.set_num_threads(--threads)``.

Throughput: images/s of the training loop only (validation excluded), over the epochs after the
first (warm-up); for ``finetune`` from ``RUN/log.csv`` ``train_images_per_s``. The two loops
alternate (B F, F B, B F, ...) ``--repeats`` times per (model, px); reported: the median of each,
their ratio and the [min-max] of the paired per-repeat ratios. Time to target: one run per loop
and model at 96 px on the whole demo set, wall time of train + val epochs until val top-1 first
reaches ``--target`` (cumulative ``epoch_seconds``); set-up (model load, scan, memory-format
probe, checkpoints, final eval) is printed separately. A third time-to-target loop,
``finetune-auto``, is ``finetune train`` with its default strategy (pretrained weights: one
head-only epoch, then everything with the body at lr x 0.3). Efficiency: FLOPs of one forward+backward
per image (``torch.utils.flop_counter.FlopCounterMode``, NCHW, train mode) × images/s, against
the dense fp32 ``torch.mm`` peak measured in the same run with the same thread count.

    OMP_NUM_THREADS=2 python benchmarks/train_vs_baseline.py           # full run, ~19 min on 2 idle cores
    OMP_NUM_THREADS=2 python benchmarks/train_vs_baseline.py --quick   # 96/128 px, 1 repeat, small data

Writes benchmarks/results/train_vs_baseline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from timm.data import create_transform, resolve_data_config
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision.datasets import ImageFolder

from finetune import Recipe
from finetune.data.demo import write_demo_folder
from finetune.rundir import load_model
from finetune.train import fit
from finetune.train.build import default_num_workers

MODELS = ("tf_efficientnet_lite0", "mobilenetv2_100")
BAR_SIZES = (128, 224)  # the bar: finetune >= BAR x baseline at these sizes, both models
BAR = 1.25
LR = 1e-3  # finetune's default optim.lr; the baseline uses the same peak LR
NUM_CLASSES = 10
# Image budget per input size (train images per class; val per class), so the full run fits in
# ~25 min on 2 cores: 224 px trains at ~15-30 img/s there.
FULL_PLAN = {96: (100, 10), 128: (60, 10), 224: (30, 10)}
QUICK_PLAN = {96: (20, 5), 128: (20, 5)}


# -- the two loops ---------------------------------------------------------------------------------
def _steady_rate(rows: list[dict[str, float]], warm_epochs: int) -> float:
    """Training images/s over the epochs after the warm-up ones (harmonic mean = total images / time)."""
    rates = [r["train_images_per_s"] for r in rows if r["epoch"] > warm_epochs] or \
            [r["train_images_per_s"] for r in rows]
    return len(rates) / sum(1.0 / r for r in rates)


def _time_to_target(rows: list[dict[str, float]], target: float) -> float | None:
    elapsed = 0.0
    for row in rows:
        elapsed += row["epoch_seconds"]
        if row["val_top1"] >= target:
            return elapsed
    return None


def run_finetune(data: Path, model: str, px: int, batch: int, epochs: int, out: Path, threads: int,
                 seed: int = 0, strategy: str = "full") -> dict[str, Any]:
    """The real ``finetune train`` code path (``fit``); per-epoch rows from ``RUN/log.csv``."""
    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(data=str(data), model=model, weights="offline", img_size=px, batch_size=batch, epochs=epochs,
                    strategy=strategy, out=str(out), memory_format="auto", seed=seed)
    tic = time.perf_counter()
    with open(out.with_name(out.name + ".log"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        fit(recipe, progress=False, overwrite=True)
    wall = time.perf_counter() - tic
    with open(out / "log.csv", newline="") as fh:
        rows = [{k: (v if k == "phase" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]
    meta = json.loads((out / "model.json").read_text())
    assert torch.get_num_threads() == threads, "fit() changed the thread count"
    return {"rows": rows, "wall_s": wall, "memory_format": meta.get("memory_format"),
            "bn": "frozen (pretrained default)"}


def run_baseline(data: Path, model_name: str, px: int, batch: int, epochs: int, threads: int,
                 seed: int = 0) -> dict[str, Any]:
    """accelerate's cv_example.py loop with timm transforms, NCHW fp32, all parameters trained."""
    torch.set_num_threads(threads)
    tic = time.perf_counter()
    AcceleratorState._reset_state(reset_partial_state=False)  # a fresh Accelerator, as a new script would get
    accelerator = Accelerator(cpu=True)
    set_seed(seed)
    model, _ = load_model(model_name, weights="offline", num_classes=NUM_CLASSES)  # same start as finetune
    config = resolve_data_config({"input_size": (3, px, px)}, model=model)
    train_ds = ImageFolder(str(data / "train"), transform=create_transform(**config, is_training=True))
    val_ds = ImageFolder(str(data / "val"), transform=create_transform(**config, is_training=False))
    workers = default_num_workers()
    train_dl = DataLoader(train_ds, shuffle=True, batch_size=batch, num_workers=workers)
    val_dl = DataLoader(val_ds, shuffle=False, batch_size=batch, num_workers=workers)
    model = model.to(accelerator.device)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=LR / 25)
    scheduler = OneCycleLR(optimizer=optimizer, max_lr=LR, epochs=epochs, steps_per_epoch=len(train_dl))
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl, scheduler)
    rows = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        seen = 0
        for images, labels in train_dl:
            outputs = model(images)
            loss = torch.nn.functional.cross_entropy(outputs, labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            seen += labels.size(0)
        train_s = time.perf_counter() - start
        model.eval()
        accurate = num_elems = 0
        for images, labels in val_dl:
            with torch.no_grad():
                outputs = model(images)
            predictions, references = accelerator.gather_for_metrics((outputs.argmax(dim=-1), labels))
            accurate += (predictions == references).long().sum().item()
            num_elems += references.shape[0]
        rows.append({"epoch": epoch, "val_top1": accurate / num_elems, "epoch_seconds": time.perf_counter() - start,
                     "train_images_per_s": seen / train_s, "train_loss": loss.item()})
    accelerator.end_training()
    return {"rows": rows, "wall_s": time.perf_counter() - tic, "memory_format": "contiguous (NCHW)",
            "bn": "train"}


# -- efficiency ------------------------------------------------------------------------------------
def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """``aten.convolution_backward`` FLOPs: grad_input and grad_weight each cost one forward conv.

    torch 2.14's own formula counts grad_weight as if the conv were dense (``groups`` ignored),
    which inflates a depthwise conv's backward by its channel count (lite0 at 96 px: 5.8 GFLOP
    of backward per image against 0.14 GFLOP of forward).
    """
    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: the same multiply-adds as the forward conv
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def train_flops_per_image(model_name: str, px: int, batch: int) -> float:
    """FLOPs of one forward + backward (all parameters trainable), per image: FlopCounterMode with
    :func:`_conv_backward_flop` for the conv backward (convolutions and matmuls only)."""
    model, _ = load_model(model_name, weights="none", num_classes=NUM_CLASSES)
    model.train()
    images, labels = torch.randn(batch, 3, px, px), torch.randint(0, NUM_CLASSES, (batch,))
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) \
            as counter:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch


def matmul_peak_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Dense fp32 ``torch.mm`` (n × n) GFLOP/s, median of ``repeats`` after one warm-up."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / statistics.median(times) / 1e9


# -- driver ----------------------------------------------------------------------------------------
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # some avg10=… avg60=… avg300=… total=…
        return float(dict(f.split("=") for f in first.split()[1:])["avg10"])
    return None


def _loop(kind: str, data: Path, model: str, px: int, args: argparse.Namespace, epochs: int, out: Path) -> dict:
    gc.collect()
    if kind == "baseline":
        return run_baseline(data, model, px, args.batch_size, epochs, args.threads)
    strategy = "auto" if kind == "finetune-auto" else "full"
    return run_finetune(data, model, px, args.batch_size, epochs, out, args.threads, strategy=strategy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96/128 px, 1 repeat, 20 images/class: a smoke test")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sizes (default 96 128 224)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per loop per (model, px) (default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per throughput run; the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both loops")
    parser.add_argument("--ttt-models", nargs="*", default=None,
                        help="models for the time-to-target runs (default: all of --models; the flag alone skips them)")
    parser.add_argument("--ttt-px", type=int, default=96)
    parser.add_argument("--ttt-epochs", type=int, default=None, help="default 4 (quick: 2)")
    parser.add_argument("--ttt-train-per-class", type=int, default=None, help="default 300, all (quick: 30)")
    parser.add_argument("--target", type=float, default=None, help="val top-1 to reach (default 0.80; quick 0.5)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "finetune-bench-train-vs-baseline"))
    parser.add_argument("--out", default="benchmarks/results/train_vs_baseline.json")
    args = parser.parse_args()
    plan = dict(QUICK_PLAN if args.quick else FULL_PLAN)
    sizes = args.sizes or list(plan)
    for px in sizes:
        plan.setdefault(px, FULL_PLAN[min(FULL_PLAN, key=lambda s: abs(s - px))])
    repeats = args.repeats or (1 if args.quick else 3)
    ttt_models = args.models if args.ttt_models is None else args.ttt_models
    ttt_epochs = args.ttt_epochs or (2 if args.quick else 4)
    ttt_per_class = args.ttt_train_per_class or (30 if args.quick else 300)
    ttt_val = 20 if args.quick else 100
    target = args.target if args.target is not None else (0.5 if args.quick else 0.80)
    work = Path(args.work)
    started = time.perf_counter()

    torch.set_num_threads(args.threads)
    workers = default_num_workers()
    load_start, pressure = os.getloadavg()[0], _cpu_pressure()
    print(f"torch {torch.__version__}, {args.threads} threads (torch.set_num_threads), {os.cpu_count()} CPUs: "
          f"{_cpu_name()}; DataLoader workers {workers}; batch {args.batch_size}; load average {load_start:.2f}"
          + ("" if pressure is None else f", CPU pressure (PSI some avg10) {pressure:.1f}%"))
    # PSI says whether something is waiting for a CPU now; the 1-min load average still counts a
    # process that ended a minute ago, so it only decides where PSI is missing
    if (pressure if pressure is not None else 50 * load_start) > 25:
        print("warning: the CPUs are busy with another process: these numbers will be skewed")
    peak_start = matmul_peak_gflops()
    print(f"dense fp32 matmul peak (torch.mm 2048x2048, median of 7): {peak_start:.1f} GFLOP/s")
    print("throughput runs: " + "; ".join(f"{px} px: {plan[px][0]} train + {plan[px][1]} val images/class, "
                                          f"{args.epochs} epochs (first = warm-up)" for px in sizes)
          + f"; {repeats} repeat(s) per loop, alternating")

    flops: dict[tuple[str, int], float] = {}
    rows: list[dict[str, Any]] = []
    header = (f"{'model':<24}{'px':>5}{'img/cls':>8}{'baseline':>10}{'finetune':>10}{'ratio':>7}{'[min-max]':>13}"
              f"{'fmt':>6}{'GFLOP/img':>10}{'base GF/s':>10}{'ft GF/s':>9}{'base %pk':>9}{'ft %pk':>8}")
    lines = []
    for model in args.models:
        for px in sizes:
            per_class, val_per_class = plan[px]
            data = write_demo_folder(work / "data" / f"train{per_class}-val{val_per_class}",
                                     train_per_class=per_class, val_per_class=val_per_class)
            flops[model, px] = train_flops_per_image(model, px, args.batch_size)
            runs: dict[str, list[dict]] = {"baseline": [], "finetune": []}
            for r in range(repeats):
                order = ("baseline", "finetune") if r % 2 == 0 else ("finetune", "baseline")
                for kind in order:
                    out = work / "runs" / f"{model}-{px}-r{r}"
                    result = _loop(kind, data, model, px, args, args.epochs, out)
                    result["img_per_s"] = _steady_rate(result["rows"], warm_epochs=1)
                    runs[kind].append(result)
            base = [x["img_per_s"] for x in runs["baseline"]]
            ft = [x["img_per_s"] for x in runs["finetune"]]
            paired = [f / b for f, b in zip(ft, base)]
            row = {
                "model": model, "img_size": px, "train_per_class": per_class, "val_per_class": val_per_class,
                "epochs": args.epochs, "repeats": repeats,
                "baseline_img_per_s": statistics.median(base), "finetune_img_per_s": statistics.median(ft),
                "baseline_runs": base, "finetune_runs": ft, "paired_ratios": paired,
                "finetune_memory_format": sorted({x["memory_format"] for x in runs["finetune"]}),
                "train_gflop_per_image": flops[model, px] / 1e9, "load_average_after": os.getloadavg()[0],
                "cpu_pressure_after": _cpu_pressure(),
            }
            row["ratio"] = row["finetune_img_per_s"] / row["baseline_img_per_s"]
            for kind in ("baseline", "finetune"):
                row[f"{kind}_gflop_per_s"] = row["train_gflop_per_image"] * row[f"{kind}_img_per_s"]
                row[f"{kind}_fraction_of_peak"] = row[f"{kind}_gflop_per_s"] / peak_start
            rows.append(row)
            fmt = "/".join("CL" if f == "channels_last" else "NCHW" for f in row["finetune_memory_format"])
            line = (f"{model:<24}{px:>5}{per_class:>8}{row['baseline_img_per_s']:>10.1f}"
                    f"{row['finetune_img_per_s']:>10.1f}{row['ratio']:>7.2f}"
                    f"{f'[{min(paired):.2f}-{max(paired):.2f}]':>13}{fmt:>6}{row['train_gflop_per_image']:>10.3f}"
                    f"{row['baseline_gflop_per_s']:>10.1f}{row['finetune_gflop_per_s']:>9.1f}"
                    f"{100 * row['baseline_fraction_of_peak']:>8.1f}%{100 * row['finetune_fraction_of_peak']:>7.1f}%")
            lines.append(line)
            if len(lines) == 1:
                print("\n" + header)
            print(line, flush=True)

    ttt_rows = []
    if ttt_models:
        data = write_demo_folder(work / "data" / f"train{ttt_per_class}-val{ttt_val}",
                                 train_per_class=ttt_per_class, val_per_class=ttt_val)
        print(f"\ntime to val top-1 >= {target:.2f}: {args.ttt_px} px, {ttt_per_class} train + {ttt_val} val "
              f"images/class, {ttt_epochs} epochs, one run per loop (train + val epoch time; set-up apart)")
        print(f"{'model':<24}{'loop':<14}{'to target s':>12}{'epoch':>6}{'val top-1 by epoch':>28}{'img/s':>8}"
              f"{'setup s':>9}")
        for model in ttt_models:
            result = {}
            for kind in ("baseline", "finetune", "finetune-auto"):
                out = work / "runs" / f"{model}-ttt-{kind}"
                res = _loop(kind, data, model, args.ttt_px, args, ttt_epochs, out)
                seconds = _time_to_target(res["rows"], target)
                epoch = next((int(r["epoch"]) for r in res["rows"] if r["val_top1"] >= target), None)
                setup = res["wall_s"] - sum(r["epoch_seconds"] for r in res["rows"])
                result[kind] = {"seconds_to_target": seconds, "epoch_reached": epoch,
                                "val_top1": [r["val_top1"] for r in res["rows"]],
                                "epoch_seconds": [r["epoch_seconds"] for r in res["rows"]],
                                "img_per_s": _steady_rate(res["rows"], warm_epochs=1),
                                "setup_seconds": setup, "wall_seconds": res["wall_s"]}
                curve = " ".join(f"{v:.3f}" for v in result[kind]["val_top1"])
                shown = "not reached" if seconds is None else f"{seconds:.1f}"
                print(f"{model:<24}{kind:<14}{shown:>12}{epoch or '-':>6}{curve:>28}"
                      f"{result[kind]['img_per_s']:>8.1f}{setup:>9.1f}", flush=True)
            b = result["baseline"]["seconds_to_target"]
            speedups = {}
            for kind in ("finetune", "finetune-auto"):
                f = result[kind]["seconds_to_target"]
                speedups[kind] = b / f if b and f else None
                shown = "n/a" if speedups[kind] is None else f"{speedups[kind]:.2f}x"
                print(f"{'':<24}{'speed-up':<14}{shown:>12}  (baseline time / {kind} time)")
            ttt_rows.append({"model": model, "img_size": args.ttt_px, "train_per_class": ttt_per_class,
                             "val_per_class": ttt_val, "epochs": ttt_epochs, "target": target,
                             "speedup_baseline_over": speedups, **result})

    peak_end = matmul_peak_gflops()
    load_end = os.getloadavg()[0]
    print(f"\ndense fp32 matmul peak at the end: {peak_end:.1f} GFLOP/s (start {peak_start:.1f}; %pk uses the start)")
    verdicts = []
    for row in rows:
        if row["img_size"] in BAR_SIZES:
            ok = row["ratio"] >= BAR
            verdicts.append(ok)
            print(f"bar {BAR}x: {row['model']} {row['img_size']} px: {row['ratio']:.2f}x "
                  f"{'meets' if ok else 'MISSES'}" + (" (quick mode: 1 repeat, small data; not the bar)"
                                                      if args.quick else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(), "cpu": _cpu_name(),
        "machine": platform.machine(), "dataloader_workers": workers, "batch_size": args.batch_size,
        "quick": args.quick, "load_average_start": load_start, "load_average_end": load_end,
        "cpu_pressure_start": pressure, "cpu_pressure_end": _cpu_pressure(),
        "matmul_peak_gflops": {"start": peak_start, "end": peak_end},
        "bar": {"ratio": BAR, "sizes": list(BAR_SIZES), "all_met": all(verdicts) if verdicts else None},
        "rows": rows, "time_to_target": ttt_rows, "seconds": time.perf_counter() - started,
    }, indent=2))
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
