"""``finetune compress``: build smaller variants of a run, measure every one on this machine, and
recommend the fastest within an accuracy tolerance.

Variants (``variants=``, comma-separated): ``fp32`` (the ONNX export), ``int8`` (static int8 QDQ,
:func:`~finetune.export.quantize.quantize_run`), ``sep:macs=X`` / ``sep:rank=R`` (dense k×k
convolutions made depthwise-separable by :func:`~finetune.tasks.convert.convert_run`, BatchNorm
re-estimated and 1×1 layers refitted on calibration images; distilled from the run for
``distill_epochs`` epochs on its recipe data -- default 0: **not distilled**) and ``sep:…+int8``
(that, quantized). Default: ``fp32,int8`` and, for a
model with dense k×k convolutions, ``sep:macs=0.5`` and ``sep:macs=0.5+int8``.

Every variant is a stage with its own folder ``OUT/variants/<name>/``, finished when its
``stage.json`` exists (written last): a killed command run again skips finished stages. Each is
evaluated with ONNX Runtime on the run's validation split (top-1, agreement with fp32, file size).
Latency is then measured for all variants together (ONNX Runtime CPU, interleaved runs, medians,
batch 1 and 32, threads stated) and ``report.json``, ``report.csv`` and ``pareto.png`` written.
Peak memory is not measured in this version.

>>> import finetune                                                              # doctest: +SKIP
>>> report = finetune.compress("runs/photos", out="runs/photos-compressed")      # doctest: +SKIP
>>> report.best(max_drop=0.5)["variant"]                                         # doctest: +SKIP
'int8'
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.data import Sample, eval_loader, list_images
from finetune.errors import FinetuneError
from finetune.export.ortbench import compare_logits, default_threads, file_mb, interleaved_latency, onnx_logits
from finetune.export.quantize import DEFAULT_CALIB_IMAGES, quantize_run, validation_samples
from finetune.export.runner import export_run
from finetune.io import read_json, write_json, write_text
from finetune.rundir import load_model, read_run_meta

__all__ = ["CompressReport", "DEFAULT_MAX_DROP", "STAGE_FILE", "compress", "parse_variants"]

STAGE_FILE = "stage.json"
DEFAULT_MAX_DROP = 1.0
_VARIANT = re.compile(r"^(fp32|int8|sep:(macs|rank)=([0-9.]+)(\+int8)?)$")
_COLUMNS = ("variant", "top1", "drop_points", "agreement", "size_mb", "latency_b1_ms", "latency_b32_ms",
            "throughput_b32_img_s", "threads")


def parse_variants(text: str | Sequence[str]) -> list[str]:
    """Variant names from ``"fp32,int8,sep:macs=0.4+int8"`` (checked; fp32 always first).

    >>> parse_variants("int8, sep:macs=0.4+int8")
    ['fp32', 'int8', 'sep:macs=0.4+int8']
    >>> parse_variants("fp16")
    Traceback (most recent call last):
    ...
    finetune.errors.FinetuneError: unknown variant `fp16`; use fp32, int8, sep:macs=X, sep:rank=R, optionally +int8 after sep:...
    """
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    for name in names:
        match = _VARIANT.match(name)
        if not match:
            raise FinetuneError(f"unknown variant `{name}`; use fp32, int8, sep:macs=X, sep:rank=R, "
                                "optionally +int8 after sep:...")
        if match.group(2) == "macs" and not 0 < float(match.group(3)) < 1:
            raise FinetuneError(f"variant `{name}`: macs must be a fraction in (0, 1), e.g. sep:macs=0.4")
        if match.group(2) == "rank" and (not match.group(3).isdigit() or int(match.group(3)) < 1):
            raise FinetuneError(f"variant `{name}`: rank must be a whole number >= 1, e.g. sep:rank=1")
    return ["fp32"] + [n for i, n in enumerate(names) if n != "fp32" and n not in names[:i]]


def _has_dense_convs(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.groups == 1 and max(m.kernel_size) > 1 and m.in_channels > 4
               for m in model.modules())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name.replace(":", "-"))


@dataclass
class CompressReport:
    """Every variant's measured figures (``rows``, fp32 first) and where the report lives."""

    out: Path
    rows: list[dict[str, Any]]
    max_drop: float = DEFAULT_MAX_DROP
    notes: list[str] = field(default_factory=list)

    def best(self, max_drop: float | None = None, batch_size: int = 1) -> dict[str, Any]:
        """The fastest variant (at ``batch_size`` 1 or 32) within ``max_drop`` points of fp32 top-1.

        No variant slower than a more accurate one can be picked: that one is within the
        tolerance too, and faster. fp32 itself always qualifies.

        >>> rows = [{"variant": "fp32", "drop_points": 0.0, "latency_b1_ms": 5.0},
        ...         {"variant": "int8", "drop_points": 0.4, "latency_b1_ms": 4.0},
        ...         {"variant": "sep", "drop_points": 3.0, "latency_b1_ms": 2.0}]
        >>> CompressReport(Path("."), rows).best(max_drop=0.5)["variant"]
        'int8'
        >>> CompressReport(Path("."), rows).best(max_drop=0.1)["variant"]
        'fp32'
        """
        limit = self.max_drop if max_drop is None else max_drop
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
            raise FinetuneError(f"max_drop must be a number of accuracy points >= 0, got `{max_drop}`")
        key = f"latency_b{batch_size}_ms"
        ok = [r for r in self.rows if r["drop_points"] <= limit and r.get(key) is not None]
        return min(ok, key=lambda r: (r[key], r["drop_points"]))

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        return {"out": str(self.out), "max_drop": self.max_drop, "recommendation": best["variant"],
                "rows": self.rows, "notes": self.notes}

    @classmethod
    def load(cls, out: str | os.PathLike) -> "CompressReport":
        """Read ``OUT/report.json`` back."""
        data = read_json(Path(out) / "report.json")
        return cls(Path(out), data["rows"], data["max_drop"], data.get("notes", []))

    def table(self) -> str:
        """The rows as aligned text, the recommendation marked."""
        best = self.best()["variant"]
        lines = [f"{'variant':<22} {'top-1':>7} {'drop':>6} {'agree':>6} {'MB':>6} {'b1 ms':>8} {'b32 ms':>8} "
                 f"{'b32 img/s':>9}"]
        for r in self.rows:
            mark = "  <- recommended" if r["variant"] == best else ""
            lines.append(f"{r['variant']:<22} {r['top1']:7.4f} {r['drop_points']:6.2f} {r['agreement']:6.3f} "
                         f"{r['size_mb']:6.2f} {r['latency_b1_ms']:8.2f} {r['latency_b32_ms']:8.2f} "
                         f"{r['throughput_b32_img_s']:9.1f}{mark}")
        threads = self.rows[0].get("threads")
        lines.append(f"ONNX Runtime CPU, {threads} thread(s), medians of interleaved runs; drop in points vs fp32 "
                     f"on the validation split; recommendation: fastest at batch 1 within {self.max_drop:g} points")
        return "\n".join(lines)


def _stage(out: Path, name: str, build) -> dict[str, Any]:
    """Run ``build(folder) -> dict`` once: ``folder/stage.json`` marks the stage finished."""
    folder = out / "variants" / _slug(name)
    done = folder / STAGE_FILE
    if done.is_file():
        return read_json(done)
    if folder.exists():
        shutil.rmtree(folder)  # a stage killed half-way starts again
    folder.mkdir(parents=True)
    result = {"variant": name, **build(folder)}
    write_json(done, result)
    return result


def _evaluate(model: Path, reference: np.ndarray, labels: np.ndarray, loader, threads: int) -> dict[str, Any]:
    logits, _ = onnx_logits(model, loader, threads)
    stats = compare_logits(reference, logits, labels)
    return {"top1": stats["top1"], "drop_points": stats["drop_points"], "agreement": stats["agreement"],
            "max_abs_logit_diff": stats["max_abs_logit_diff"], "size_mb": file_mb(model)}


def compress(
    run_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    variants: str | Sequence[str] | None = None,
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    calib_images: int = DEFAULT_CALIB_IMAGES,
    calib_method: str = "minmax",
    threads: int | None = None,
    latency_seconds: float = 2.0,
    distill_epochs: int = 0,
    progress: bool = False,
) -> CompressReport:
    """Build, evaluate and time the ``variants`` of ``run_dir``; write ``OUT/report.{json,csv}`` and
    ``OUT/pareto.png`` (default ``OUT``: ``RUN-compressed`` beside the run).

    ``data``: a labelled folder to evaluate on (its ``val/`` or all its images) instead of the run's
    validation split; calibration then uses its images too. ``max_drop``: tolerance of the
    recommendation (points of top-1 below fp32). ``distill_epochs``: epochs of distillation from
    the run for each separable variant (default 0: not distilled; needs the run's ``recipe.yaml``).
    See the module docstring for variants and stages.

    >>> report = compress("runs/photos", variants="fp32,int8")        # doctest: +SKIP
    >>> report.best(max_drop=0.5)["variant"], report.out              # doctest: +SKIP
    ('int8', PosixPath('runs/photos-compressed'))
    """
    run_dir = Path(run_dir).expanduser()
    read_run_meta(run_dir)
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise FinetuneError(f"max_drop must be a number of accuracy points >= 0 (e.g. 1.0), got `{max_drop}`")
    if isinstance(distill_epochs, bool) or not isinstance(distill_epochs, int) or distill_epochs < 0:
        raise FinetuneError(f"distill_epochs must be a whole number >= 0, got `{distill_epochs}`")
    out_dir = Path(out).expanduser() if out is not None else run_dir.with_name(run_dir.name + "-compressed")
    model, data_config = load_model(run_dir)
    notes = []
    if variants is None:
        names = ["fp32", "int8"]
        if _has_dense_convs(model):
            names += ["sep:macs=0.5", "sep:macs=0.5+int8"]
        else:
            notes.append("no dense k×k convolutions: separable variants skipped")
    else:
        names = parse_variants(variants)
    val, train, source = validation_samples(run_dir, data)
    if data is not None:
        train = [Sample(p, -1) for p in list_images([data])[0]]  # calibrate on the given folder
    split = (val, train, source)
    threads = threads or default_threads()
    loader = eval_loader(val, data_config, 32)
    say = print if progress else (lambda *a, **k: None)

    def build_fp32(folder: Path) -> dict[str, Any]:
        path = export_run(run_dir, out=folder, images=[s.path for s in val[:16]]).model_path
        return {"model": str(path.relative_to(out_dir)), **_evaluate(path, *onnx_logits(path, loader, threads),
                                                                      loader, threads)}

    say("variant fp32 ...", flush=True)
    rows = [_stage(out_dir, "fp32", build_fp32)]
    reference, labels = onnx_logits(out_dir / rows[0]["model"], loader, threads)
    for name in names[1:]:
        say(f"variant {name} ...", flush=True)
        rows.append(_stage(out_dir, name, lambda d, n=name: _build(n, run_dir, d, out_dir, split, calib_images,
                                                                   calib_method, reference, labels, loader,
                                                                   threads, distill_epochs)))
    say("latency ...", flush=True)
    timing = interleaved_latency({r["variant"]: out_dir / r["model"] for r in rows}, data_config["input_size"],
                                 threads=threads, seconds=latency_seconds)
    for row in rows:
        for t in timing:
            if t["model"] == row["variant"]:
                row[f"latency_b{t['batch_size']}_ms"] = t["median_ms"]
                row[f"throughput_b{t['batch_size']}_img_s"] = t["images_per_s"]
                row["threads"] = t["threads"]
    distilled = f"distilled for {distill_epochs} epoch(s)" if distill_epochs else "not distilled"
    notes.append(f"evaluated on {source} ({len(val)} images); separable variants {distilled}")
    report = CompressReport(out_dir, rows, float(max_drop), notes)
    write_json(out_dir / "report.json", report.to_dict())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "report.csv", buffer.getvalue())
    _pareto(report, out_dir / "pareto.png")
    return report


def _distill(teacher: Path, student: Path, out: Path, epochs: int) -> Path:
    """Distill the converted ``student`` from ``teacher`` on the teacher's own recipe data
    (the ``task: convert`` pipeline's last stage, :mod:`finetune.tasks.pipeline`)."""
    from finetune.config import Recipe
    from finetune.rundir import RUN_RECIPE
    from finetune.train import fit

    if not (teacher / RUN_RECIPE).is_file():
        raise FinetuneError(f"distillation needs the run's {RUN_RECIPE} (its data); `{teacher}` has none: "
                            "pass --distill-epochs 0")
    base = Recipe.from_yaml(teacher / RUN_RECIPE).to_dict()
    base["task"] = "train"
    recipe = Recipe.from_dict(base, {"model.name": str(student), "distill.teacher": str(teacher),
                                     "runtime.out": str(out), "strategy.name": "full", "optim.epochs": epochs})
    return fit(recipe, progress=False).run_dir


def _build(name: str, run_dir: Path, folder: Path, out_dir: Path, split, calib_images: int,
           calib_method: str, reference: np.ndarray, labels: np.ndarray, loader, threads: int,
           distill_epochs: int = 0) -> dict[str, Any]:
    """One variant's files in ``folder`` and its accuracy figures."""
    source, quantize = run_dir, name == "int8" or name.endswith("+int8")
    if name.startswith("sep:"):
        from finetune.tasks.convert import convert_run

        kind, value = name[4:].split("+")[0].split("=")
        calib = folder / "calib"  # the calibration sample as links: convert_run takes a folder
        calib.mkdir()
        for i, sample in enumerate(split[1][:calib_images]):
            (calib / f"{i:05d}{Path(sample.path).suffix}").symlink_to(Path(sample.path).resolve())
        policy = {"macs": float(value)} if kind == "macs" else {"rank": int(value)}
        convert_run(run_dir, folder / "run", calib_data=calib, calib_images=calib_images, latency=False, **policy)
        shutil.rmtree(calib)
        source = folder / "run"
        if distill_epochs:
            source = _distill(run_dir, source, folder / "distilled", distill_epochs)
    if quantize:
        path = quantize_run(source, out=folder / "export", split=split, calib_images=calib_images,
                            calib_method=calib_method, force=True, latency=False, threads=threads).model_path
    else:
        path = export_run(source, out=folder / "export", images=[s.path for s in split[0][:16]]).model_path
    return {"model": str(Path(path).relative_to(out_dir)),
            "source_run": str(source.relative_to(out_dir)) if source != run_dir else str(run_dir),
            **_evaluate(Path(path), reference, labels, loader, threads)}


def _pareto(report: CompressReport, path: Path) -> None:
    """Top-1 vs batch-1 latency, the Pareto front joined, fp32 and the recommendation marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.rows
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [r["latency_b1_ms"] for r in rows], [100 * r["top1"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((r for r in rows if not any(o["latency_b1_ms"] <= r["latency_b1_ms"] and o["top1"] >= r["top1"]
                                               and o is not r and (o["latency_b1_ms"], o["top1"]) !=
                                               (r["latency_b1_ms"], r["top1"]) for o in rows)),
                   key=lambda r: r["latency_b1_ms"])
    ax.plot([r["latency_b1_ms"] for r in front], [100 * r["top1"] for r in front], "--s", color="tab:orange",
            ms=9, mfc="none", label="Pareto front", zorder=2)
    ax.scatter([xs[0]], [ys[0]], marker="*", s=200, color="black", label="fp32 reference", zorder=4)
    best = report.best()
    ax.scatter([best["latency_b1_ms"]], [100 * best["top1"]], s=160, facecolors="none", edgecolors="tab:green",
               linewidths=2, label=f"recommended (≤ {report.max_drop:g} pt drop)", zorder=5)
    ax.set_xlabel(f"latency, batch 1 (ms, ONNX Runtime CPU, {rows[0].get('threads')} thread(s), median)")
    ax.set_ylabel("top-1 on the validation split (%)")
    ax.set_title("accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
