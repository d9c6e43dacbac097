"""Static post-training int8 quantization of a run's ONNX export, gated on validation accuracy.

:func:`quantize_run` exports the fp32 ONNX model (:func:`~finetune.export.export_run`, with its
parity check), runs ONNX Runtime's ``quant_pre_process`` (shape inference + graph optimisation) and
``quantize_static`` (QDQ format, int8 activations and per-channel symmetric int8 weights -- the S8S8
QDQ setting ONNX Runtime recommends first for CPUs; dynamic quantization is not offered: it is known
to collapse CNN accuracy) calibrated on a few hundred images put through the run's own eval
transform. Calibration images: a seeded sample of the run's training split (from its
``recipe.yaml``) or ``calib_data``.

Before anything is written, the fp32 and the int8 ONNX models are both evaluated on the run's
validation split (the split ``finetune train`` used: same folder or manifest, fraction and seed):
top-1 of both, top-1 agreement and max |logit difference|. When int8 top-1 is more than
``max_drop`` points below fp32 nothing is written (unless ``force``) and :class:`FinetuneError`
says the drop and what to try. Latency of both models is then measured with ONNX Runtime on this
machine (interleaved, medians, threads stated): int8 is not assumed to be faster -- on CPUs
without VNNI it often is not.

Options for models that need them:

* ``calib_method``: ``minmax`` (default), ``entropy`` (KL-divergence thresholds) or
  ``percentile`` (99.999th percentile of |x|); histograms are merged batch by batch
  (``CalibStridedMinMax``), so memory stays that of one batch.
* ``bias_correction``: ONNX Runtime has no bias correction (its ``extra_options`` offer
  ``CalibMovingAverage``, ``SmoothQuant`` for MatMul, ``QDQKeepRemovableActivations`` -- none
  corrects the shift int8 weights put on a layer's output mean). This module adds it: for every
  quantized Conv/Gemm, the output shift ``(W_int8 - W) · E[x]`` (E[x]: per-channel mean of the
  layer's fp32 input over the calibration images, Nagel et al. 2019, "Data-Free Quantization",
  empirical bias correction) is subtracted from the int32 bias. It matters most where one scale
  serves very different channels (per-tensor weights, depthwise layers, MobileNetV3).
* ``extra_options``: passed to ``quantize_static`` as given (e.g. ``{"CalibMovingAverage": True}``).

>>> from finetune.export.quantize import quantize_run                                  # doctest: +SKIP
>>> report = quantize_run("runs/photos", calib_method="entropy", max_drop=0.5)         # doctest: +SKIP
>>> print(report.summary())                                                            # doctest: +SKIP
int8: top-1 0.912 -> 0.908 (drop 0.40 points, agreement 0.985) ...
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from finetune.data import Sample, eval_loader, list_images, scan_labelled
from finetune.errors import FinetuneError, one_line
from finetune.export.ortbench import compare_logits, default_threads, file_mb, interleaved_latency, onnx_logits
from finetune.export.runner import export_run
from finetune.export.sidecar import INPUT_NAME, MODEL_FILES, PREPROCESSING_FILE, importable
from finetune.io import read_json, write_json
from finetune.rundir import RUN_RECIPE, is_run_dir, load_model, read_run_meta

__all__ = ["CALIB_METHODS", "DEFAULT_CALIB_IMAGES", "DEFAULT_MAX_DROP", "INT8_FILE", "INT8_REPORT",
           "Int8Report", "quantize_onnx", "quantize_run", "validation_samples"]

CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_IMAGES = 300
DEFAULT_MAX_DROP = 1.0
INT8_FILE = "model.int8.onnx"
INT8_REPORT = "int8.json"
_CALIB_BATCH = 16


@dataclass
class Int8Report:
    """What :func:`quantize_run` measured, and where it wrote the models (``written`` False: refused).

    ``drop_points``: fp32 top-1 minus int8 top-1, in percentage points, on ``val_images`` images of
    the validation split. ``latency``: rows of :func:`~finetune.export.ortbench.interleaved_latency`
    (``model`` ``fp32``/``int8``); ``speedup``: fp32 median / int8 median per batch size.
    """

    model_path: Path
    fp32_path: Path
    calib_method: str
    calib_images: int
    calib_source: str
    val_images: int
    val_source: str
    fp32_top1: float
    int8_top1: float
    drop_points: float
    agreement: float
    max_abs_logit_diff: float
    max_drop: float
    fp32_mb: float
    int8_mb: float
    bias_correction: bool
    threads: int
    latency: list[dict[str, Any]] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)
    written: bool = True
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_path"], data["fp32_path"] = str(self.model_path), str(self.fp32_path)
        return data

    def summary(self) -> str:
        """Lines for the CLI: accuracy gate, sizes, latency."""
        lines = [f"int8 ({self.calib_method} calibration on {self.calib_images} images"
                 f"{', bias correction' if self.bias_correction else ''}): top-1 {self.fp32_top1:.4f} fp32 -> "
                 f"{self.int8_top1:.4f} int8 (drop {self.drop_points:.2f} points, limit {self.max_drop:g}"
                 f"{', forced' if self.forced else ''}), agreement {self.agreement:.4f}, max |logit diff| "
                 f"{self.max_abs_logit_diff:.3g} on {self.val_images} validation images",
                 f"size {self.fp32_mb:.2f} MB fp32 -> {self.int8_mb:.2f} MB int8"]
        by = {(r["model"], r["batch_size"]): r for r in self.latency}
        for batch in sorted({r["batch_size"] for r in self.latency}):
            f, q = by[("fp32", batch)], by[("int8", batch)]
            lines.append(f"latency batch {batch:>2}: fp32 {f['median_ms']:.2f} ms, int8 {q['median_ms']:.2f} ms "
                         f"(int8 speed-up {self.speedup[str(batch)]:.2f}x; ONNX Runtime CPU, {self.threads} "
                         f"thread(s), median of {f['repeats']} interleaved runs)")
        if self.written:
            lines.append(f"wrote {self.model_path} and {self.fp32_path.name}, {PREPROCESSING_FILE}, {INT8_REPORT}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Which images: the run's own validation split, calibration images
# --------------------------------------------------------------------------------------------

def _recipe_split(run_dir: Path, meta: Mapping[str, Any]) -> tuple[Any, str] | None:
    """The train/val split of the run's recipe (or of the run it was converted from), if any."""
    from finetune.config import Recipe
    from finetune.data.manifest import scan_data_section

    for candidate in (run_dir, meta.get("converted_from")):
        if candidate is None or not is_run_dir(candidate) or not (Path(candidate) / RUN_RECIPE).is_file():
            continue
        recipe = Recipe.from_yaml(Path(candidate) / RUN_RECIPE)
        if not getattr(recipe.data, "root", None):
            continue
        split = scan_data_section(recipe.data, recipe.runtime.seed)
        if list(split.classes) != list(meta["classes"]):
            raise FinetuneError(f"the classes in {split.root} are no longer the run's; pass --val-data DIR "
                                "(a labelled folder) and --calib-data DIR")
        return split, f"validation split of {split.root} ({Path(candidate) / RUN_RECIPE})"
    return None


def validation_samples(run_dir: str | os.PathLike, val_data: str | os.PathLike | None = None
                       ) -> tuple[list[Sample], list[Sample], str]:
    """``(val, train, source)``: the run's validation split and training split as ``recipe.yaml``
    rebuilds them (``train`` empty with ``val_data``, a labelled folder used instead).

    >>> validation_samples("runs/photos")[2]                                  # doctest: +SKIP
    'validation split of /home/me/photos (runs/photos/recipe.yaml)'
    """
    run_dir = Path(run_dir).expanduser()
    meta = read_run_meta(run_dir)
    if val_data is not None:
        _, samples, _ = scan_labelled(val_data, classes=list(meta["classes"]))
        if not samples:
            raise FinetuneError(f"no readable labelled images in `{val_data}`; pass DIR/<class>/* images (--val-data)")
        return list(samples), [], str(val_data)
    found = _recipe_split(run_dir, meta)
    if found is None:
        raise FinetuneError(f"`{run_dir}` has no {RUN_RECIPE} naming its data (nor has the run it was converted "
                            "from), so its validation split is unknown; pass --val-data DIR (a labelled folder)")
    split, source = found
    if not split.val:
        raise FinetuneError(f"the run's validation split is empty (val_fraction 0?); pass --val-data DIR")
    return list(split.val), list(split.train), source


def _calibration_paths(calib_data: str | os.PathLike | None, train: Sequence[Sample], images: int,
                       seed: int) -> tuple[list[Path], str]:
    if calib_data is not None:
        folder = Path(calib_data).expanduser()
        if not folder.exists():
            raise FinetuneError(f"calibration folder `{calib_data}` does not exist; pass a folder of images "
                                "(--calib-data)")
        paths, _ = list_images([folder])
        source = str(calib_data)
        if not paths:
            raise FinetuneError(f"no readable images in calibration folder `{calib_data}`; pass a folder of images "
                                "(--calib-data)")
    else:
        paths, source = [s.path for s in train], "the run's training split"
        if not paths:
            raise FinetuneError("no training images to calibrate on; pass --calib-data DIR (a folder of images)")
    paths = list(paths)
    random.Random(seed).shuffle(paths)
    return sorted(paths[:images]), source


class _Reader:
    """``CalibrationDataReader`` over preprocessed batches, with ``set_range`` for ``CalibStridedMinMax``."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches, self.start, self.end, self.pos = list(batches), 0, len(batches), 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= min(self.end, len(self.batches)):
            return None
        self.pos += 1
        return {INPUT_NAME: self.batches[self.pos - 1]}

    def rewind(self) -> None:
        self.pos = self.start


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------

def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, batches: Sequence[np.ndarray],
                  calib_method: str = "minmax", bias_correction: bool = False,
                  extra_options: Mapping[str, Any] | None = None) -> Path:
    """Write a static int8 QDQ model of ``fp32_path`` (per-channel int8 weights, int8 activations)
    calibrated on ``batches`` (NCHW float32 arrays, already preprocessed); returns ``out_path``.

    >>> import torch, numpy as np, tempfile, pathlib
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    >>> torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(tmp / "m.onnx"), input_names=["input"],
    ...                   output_names=["logits"], dynamic_axes={"input": {0: "b"}}, dynamo=False)
    >>> data = [np.random.default_rng(0).standard_normal((4, 3, 8, 8), dtype=np.float32)]
    >>> out = quantize_onnx(tmp / "m.onnx", tmp / "q.onnx", data, bias_correction=True)
    >>> import onnx; {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(out)).graph.node}
    True
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calib_method not in methods:
        raise FinetuneError(f"unknown calibration method `{calib_method}`; choose one of {', '.join(CALIB_METHODS)}")
    if not batches:
        raise FinetuneError("no calibration images; pass a folder of images")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as tmp:
        pre = Path(tmp) / "model.pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 -- the optimiser fails on some graphs; shape inference alone still helps
            quant_pre_process(str(fp32_path), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        options = {"CalibStridedMinMax": 1,  # collect batch by batch: ranges/histograms merged, one batch in memory
                   **({"CalibPercentile": 99.999} if calib_method == "percentile" else {}),
                   **dict(extra_options or {})}
        import logging

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint at WARNING
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # histogram progress prints
                warnings.simplefilter("ignore")
                quantize_static(str(pre), str(out_path), _Reader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=methods[calib_method], extra_options=options)
        finally:
            logging.getLogger().setLevel(level)
        if bias_correction:
            from finetune.export.biascorr import correct_biases

            correct_biases(pre, out_path, batches)
    return out_path


def _check_args(calib_images: int, calib_method: str, max_drop: float) -> None:
    if isinstance(calib_images, bool) or not isinstance(calib_images, int) or calib_images < 1:
        raise FinetuneError(f"calib_images must be a positive whole number, got `{calib_images}`")
    if calib_method not in CALIB_METHODS:
        raise FinetuneError(f"unknown calibration method `{calib_method}`; choose one of {', '.join(CALIB_METHODS)}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not (max_drop >= 0 and
                                                                                    math.isfinite(max_drop)):
        raise FinetuneError(f"max_drop must be a number of accuracy points >= 0 (e.g. 1.0), got `{max_drop}`")
    for name in ("onnx", "onnxruntime"):
        if not importable(name):
            raise FinetuneError(f"int8 export needs the `{name}` package, which is not installed; "
                                f"run `pip install {name}`")


def quantize_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    calib_data: str | os.PathLike | None = None,
    calib_images: int = DEFAULT_CALIB_IMAGES,
    calib_method: str = "minmax",
    max_drop: float = DEFAULT_MAX_DROP,
    force: bool = False,
    val_data: str | os.PathLike | None = None,
    bias_correction: bool = False,
    extra_options: Mapping[str, Any] | None = None,
    latency: bool = True,
    threads: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    exporter: str = "dynamo",
    split: tuple[Sequence[Sample], Sequence[Sample], str] | None = None,
) -> Int8Report:
    """Export ``run_dir`` to fp32 ONNX and int8 QDQ ONNX, gated on validation accuracy.

    Args:
        run_dir: a run directory (fine-tuned, LoRA-merged or converted).
        out: folder for ``model.onnx``, ``model.int8.onnx``, ``preprocessing.json`` (with an
            ``int8`` section) and ``int8.json`` (default ``RUN/export``).
        calib_data: folder of images to calibrate on (labels not needed); default: a seeded
            sample of the run's training split.
        calib_images: how many calibration images (default 300).
        calib_method: ``minmax``, ``entropy`` or ``percentile``.
        max_drop: largest accepted top-1 drop, in points (default 1.0).
        force: write the int8 model even when the drop exceeds ``max_drop`` (recorded as forced).
        val_data: labelled folder to gate on instead of the run's validation split (for runs
            without a ``recipe.yaml``).
        bias_correction: subtract the int8 weights' output shift from the biases (module docstring).
        extra_options: passed to ``onnxruntime.quantization.quantize_static``.
        latency: measure fp32 vs int8 latency at batch 1 and 32 (``threads`` intra-op threads).
        split: ``(val, train, source)`` already resolved (:func:`validation_samples`; used by
            ``finetune compress``), instead of ``val_data`` / the run's recipe.

    Raises:
        FinetuneError: bad arguments, no calibration images, unknown validation split, a failed
            export, or a drop above ``max_drop`` (then nothing is written).

    >>> report = quantize_run("runs/photos", calib_data="~/photos", max_drop=0.5)    # doctest: +SKIP
    >>> report.drop_points, report.agreement, report.speedup                        # doctest: +SKIP
    (0.2, 0.991, {'1': 1.31, '32': 1.84})
    """
    _check_args(calib_images, calib_method, max_drop)
    run_dir = Path(run_dir).expanduser()
    meta = read_run_meta(run_dir)
    out_dir = Path(out).expanduser() if out is not None else run_dir / "export"
    if out_dir.exists() and not out_dir.is_dir():
        raise FinetuneError(f"export folder `{out_dir}` is a file; pass a folder with --out")
    val, train, val_source = (list(split[0]), list(split[1]), split[2]) if split is not None else \
        validation_samples(run_dir, val_data)
    calib_paths, calib_source = _calibration_paths(calib_data, train, calib_images, seed)
    _, data_config = load_model(run_dir)
    threads = threads or default_threads()

    with tempfile.TemporaryDirectory(prefix=".int8-", dir=run_dir) as tmp_name:
        tmp = Path(tmp_name)
        check_images = [s.path for s in val[:16]]
        fp32 = export_run(run_dir, "onnx", out=tmp, images=check_images, exporter=exporter)
        batches = [images.numpy() for images, _ in eval_loader(calib_paths, data_config, _CALIB_BATCH)]
        int8_path = tmp / INT8_FILE
        try:
            quantize_onnx(fp32.model_path, int8_path, batches, calib_method, bias_correction, extra_options)
        except FinetuneError:
            raise
        except Exception as exc:  # noqa: BLE001 -- quantizer failures become one line, traceback chained
            raise FinetuneError(f"ONNX Runtime could not quantize `{meta['architecture']}`: {one_line(exc)}; "
                                "try another --calib-method or exporter legacy") from exc
        loader = eval_loader(val, data_config, batch_size)
        ref, labels = onnx_logits(fp32.model_path, loader, threads)
        got, _ = onnx_logits(int8_path, loader, threads)
        stats = compare_logits(ref, got, labels)
        drop = stats["drop_points"]
        if drop > max_drop and not force:
            others = [m for m in CALIB_METHODS if m != calib_method]
            more = f", more calibration images (now {len(calib_paths)})" if len(calib_paths) < 1000 else ""
            bias = "" if bias_correction else ", --bias-correction"
            raise FinetuneError(
                f"int8 top-1 {stats['top1']:.4f} is {drop:.2f} points below fp32 {stats['reference_top1']:.4f} on "
                f"{stats['images']} validation images (limit --max-drop {max_drop:g}), so nothing was written; try "
                f"--calib-method {' or '.join(others)}{more}{bias}, or --force to keep it anyway")
        rows = interleaved_latency({"fp32": fp32.model_path, "int8": int8_path}, data_config["input_size"],
                                   threads=threads) if latency else []
        by = {(r["model"], r["batch_size"]): r["median_ms"] for r in rows}
        speedup = {str(b): by[("fp32", b)] / by[("int8", b)] for (_, b) in by if ("int8", b) in by}
        report = Int8Report(
            model_path=out_dir / INT8_FILE, fp32_path=out_dir / MODEL_FILES["onnx"], calib_method=calib_method,
            calib_images=len(calib_paths), calib_source=calib_source, val_images=stats["images"],
            val_source=val_source, fp32_top1=stats["reference_top1"], int8_top1=stats["top1"], drop_points=drop,
            agreement=stats["agreement"], max_abs_logit_diff=stats["max_abs_logit_diff"], max_drop=float(max_drop),
            fp32_mb=file_mb(fp32.model_path), int8_mb=file_mb(int8_path), bias_correction=bias_correction,
            threads=threads, latency=rows, speedup=speedup, forced=drop > max_drop)
        sidecar = read_json(fp32.preprocessing_path)
        sidecar["int8"] = {"model_file": INT8_FILE, "format": "ONNX QDQ, int8 activations, per-channel int8 weights",
                           **{k: v for k, v in report.to_dict().items() if k not in ("model_path", "fp32_path")}}
        write_json(fp32.preprocessing_path, sidecar)
        write_json(tmp / INT8_REPORT, report.to_dict())
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILES["onnx"], INT8_FILE, PREPROCESSING_FILE, INT8_REPORT):
            shutil.move(str(tmp / name), str(out_dir / name))  # same filesystem: a rename
    return report
