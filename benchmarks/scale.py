"""Start-up time, scan time, memory and training speed against data-set size (issue 17, "a million images").

For each size (``--sizes``, default 1,000 / 10,000 / 100,000 images in 10 class folders, split
80/20 by the scan) the real command line runs in a subprocess::

    finetune train --data D --model mobilenetv2_100 --weights offline --img-size 32 --epochs 1
                   --memory-format contiguous --no-progress --batch-size 32 --checkpoint-every 1 --out RUN

in four modes:

* ``first`` -- the default full check (every file decoded up front) with an empty scan cache: the
  **baseline**, today's full scan on this machine in this run;
* ``second`` -- the same command again: the scan cache answers for every file;
* ``lazy`` -- ``--check-images lazy``: nothing decoded up front;
* ``shards`` -- ``--data wds:SHARDS`` after ``finetune shard D --out SHARDS`` (written once per size,
  its time reported as ``shard write s``): classes and counts come from the shard index, nothing is
  scanned; the loader streams the tars (webdataset). Its img/s comes from its own throughput run.

**Start-up** is the wall time from starting the process to the first optimizer step, detected as
``RUN/checkpoints/latest`` naming update 1 (``--checkpoint-every 1``; polled every 5 ms); the
process is SIGKILLed once update 2 is named. The start-up therefore includes writing one checkpoint
(~0.1 s here; ``ckpt s``, estimated as below). **Scan** is the ``scan: ... (T s)`` line the run
prints. **RSS** is the training process's peak resident memory (``VmHWM``) at the first step (no
DataLoader workers on a 2-core machine). **img/s** comes from one more run per size in ``second``
mode with ``--checkpoint-every E`` (E = 20, fewer for small sets so it stays in the first epoch):
the time between the checkpoints for updates E and 2E is E updates plus one checkpoint, and
update 2 minus update 1 of the start-up runs is one update plus one checkpoint; the two give the
time per update without checkpoints, so ``img/s = 32 / (s per update)``.

The data are hard links of four 40x40 RGB PNGs (one inode each, backdated an hour so the scan
cache keeps their verdicts), so 100,000 images cost seconds and a few MB; the OS caches are warm
for every mode. Decoding such a PNG takes ~0.1 ms; a camera JPEG takes ~6 ms (issue 17's figure),
so with real photos the first-run baseline is much higher (~300 s more at 100,000 images on 2
cores) while the second run and ``lazy`` are not: the table adds that estimate, labelled as such.
Each start-up figure is the median of ``--repeats`` runs (the first mode empties the scan cache
before each). Every run also records the share of the CPUs that other processes took meanwhile
(``/proc/stat`` less this benchmark's own CPU time); the table shows the largest of a row's runs
and warns above 10 %: on a shared 2-core machine that is what moves the figures most. The weights come from ``~/.cache/finetune-vision/weights`` (symlinked into the
benchmark's own ``FINETUNE_CACHE``, so the offline conversion is not timed). The dense fp32 matmul
rate is printed beside the times to place the machine.

    .venv/bin/python benchmarks/scale.py                 # 1k, 10k, 100k; 3 repeats; ~12 min on 2 cores
    .venv/bin/python benchmarks/scale.py --quick         # 1k, 10k; 1 repeat; ~2 min
    .venv/bin/python benchmarks/scale.py --sizes 1000,300000 --repeats 1

Writes ``scale.json`` (every figure) and ``scale.png`` (four panels) to ``--out``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("first", "second", "lazy", "shards")
BATCH = 32
CLASSES = 10
JPEG_DECODE_S = 0.006  # one camera JPEG, for the labelled estimate
COMMAND = ["--model", "mobilenetv2_100", "--weights", "offline", "--img-size", "32", "--epochs", "1",
           "--memory-format", "contiguous", "--no-progress", "--batch-size", str(BATCH)]
SCAN_LINE = re.compile(r"^scan: (\d+) images, (\d+) decoded, (\d+) from cache \(([\d.]+) s\)", re.M)
SHARDS_LINE = re.compile(r"^shards: .*; (\d+) train / (\d+) val images \(from the index\)", re.M)


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Dense fp32 ``torch.mm`` (n × n) GFLOP/s, median of ``repeats`` after one warm-up (as train_vs_baseline.py)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / statistics.median(times) / 1e9


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# -- data and cache ----------------------------------------------------------------------------------
def _camera_photos(originals: Path) -> list[Path]:
    """Four 1600x1200 JPEGs (quality 90, ~4:3 like a phone camera) upscaled from scikit-image's photos."""
    from skimage import data as photos

    paths = []
    for k, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        image = Image.fromarray(getattr(photos, name)()).convert("RGB").resize((1600, 1200), Image.BICUBIC)
        paths.append(originals / f"{k}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def hardlinked_folder(root: Path, n: int, images: str = "png") -> Path:
    """``root/c<k>/<i>.<ext>``: ``n`` hard links of four images, an hour old -- 40x40 RGB PNGs
    (``images="png"``) or 1600x1200 camera-size JPEGs (``"camera"``)."""
    originals = root.parent / f"{root.name}-originals"
    originals.mkdir(parents=True)
    if images == "camera":
        sources = _camera_photos(originals)
    else:
        rng = np.random.default_rng(0)
        sources = []
        for k in range(4):
            sources.append(originals / f"{k}.png")
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(sources[-1])
    for path in sources:
        os.utime(path, (time.time() - 3600,) * 2)  # the links share the inode, hence the mtime
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n):
        os.link(sources[i % 4], root / f"c{i % CLASSES}" / f"{i:07d}{sources[0].suffix}")
    return root


def default_weights_dir() -> Path:
    """``cache_dir()/weights`` as it is without ``FINETUNE_CACHE`` (where `make install` put them)."""
    saved = os.environ.pop("FINETUNE_CACHE", None)
    try:
        from finetune.io import cache_dir

        return cache_dir() / "weights"
    finally:
        if saved is not None:
            os.environ["FINETUNE_CACHE"] = saved


def prepare_cache(cache: Path) -> str:
    """A fresh cache folder whose ``weights/`` are the user's (symlinked), or converted here once, untimed."""
    cache.mkdir(parents=True)
    weights = default_weights_dir()
    if (weights / "mobilenetv2_100.safetensors").exists():
        (cache / "weights").symlink_to(weights, target_is_directory=True)
        return f"symlinked {weights}"
    os.environ["FINETUNE_CACHE"] = str(cache)
    from finetune.models.offline import offline_weights_file

    return f"converted once into {offline_weights_file('mobilenetv2_100')}"


# -- one run of the command line -------------------------------------------------------------------
def latest_updates(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def proc_memory(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process in bytes ({} where /proc is not there)."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/status").read_text()
        return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS")}
    return {}


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``), or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return None


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def run_cli(data: Path | str, out: Path, cache: Path, check: str, every: int, marks: list[int], threads: int,
            timeout: float = 900) -> dict[str, Any]:
    """Start ``finetune train``; the wall time at which each update in ``marks`` is checkpointed; kill it after the last."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    argv = [sys.executable, "-m", "finetune.cli", "train", "--data", str(data), *COMMAND, "--check-images", check,
            "--checkpoint-every", str(every), "--out", str(out)]
    env = {**os.environ, "FINETUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]
    busy_before, own_before = busy_cpu_seconds(), own_cpu_seconds()
    with open(log, "w") as handle:
        tic = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
        seen: dict[int, float] = {}
        memory: dict[str, int] = {}
        try:
            while len(seen) < len(marks):
                updates = latest_updates(out)
                now = time.perf_counter() - tic
                for mark in marks:
                    if mark <= updates and mark not in seen:
                        seen[mark] = now
                        if mark == marks[0]:
                            memory = proc_memory(proc.pid)
                if proc.poll() is not None:
                    raise RuntimeError(f"`{' '.join(argv)}` ended ({proc.returncode}) before update {marks[-1]}:\n"
                                       + log.read_text()[-3000:])
                if now > timeout:
                    raise RuntimeError(f"no update {marks[-1]} within {timeout:.0f} s:\n" + log.read_text()[-3000:])
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
    wall, busy_after = time.perf_counter() - tic, busy_cpu_seconds()
    # the CPU share that other processes took while this run ran (0 on an otherwise idle machine)
    others = None if busy_before is None or busy_after is None else max(
        0.0, (busy_after - busy_before) - (own_cpu_seconds() - own_before)) / (wall * (os.cpu_count() or 1))
    text = log.read_text()
    scan, shards = SCAN_LINE.search(text), SHARDS_LINE.search(text)
    if scan is None and shards is None:
        raise RuntimeError(f"no scan line in the output of `{' '.join(argv)}`:\n{text[-3000:]}")
    if scan is not None:
        images, decoded, cached, seconds = scan.groups()
    else:  # shards: nothing scanned; the index's counts
        images, decoded, cached, seconds = int(shards.group(1)) + int(shards.group(2)), 0, 0, 0.0
    return {"marks": {str(k): v for k, v in sorted(seen.items())}, "scan_images": int(images),
            "decoded": int(decoded), "from_cache": int(cached), "scan_seconds": float(seconds),
            "peak_rss": memory.get("VmHWM"), "rss": memory.get("VmRSS"), "load_before": load_before,
            "load_after": os.getloadavg()[0], "other_cpu_share": others}


def throughput_every(n: int) -> int:
    """Checkpoint spacing for the img/s run: 20 updates, fewer when an epoch has under 2 × 20 + 1."""
    updates_per_epoch = -(-round(n * 0.8) // BATCH)
    return max(2, min(20, (updates_per_epoch - 1) // 2))


# -- the benchmark -----------------------------------------------------------------------------------
def measure_size(n: int, work: Path, cache: Path, repeats: int, threads: int, images: str = "png") -> dict[str, Any]:
    tic = time.perf_counter()
    data = hardlinked_folder(work / f"data-{n}", n, images)
    row: dict[str, Any] = {"images": n, "kind": images, "build_data_seconds": time.perf_counter() - tic, "runs": {}}
    print(f"\n{n:,} images (hard links made in {row['build_data_seconds']:.1f} s)", flush=True)
    shards = work / f"shards-{n}"
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", "shard", str(data), "--out", str(shards)], check=True,
                   capture_output=True, env={**os.environ, "FINETUNE_CACHE": str(cache)})
    row["shard_write_s"] = time.perf_counter() - tic
    print(f"  finetune shard wrote {len(list(shards.glob('*.tar')))} shard(s) in {row['shard_write_s']:.1f} s", flush=True)
    for repeat in range(repeats):
        for mode in MODES:
            if mode == "first":
                shutil.rmtree(cache / "scan", ignore_errors=True)  # the baseline: an empty scan cache
            check = "lazy" if mode == "lazy" else "true"
            source = f"wds:{shards}" if mode == "shards" else data
            run = run_cli(source, work / "runs" / f"{n}-{mode}-{repeat}", cache, check, 1, [1, 2], threads)
            row["runs"].setdefault(mode, []).append(run)
            expected_decoded = n if mode == "first" else 0
            if run["scan_images"] != n or run["decoded"] != expected_decoded:
                raise RuntimeError(f"{mode}: expected {n} images, {expected_decoded} decoded; got {run}")
            print(f"  {mode:<6} start-up {run['marks']['1']:6.2f} s   scan {run['scan_seconds']:6.2f} s   "
                  f"peak RSS {run['peak_rss'] / 1e6:6.0f} MB   other processes {100 * (run['other_cpu_share'] or 0):3.0f} % "
                  "of the CPUs", flush=True)
    every = throughput_every(n)
    speed = run_cli(data, work / "runs" / f"{n}-throughput", cache, "true", every, [every, 2 * every], threads)
    row["throughput_run"] = {"every": every, **speed}
    shard_speed = run_cli(f"wds:{shards}", work / "runs" / f"{n}-throughput-shards", cache, "true", every,
                          [every, 2 * every], threads)
    row["throughput_run_shards"] = {"every": every, **shard_speed}
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(data.parent / f"{data.name}-originals", ignore_errors=True)

    for mode in MODES:
        runs = row["runs"][mode]
        row[mode] = {"startup_s": statistics.median(r["marks"]["1"] for r in runs),
                     "startup_all_s": [r["marks"]["1"] for r in runs],
                     "scan_s": statistics.median(r["scan_seconds"] for r in runs),
                     "peak_rss_bytes": statistics.median(r["peak_rss"] for r in runs),
                     "update_plus_checkpoint_s": statistics.median(r["marks"]["2"] - r["marks"]["1"] for r in runs),
                     "load_average": statistics.median(r["load_before"] for r in runs),
                     "other_cpu_share": max((r["other_cpu_share"] or 0.0) for r in runs)}
    folder_modes = [m for m in MODES if m != "shards"]
    one = statistics.median(row[m]["update_plus_checkpoint_s"] for m in folder_modes)  # 1 update + 1 checkpoint
    span = speed["marks"][str(2 * every)] - speed["marks"][str(every)]  # `every` updates + 1 checkpoint
    per_update = max((span - one) / (every - 1), 1e-9)
    row["seconds_per_update"] = per_update
    row["checkpoint_s"] = max(one - per_update, 0.0)
    row["train_img_per_s"] = BATCH / per_update
    one_shards = row["shards"]["update_plus_checkpoint_s"]
    span = shard_speed["marks"][str(2 * every)] - shard_speed["marks"][str(every)]
    row["shards_img_per_s"] = BATCH / max((span - one_shards) / (every - 1), 1e-9)
    row["shards_over_first"] = row["shards"]["startup_s"] / row["first"]["startup_s"]
    first, second, lazy = row["first"]["startup_s"], row["second"]["startup_s"], row["lazy"]["startup_s"]
    row["second_over_first"], row["lazy_over_first"] = second / first, lazy / first
    if images == "camera":  # measured with camera JPEGs: no estimate needed
        row["first_startup_camera_jpeg_estimate_s"], row["second_over_first_camera_jpeg_estimate"] = first, second / first
        return row
    decode = row["first"]["scan_s"] - row["second"]["scan_s"]  # what decoding the tiny PNGs cost
    row["first_startup_camera_jpeg_estimate_s"] = first - decode + n * JPEG_DECODE_S / (os.cpu_count() or 1)
    row["second_over_first_camera_jpeg_estimate"] = second / row["first_startup_camera_jpeg_estimate_s"]
    return row


def print_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| images | mode | start-up s | scan s | peak RSS MB | start-up ÷ first | others' CPU |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for mode in MODES:
            f = row[mode]
            lines.append(f"| {row['images']:,} | {mode} | {f['startup_s']:.2f} | {f['scan_s']:.2f} | "
                         f"{f['peak_rss_bytes'] / 1e6:.0f} | {f['startup_s'] / row['first']['startup_s']:.2f} | "
                         f"{100 * f['other_cpu_share']:.0f} % |")
    how = "measured" if rows and rows[0].get("kind") == "camera" else "estimate"
    lines += ["", f"| images | train img/s | shards img/s | shard write s | s/update | checkpoint s | first-run start-up, "
              f"camera JPEGs ({how}) s | second ÷ first, camera JPEGs ({how}) | others' CPU |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['images']:,} | {row['train_img_per_s']:.0f} | {row['shards_img_per_s']:.0f} | "
                     f"{row['shard_write_s']:.1f} | {row['seconds_per_update']:.3f} | "
                     f"{row['checkpoint_s']:.2f} | {row['first_startup_camera_jpeg_estimate_s']:.0f} | "
                     f"{row['second_over_first_camera_jpeg_estimate']:.3f} | "
                     f"{100 * (row['throughput_run']['other_cpu_share'] or 0):.0f} % |")
    shares = [r[m]["other_cpu_share"] for r in rows for m in MODES]
    shares += [r["throughput_run"]["other_cpu_share"] or 0.0 for r in rows]
    if max(shares) > 0.1:
        lines += ["", f"warning: other processes used up to {100 * max(shares):.0f} % of the CPUs during some runs "
                      "(others' CPU: the largest share among a row's runs); those times are not an idle machine's"]
    table = "\n".join(lines)
    print("\n" + table)
    return table


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["images"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    panels = [("startup_s", "start-up to first step (s)"), ("scan_s", "scan (s)"),
              ("peak_rss_bytes", "peak RSS at first step (MB)")]
    for ax, (key, label) in zip(axes.flat, panels):
        for mode in MODES:
            values = [r[mode][key] / (1e6 if key == "peak_rss_bytes" else 1) for r in rows]
            ax.plot(sizes, values, marker="o", label=mode + (" (baseline)" if mode == "first" else ""))
        ax.set_xscale("log")
        ax.set_xlabel("images")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes.flat[3]
    ax.plot(sizes, [r["train_img_per_s"] for r in rows], marker="o", color="black", label="folder")
    ax.plot(sizes, [r["shards_img_per_s"] for r in rows], marker="s", color="grey", label="shards")
    ax.legend()
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("images")
    ax.set_ylabel("training img/s (second mode; shards)")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated image counts")
    parser.add_argument("--repeats", type=int, default=3, help="start-up runs per size and mode (median)")
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 images, 1 repeat")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--images", default="png", choices=("png", "camera"),
                        help="png: hard links of 40x40 PNGs (default); camera: of 1600x1200 JPEGs, so the first "
                             "run's decode is measured, not estimated (~3 ms per image per core)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for scale.json and scale.png")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    sizes = [1000, 10000] if args.quick else [int(s.replace("_", "")) for s in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    gflops = matmul_gflops()
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, fp32 matmul {gflops:.0f} GFLOP/s ({args.threads} threads)"
    print(f"{machine}; torch {torch.__version__}, Python {platform.python_version()}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune-scale-"))
    cache = work / "cache"
    weights = prepare_cache(cache)
    print(f"FINETUNE_CACHE={cache} (weights: {weights})")
    rows = []
    try:
        for n in sizes:
            rows.append(measure_size(n, work, cache, repeats, args.threads, args.images))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table = print_table(rows)
    last = rows[-1]
    camera = ("measured: the data are camera JPEGs" if args.images == "camera" else
              f"estimate, {JPEG_DECODE_S * 1000:.0f} ms decode each")
    print(f"\nsecond-run start-up ÷ first-run start-up at {last['images']:,} {args.images} images: "
          f"{last['second_over_first']:.3f} (issue 17's bar: ≤ 0.10 at 100,000); lazy ÷ first: "
          f"{last['lazy_over_first']:.3f}; with camera JPEGs ({camera}): {last['second_over_first_camera_jpeg_estimate']:.3f}; "
          f"shards ÷ first: {last['shards_over_first']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"when": datetime.now().isoformat(timespec="seconds"), "machine": machine, "cpu": cpu_name(),
              "cpus": os.cpu_count(), "threads": args.threads, "matmul_gflops": gflops, "torch": torch.__version__,
              "python": platform.python_version(), "command": "finetune train --data D " + " ".join(COMMAND),
              "sizes": sizes, "repeats": repeats, "images": args.images, "weights": weights, "rows": rows, "table": table,
              "seconds": time.perf_counter() - started}
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "scale.png", f"finetune train start-up vs data-set size — {machine}")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'} in {result['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
