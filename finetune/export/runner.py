"""Export a trained run to ONNX or TorchScript, checked against PyTorch on real images.

:func:`export_run` writes ``model.onnx`` (or ``model.pt``) with a dynamic batch axis and a
``preprocessing.json`` sidecar that says exactly which input the graph expects (resize, centre
crop, mean/std, RGB, NCHW float32) and what its outputs mean (class names in logit order). Before
anything lands on disk the exported model is run on real images, preprocessed with the run's own
eval transform, at batch 1 and at larger batches; if its logits differ from the eager PyTorch
model's by more than ``tolerance`` (1e-4) nothing is written and :class:`FinetuneError` is raised.

Float32 rounding allowance: a model with large logits (an ImageNet head on out-of-domain images,
logits ~35) differs from *itself* in float64 by ~5e-5, and a correct export then differs from
eager by up to ~1.1e-4 (measured: ONNX dynamo/legacy, TorchScript). So when the difference exceeds
``tolerance``, eager PyTorch is also run in float64 and the export passes if it is within
``5 ×`` eager's own float32 error; both figures are reported. A broken export (wrong padding,
a batch-dependent graph) is off by orders of magnitude more.

>>> from finetune.export import export_run                                       # doctest: +SKIP
>>> report = export_run("runs/photos")                                           # doctest: +SKIP
>>> report.model_path, report.max_abs_diff                                       # doctest: +SKIP
(PosixPath('runs/photos/export/model.onnx'), 1.9e-05)

Using the ONNX file without this package (the sidecar's numbers filled in)::

    img = PIL.Image.open(path).convert("RGB")          # + EXIF orientation, see "decode"
    img = img.resize((new_w, new_h), PIL.Image.BICUBIC)  # shorter side -> resize.size
    img = img.crop((left, top, left + 96, top + 96))   # centre crop, see "center_crop"
    x = (np.asarray(img, np.float32) / 255 - mean) / std
    logits = onnxruntime.InferenceSession("model.onnx").run(None, {"input": x.transpose(2, 0, 1)[None]})[0]

ONNX export goes through ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript), the
exporter PyTorch develops; ``exporter="legacy"`` selects the older TorchScript-based one, which
needs no onnxscript but is deprecated upstream. TorchScript (``torch.jit.trace``) is deprecated
upstream as well; it is offered for runtimes that load ``.pt`` files (LibTorch, PyTorch Mobile).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from finetune.io import atomic_path, write_json
from finetune.data import build_transform, draft_size, list_images, load_rgb, to_rgb
from finetune.errors import FinetuneError, one_line
from finetune.export.sidecar import (INPUT_NAME, MODEL_FILES, OUTPUT_NAME, PREPROCESSING_FILE, describe_preprocessing,
                                      importable, sidecar)
from finetune.rundir import load_model, read_run_meta

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXPORT_FORMATS",
    "EXPORTERS",
    "ExportReport",
    "PREPROCESSING_FILE",
    "describe_preprocessing",
    "export_run",
]

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORTERS = ("dynamo", "legacy")
#: Largest |eager - exported| logit difference accepted by the parity check.
DEFAULT_TOLERANCE = 1e-4
#: Above ``tolerance``, the export may still differ by this many times eager's own float32 error.
ROUNDING_FACTOR = 5.0
DEFAULT_CHECK_IMAGES = 16
MIN_DYNAMO_OPSET = 18  # below this torch.onnx(dynamo=True) exports 18 and tries a lossy down-conversion

# What each export path needs beyond torch, and the pip package that provides it.
_NEEDS = {
    ("onnx", "dynamo"): ("onnx", "onnxscript", "onnxruntime"),
    ("onnx", "legacy"): ("onnx", "onnxruntime"),
    ("torchscript", None): (),
}


@dataclass
class ExportReport:
    """What :func:`export_run` wrote and how closely the export matches PyTorch.

    ``max_abs_diff``: the largest absolute logit difference, exported vs eager, over
    ``images_checked`` real images at every batch size in ``batch_sizes``.
    ``opset``: the ONNX opset of the written graph (``None`` for TorchScript).
    ``tolerance``: the limit applied: the requested one, or ``ROUNDING_FACTOR × float32_error`` when
    that is larger; ``float32_error`` (eager float32 vs float64, same images) is only measured when
    ``max_abs_diff`` exceeded the requested tolerance, else ``None``.

    >>> report = export_run("runs/photos")                                        # doctest: +SKIP
    >>> report.format, report.images_checked, report.batch_sizes, report.opset    # doctest: +SKIP
    ('onnx', 16, (1, 5, 16), 20)
    """

    format: str
    model_path: Path
    preprocessing_path: Path
    max_abs_diff: float
    images_checked: int
    batch_sizes: tuple[int, ...]
    opset: int | None
    exporter: str
    input_size: tuple[int, int, int]
    tolerance: float = DEFAULT_TOLERANCE
    float32_error: float | None = None
    classes: list[str] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_path"], data["preprocessing_path"] = str(self.model_path), str(self.preprocessing_path)
        data["batch_sizes"], data["input_size"] = list(self.batch_sizes), list(self.input_size)
        return data

    def summary(self) -> str:
        """One line for the CLI."""
        opset = f", opset {self.opset}" if self.opset is not None else ""
        noise = (f" (within {ROUNDING_FACTOR:g}x PyTorch's own float32 error {self.float32_error:.1e})"
                 if self.float32_error is not None else "")
        return (f"wrote {self.model_path} ({self.exporter}{opset}) and {self.preprocessing_path.name}; "
                f"max |logit diff| vs PyTorch {self.max_abs_diff:.2e}{noise} on {self.images_checked} images "
                f"at batch sizes {', '.join(map(str, self.batch_sizes))}")


# --------------------------------------------------------------------------------------------
# Images for the parity check
# --------------------------------------------------------------------------------------------

def _require(fmt: str, exporter: str | None) -> None:
    for name in _NEEDS[(fmt, exporter)]:
        if not importable(name):
            hint = " (or pass exporter='legacy', which does not need it)" if name == "onnxscript" else ""
            raise FinetuneError(f"exporting to {fmt} needs the `{name}` package, which is not installed; "
                                f"run `pip install {name}`{hint}")


def _check_images(images: str | os.PathLike | Sequence[str | os.PathLike] | None, data_config: dict[str, Any],
                  limit: int) -> torch.Tensor:
    """``(N, 3, H, W)``: up to ``limit`` real images through the run's eval transform."""
    transform = build_transform(data_config, train=False)
    if images is None:
        from finetune.data.demo import load_demo_arrays

        pixels = load_demo_arrays()["val_images"][:limit]  # Fashion-MNIST, rows already shuffled per class
        return torch.stack([transform(to_rgb(Image.fromarray(np.ascontiguousarray(p)))) for p in pixels])
    paths, _skipped = list_images([images] if isinstance(images, (str, os.PathLike)) else list(images))
    if not paths:
        raise FinetuneError(f"no readable images in `{images}` for the export check; pass image files or a folder "
                            "of images (or none, to use the built-in demo images)")
    if len(paths) > limit:  # evenly spread over the sorted list, so several classes are covered
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round()]
    return torch.stack([transform(load_rgb(p, draft_size(data_config))) for p in paths])


def _images_source(images: str | os.PathLike | Sequence[str | os.PathLike] | None) -> str:
    if images is None:
        return "built-in Fashion-MNIST demo images (finetune.data.demo, val split)"
    if isinstance(images, (str, os.PathLike)):
        return str(images)
    return f"{len(images)} given paths"


def _batches(n: int) -> list[int]:
    """Batch sizes for the parity check: 1, a ragged split into 5s (when n > 5), and all at once."""
    sizes = [1]
    if n > 5:
        sizes.append(5)
    if n > 1:
        sizes.append(n)
    return sizes


# --------------------------------------------------------------------------------------------
# Exporters and runners
# --------------------------------------------------------------------------------------------

def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int | None) -> None:
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=False, verbose=False, **kwargs)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        traced = torch.jit.trace(model, example)
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, str(path))


def _onnx_opset(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def _onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    if isinstance(batch, int):
        raise FinetuneError(f"the exported graph has a fixed batch size {batch}; re-export with a dynamic batch axis")
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _max_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    diff = float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
    return diff if math.isfinite(diff) else math.inf


@torch.no_grad()
def _parity(model: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray],
            images: torch.Tensor) -> tuple[float, list[int]]:
    """Max |eager - exported| over all images at each batch size (same chunks on both sides)."""
    worst, sizes = 0.0, _batches(len(images))
    for size in sizes:
        for chunk in images.split(size):
            eager = model(chunk).float().numpy()
            exported = run(np.ascontiguousarray(chunk.numpy(), dtype=np.float32))
            if exported.shape != eager.shape:
                raise FinetuneError(f"the exported model returned shape {exported.shape} for a batch of {len(chunk)}, "
                                    f"expected {eager.shape}; the export is broken (dynamic batch axis lost)")
            worst = max(worst, _max_diff(exported, eager))
    return worst, sizes


@torch.no_grad()
def _float32_error(model: torch.nn.Module, images: torch.Tensor, sizes: Sequence[int]) -> float:
    """Max |eager float32 - eager float64| at the parity check's batch sizes: PyTorch's own rounding."""
    reference = copy.deepcopy(model).double()(images.double())
    return max(_max_diff(torch.cat([model(chunk) for chunk in images.split(size)]), reference) for size in sizes)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def export_run(
    run_dir: str | os.PathLike,
    format: str = "onnx",  # noqa: A002 -- the CLI's --format
    out: str | os.PathLike | None = None,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    opset: int | None = None,
    *,
    exporter: str = "dynamo",
    tolerance: float = DEFAULT_TOLERANCE,
    max_images: int = DEFAULT_CHECK_IMAGES,
) -> ExportReport:
    """Export the model of ``run_dir`` for inference outside this package, checked on real images.

    Args:
        run_dir: a run directory written by ``finetune train`` / ``finetune convert``.
        format: ``"onnx"`` (``model.onnx``, input ``input``, output ``logits``) or ``"torchscript"``
            (``model.pt``, traced with ``torch.jit.trace``). Both take any batch size; height and
            width are fixed at the run's input size.
        out: folder for the files (default ``RUN_DIR/export/``); existing files of the same name
            are replaced atomically, nothing else in it is touched.
        images: image files or folders for the parity check (up to ``max_images``, evenly spread
            over the sorted list); ``None`` uses 16 built-in Fashion-MNIST images.
        opset: ONNX opset version (default: the exporter's own default, 20 with torch 2.14); ONNX
            only; the dynamo exporter needs >= 18, the legacy one takes 7..20.
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``) or
            ``"legacy"`` (the TorchScript-based ONNX exporter); ONNX only.
        tolerance: largest accepted absolute logit difference against eager PyTorch, raised to
            ``ROUNDING_FACTOR ×`` eager's own float32 error when that is larger (module docstring).
        max_images: how many of ``images`` the check uses.

    Returns:
        An :class:`ExportReport`. Also writes ``preprocessing.json`` (input size, resize, crop,
        mean/std, RGB/NCHW/float32, class names in output order, parity figures).

    Raises:
        FinetuneError: not a run directory, unknown format/exporter, a missing package (named),
            a failed export, or a failed parity check (then nothing is written).

    >>> report = export_run("runs/photos", images="~/photos/val")                 # doctest: +SKIP
    >>> print(report.summary())                                                   # doctest: +SKIP
    wrote runs/photos/export/model.onnx (torch.onnx dynamo, opset 20) and preprocessing.json; ...
    """
    fmt = str(format).lower()
    if fmt not in EXPORT_FORMATS:
        raise FinetuneError(f"unknown export format `{format}`; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and exporter not in EXPORTERS:
        raise FinetuneError(f"unknown ONNX exporter `{exporter}`; choose one of {', '.join(EXPORTERS)}")
    if opset is not None and fmt != "onnx":
        raise FinetuneError("opset applies to ONNX export only; drop it or use format onnx")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise FinetuneError(f"opset must be a whole number >= 7, got `{opset}`")
    if opset is not None and exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
        raise FinetuneError(f"the dynamo ONNX exporter writes opset {MIN_DYNAMO_OPSET} or newer, not {opset}; "
                            f"pass exporter legacy for older opsets")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise FinetuneError(f"tolerance must be a number >= 0, got `{tolerance}`")
    if isinstance(max_images, bool) or not (isinstance(max_images, int) and max_images >= 1):
        raise FinetuneError(f"max_images must be a positive whole number, got `{max_images}`")
    meta = read_run_meta(run_dir)  # the one-line "not a run directory" errors
    _require(fmt, exporter if fmt == "onnx" else None)
    run_dir = Path(run_dir).expanduser()
    out_dir = Path(out).expanduser() if out is not None else run_dir / "export"
    if out_dir.exists() and not out_dir.is_dir():
        raise FinetuneError(f"export folder `{out_dir}` is a file; pass a folder with --out")

    model, data_config = load_model(run_dir)
    model.eval()
    transform = build_transform(data_config, train=False)
    describe_preprocessing(data_config)  # refuse a preprocessing the sidecar cannot describe before exporting
    inputs = _check_images(images, data_config, max_images)
    example = inputs[:2] if len(inputs) >= 2 else inputs.repeat(2, 1, 1, 1)  # batch 2: no 0/1 specialisation
    label = {"dynamo": "torch.onnx dynamo", "legacy": "torch.onnx legacy (TorchScript-based)"}[exporter] \
        if fmt == "onnx" else "torch.jit.trace"

    other = "legacy" if exporter == "dynamo" else "dynamo"
    model_path = out_dir / MODEL_FILES[fmt]
    with atomic_path(model_path) as tmp:
        try:
            if fmt == "onnx":
                _export_onnx(model, example, tmp, exporter, opset)
            else:
                _export_torchscript(model, example, tmp)
        except FinetuneError:
            raise
        except Exception as exc:  # noqa: BLE001 -- exporter failures become one line, traceback chained
            fixes = f"exporter {other} or format torchscript" if fmt == "onnx" else "format onnx"
            raise FinetuneError(f"{label} could not export `{meta['architecture']}`: {one_line(exc)}; "
                                f"try {fixes}") from exc
        written_opset = _onnx_opset(tmp) if fmt == "onnx" else None
        if opset is not None and written_opset != opset:
            raise FinetuneError(f"{label} wrote opset {written_opset} instead of the requested {opset}; "
                                f"try exporter {other} or another opset")
        try:
            run = _onnx_runner(tmp) if fmt == "onnx" else _torchscript_runner(tmp)
            max_diff, sizes = _parity(model, run, inputs)
        except FinetuneError:
            raise
        except Exception as exc:  # noqa: BLE001
            fixes = f"exporter {other} or format torchscript" if fmt == "onnx" else "format onnx"
            raise FinetuneError(f"the exported {fmt} model of `{meta['architecture']}` fails to run: "
                                f"{one_line(exc)}; try {fixes}") from exc
        limit, float32_error = tolerance, None
        if math.isfinite(max_diff) and max_diff > tolerance:
            float32_error = _float32_error(model, inputs, sizes)
            limit = max(tolerance, ROUNDING_FACTOR * float32_error)
        if not max_diff <= limit:
            noise = f"; PyTorch's own float32 error is {float32_error:.1e}" if float32_error is not None else ""
            fixes = f"exporter {other}, another opset or format torchscript" if fmt == "onnx" else "format onnx"
            raise FinetuneError(f"the {fmt} export of `{meta['architecture']}` differs from PyTorch by {max_diff:.2e} "
                                f"(> {limit:.1e}{noise}) on {len(inputs)} images, so nothing was written; try {fixes}")
        del run  # release the session's file handle before the move

    parity = {"max_abs_diff": max_diff, "tolerance": limit, "requested_tolerance": tolerance,
              "float32_error": float32_error, "images": len(inputs), "batch_sizes": sizes,
              "images_source": _images_source(images)}
    preprocessing_path = out_dir / PREPROCESSING_FILE
    write_json(preprocessing_path, sidecar(meta, data_config, fmt, label, written_opset, parity, transform))
    return ExportReport(format=fmt, model_path=model_path, preprocessing_path=preprocessing_path,
                        max_abs_diff=max_diff, images_checked=len(inputs), batch_sizes=tuple(sizes),
                        opset=written_opset, exporter=label,
                        input_size=tuple(int(v) for v in data_config["input_size"]),  # type: ignore[arg-type]
                        tolerance=limit, float32_error=float32_error,
                        classes=list(meta["classes"]))
