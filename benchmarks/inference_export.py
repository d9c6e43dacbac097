"""Inference latency and throughput: eager PyTorch (the baseline) vs ONNX Runtime and TorchScript.

Each model is exported with :func:`finetune.export.export_run` (so the parity check on real images
runs first; its figures are in the JSON), then every backend is timed on the same input batch:

* ``eager``        -- the PyTorch module, ``torch.inference_mode()``, NCHW fp32 (the baseline);
* ``eager_channels_last`` -- the same in channels_last (what ``finetune train`` picks on CPU), input
  converted inside the timed call;
* ``onnxruntime``  -- ``model.onnx`` on ONNX Runtime's CPU provider, all graph optimisations;
* ``torchscript``  -- ``model.pt`` (traced and frozen), ``torch.inference_mode()``.

Both runtimes get the same intra-op thread count (``--threads``, 2 by default; inter-op 1). A
sample is the mean time per call over as many calls as fill ``--min-time`` seconds, after
``--warmup`` calls; the figure reported is the median of ``--repeats`` samples. ``vs eager`` is
eager time / backend time (> 1: faster than eager).

    python benchmarks/inference_export.py                    # tf_efficientnet_lite0 + mobilenetv2_100,
                                                             # random weights, 224 px, batch 1 and 32
    python benchmarks/inference_export.py runs/photos        # a trained run at its own input size
    python benchmarks/inference_export.py --quick            # fewer, shorter samples

Writes benchmarks/results/inference_export.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch

from finetune.io import model_state_dict, save_weights, write_json
from finetune.export import export_run
from finetune.models import resolve_data_config
from finetune.rundir import RUN_FORMAT, RUN_META, RUN_WEIGHTS, load_model, read_run_meta

MODELS = ("tf_efficientnet_lite0", "mobilenetv2_100")
BACKENDS = ("eager", "eager_channels_last", "onnxruntime", "torchscript")


def fresh_run(name: str, img_size: int, root: Path) -> Path:
    """A run directory holding ``name`` with timm's random initialisation (1000 classes)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    data_config = resolve_data_config(model, img_size)
    meta = {"format": RUN_FORMAT, "architecture": name, "num_classes": model.num_classes,
            "classes": [f"class_{i}" for i in range(model.num_classes)],
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
            "weights_source": "random (timm init)"}
    run = root / name
    save_weights(model_state_dict(model), run / RUN_WEIGHTS)
    write_json(run / RUN_META, meta)
    return run


def time_call(fn: Callable[[], object], warmup: int, repeats: int, min_time: float) -> list[float]:
    """Seconds per call: one figure per repeat, each the mean over calls filling ``min_time``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        calls, tic = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - tic
            if elapsed >= min_time:
                break
        samples.append(elapsed / calls)
    return samples


def runners(run: Path, out: Path, threads: int, backends: list[str]) -> tuple[dict[str, Callable], dict]:
    """``{backend: fn(batch_np) -> logits}`` and the export reports."""
    model, _ = load_model(run)
    fns: dict[str, Callable] = {}
    exports: dict[str, dict] = {}

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    fns["eager"] = eager
    if "eager_channels_last" in backends:
        model_cl = load_model(run)[0].to(memory_format=torch.channels_last)

        def eager_cl(x: np.ndarray) -> object:
            with torch.inference_mode():
                return model_cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

        fns["eager_channels_last"] = eager_cl
    if "onnxruntime" in backends:
        import onnxruntime as ort

        report = export_run(run, "onnx", out=out)
        exports["onnx"] = report.to_dict()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(report.model_path), options, providers=["CPUExecutionProvider"])
        fns["onnxruntime"] = lambda x: session.run(None, {"input": x})
    if "torchscript" in backends:
        report = export_run(run, "torchscript", out=out)
        exports["torchscript"] = report.to_dict()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(report.model_path))

        def torchscript(x: np.ndarray) -> object:
            with torch.inference_mode():
                return scripted(torch.from_numpy(x))

        fns["torchscript"] = torchscript
    return fns, exports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories (default: fresh random-weight models)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm names used when no run is given")
    parser.add_argument("--img-size", type=int, default=224, help="input size of the fresh models")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every backend")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=None, help="calls before timing (default 5, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per figure (default 7, quick 3)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per sample (default 1.0, quick 0.25)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples")
    parser.add_argument("--out", default="benchmarks/results/inference_export.json")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.25 if args.quick else 1.0)
    backends = ["eager", *[b for b in args.backends if b != "eager"]]  # the baseline always runs
    torch.set_num_threads(args.threads)

    versions = {"torch": torch.__version__, "timm": timm.__version__}
    if "onnxruntime" in backends:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    print(f"{', '.join(f'{k} {v}' for k, v in versions.items())}; {args.threads} threads; "
          f"{platform.machine()} {platform.processor() or ''}; warmup {warmup}, median of {repeats} x >= {min_time} s")
    header = f"{'model':<24}{'px':>5}{'batch':>6}  {'backend':<20}{'ms/batch':>10}{'img/s':>9}{'vs eager':>10}"
    print(header)
    print("-" * len(header))

    rows, exports = [], {}
    with tempfile.TemporaryDirectory(prefix="finetune-bench-export-") as tmp:
        tmp_root = Path(tmp)
        runs = [Path(r) for r in args.runs] or [fresh_run(name, args.img_size, tmp_root / "runs")
                                                for name in args.models]
        for run in runs:
            meta = read_run_meta(run)
            name = meta["architecture"]
            size = int(meta["data_config"]["input_size"][-1])
            fns, exports[str(run) if args.runs else name] = runners(run, tmp_root / "export" / run.name, args.threads,
                                                                     backends)
            for batch in args.batch_sizes:
                x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
                base_ms = None
                for backend in backends:
                    samples = time_call(lambda: fns[backend](x), warmup, repeats, min_time)
                    ms = statistics.median(samples) * 1000
                    base_ms = ms if backend == "eager" else base_ms
                    row = {"model": name, "run": str(run) if args.runs else None, "img_size": size,
                           "batch_size": batch, "backend": backend, "ms_per_batch": ms,
                           "images_per_s": batch * 1000 / ms, "ratio_vs_eager": base_ms / ms,
                           "samples_ms": [s * 1000 for s in samples]}
                    rows.append(row)
                    print(f"{name:<24}{size:>5}{batch:>6}  {backend:<20}{ms:>10.2f}{row['images_per_s']:>9.1f}"
                          f"{row['ratio_vs_eager']:>9.2f}x", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "inference_export", "baseline": "eager", "created": datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "threads": args.threads, "warmup": warmup, "repeats": repeats, "min_time_s": min_time,
        "machine": platform.machine(), "python": sys.version.split()[0], "versions": versions,
        "exports": exports, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
