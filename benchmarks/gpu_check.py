"""GPU check: the paths of `finetune train` that the CPU test suite cannot reach, in one command.

    python benchmarks/gpu_check.py --out gpu_check.json              # one GPU, under 8 minutes
    python benchmarks/gpu_check.py --out smoke.json --cpu-smoke      # every section on CPU, tiny sizes

Sections (run in this order, each in its own subprocess with its own time box, so a hang or a
CUDA crash in one is recorded as ``{"ok": false, "error": ...}`` and the next one still runs; the
JSON is rewritten after every section, so a kill leaves the sections done so far):

* ``environment`` -- torch / timm / accelerate versions, the GPU, CUDA / cuDNN / NCCL versions and
  matmul GFLOP/s in fp32, TF32, bf16 and fp16: the figures every other number is read against.
* ``finetune_steps`` -- 20 optimizer steps on one fixed batch of real (demo) images at 224 px for
  both offline backbones, in bf16 autocast and in fp16 with ``torch.amp.GradScaler``: the loss must
  stay finite and fall. CPU tests run fp32 (and CPU autocast); CUDA's fp16 kernels, loss scaling
  with real overflow and bf16 tensor cores only exist on a GPU.
* ``memory_format`` -- training img/s of NCHW vs channels_last, fp32 and bf16 (and cuDNN benchmark
  mode): on a GPU the answer depends on cuDNN's kernels, which a CPU cannot predict.
* ``ddp`` -- a real ``finetune train`` through ``torchrun`` in one process: accelerate forms an
  NCCL process group (detected from ``TORCH_DISTRIBUTED_DEBUG``'s ``backend_name``) and wraps the
  model in DDP; checks ``world_size`` == 1 in ``model.json`` and records val top-1 and img/s. CPU
  tests only ever form gloo groups.
* ``resume`` -- the same run with ``--checkpoint-every 2`` is SIGKILLed after a checkpoint of its
  second epoch appears and resumed with ``finetune train RUN/recipe.yaml --resume``; its last
  checkpoint's weights are compared with an uninterrupted run's. On CPU they are bit-identical (the
  test suite asserts it); on a GPU non-deterministic kernels may break that, so the script records
  whether they are identical and the max abs difference (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is
  set; the CLI has no switch for ``torch.use_deterministic_algorithms``).
* ``compile`` -- ``torch.compile`` (inductor, Triton on a GPU) training img/s against eager
  channels_last bf16, with the compile time recorded separately; last because it is the slowest
  and most elastic: the second model is skipped when its compile would not fit the time left.

Weights: offline (registry packages) when installed, else ``--weights-dir/<model>.safetensors``
(copy them from ``~/.cache/finetune-vision/weights`` to carry them to a machine without the
packages), else random init; each section records which.

``--cpu-smoke`` runs every section on CPU at 32 px, batch 8, 3 steps, gloo instead of NCCL and a
tiny CNN for ``compile``, so that the script itself is tested here (tests/test_gpu_check.py). Exit
status 0 when every section ran and passed its checks, 1 otherwise. Only the standard library is
imported at the top, so a machine without torch still gets a JSON saying so.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tf_efficientnet_lite0", "mobilenetv2_100")
#: section -> share of the time budget (time a section leaves unused goes to the later ones)
WEIGHTS = {"environment": 0.07, "finetune_steps": 0.13, "memory_format": 0.10, "ddp": 0.17,
           "resume": 0.25, "compile": 0.28}
GRACE_S = 20.0  # a section's subprocess is killed this long after its own deadline


@dataclass(frozen=True)
class Sizes:
    img: int
    batch: int
    steps: int  # measured steps (after warmup)
    warmup: int
    matmul_n: int
    cli_img: int
    cli_batch: int
    train_per_class: int
    val_per_class: int
    fp16_init_scale: float  # GradScaler's first loss scale


# GPU: GradScaler's default scale (accelerate's too), whose first few steps overflow and are skipped;
# the smoke test's 4 steps would all be skipped at that scale, so it starts lower.
GPU = Sizes(img=224, batch=64, steps=20, warmup=3, matmul_n=8192, cli_img=96, cli_batch=64,
            train_per_class=100, val_per_class=50, fp16_init_scale=2.0**16)
SMOKE = Sizes(img=32, batch=8, steps=3, warmup=1, matmul_n=256, cli_img=32, cli_batch=8,
              train_per_class=4, val_per_class=2, fp16_init_scale=2.0**8)


class Context:
    """What a section runs with; ``record`` rewrites the section's result file at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke: bool = args.cpu_smoke
        self.sizes = SMOKE if self.smoke else GPU
        self.workdir = Path(args.workdir)
        self.weights_dir = Path(args.weights_dir) if args.weights_dir else None
        self.deadline = time.monotonic() + args.section_seconds
        self.out = Path(args.section_out)
        self.result: dict[str, Any] = {}

    def record(self, **figures: Any) -> None:
        self.result.update(figures)
        write_json(self.out, self.result)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"section time box reached before {what}")

    @property
    def device(self):
        import torch
        if self.smoke:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (run with --cpu-smoke on a machine without a GPU)")
        return torch.device("cuda")


def write_json(path: Path, value: Any) -> None:
    """Atomically (a kill mid-write leaves the previous version)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(value), indent=1))
    os.replace(tmp, path)


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf"), tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


# --------------------------------------------------------------------------- shared helpers

def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def weights_for(ctx: Context, name: str) -> str:
    """``offline`` when the package is installed, else a file from --weights-dir, else ``none``."""
    from finetune.models.offline import offline_available
    if offline_available(name):
        return "offline"
    if ctx.weights_dir is not None and (ctx.weights_dir / f"{name}.safetensors").is_file():
        return str(ctx.weights_dir / f"{name}.safetensors")
    return "none"


def load_backbone(ctx: Context, name: str):
    """``(model, data_config, weights)`` with a fresh 10-class head."""
    from finetune.models import create_model
    weights = weights_for(ctx, name)
    model, data_config = create_model(name, weights=weights, num_classes=10)
    return model, data_config, weights


def tiny_cnn():
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def demo_batch(batch: int, img: int, mean=(0.5,) * 3, std=(0.5,) * 3):
    """A fixed batch of real Fashion-MNIST demo images, upsampled to ``img`` px and normalised."""
    import torch
    from finetune.data.demo import load_demo_arrays
    arrays = load_demo_arrays()
    x = torch.from_numpy(arrays["train_images"][:batch]).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(img, img), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.from_numpy(arrays["train_labels"][:batch]).long()


def train_steps(model, batch, device, *, precision: str, channels_last: bool, steps: int, warmup: int,
                lr: float = 1e-3, init_scale: float = 2.0**16) -> dict[str, Any]:
    """Train ``warmup + steps`` AdamW steps on one batch; losses, first-step time, img/s, peak memory."""
    import torch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    x, y = batch[0].to(device).contiguous(memory_format=fmt), batch[1].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale) if precision == "fp16" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, skipped, marks = [], 0, {}
    tic = time.perf_counter()
    for i in range(warmup + steps):
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale  # inf/nan gradients: step skipped, scale halved
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if i in (0, warmup - 1):
            sync(device)
            marks[i] = time.perf_counter()
    sync(device)
    measured = time.perf_counter() - marks[warmup - 1]
    values = [float(v) for v in torch.stack(losses).float().cpu()]
    out = {"first_step_s": marks[0] - tic, "img_per_s": steps * len(y) / measured, "loss_first": values[0],
           "loss_last": values[-1], "finite": all(math.isfinite(v) for v in values),
           "decreased": values[-1] < values[0]}
    if scaler is not None:
        out.update(skipped_steps=int(skipped), final_scale=float(scaler.get_scale()))
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def matmul_gflops(device, dtype, n: int, seconds: float = 1.0) -> float:
    import torch
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        for _ in range(5):
            a @ b
        reps += 5
        sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - tic) / 1e9


# --------------------------------------------------------------------------- sections

def section_environment(ctx: Context) -> None:
    import torch
    ctx.record(python=sys.version.split()[0], platform=platform.platform(), cpu_count=os.cpu_count(),
               torch=torch.__version__, torch_threads=torch.get_num_threads(), cuda_available=torch.cuda.is_available())
    versions = {}
    for package in ("timm", "accelerate", "finetune"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError as err:
            versions[package] = f"missing: {err}"
    ctx.record(**versions)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()  # (2, 27, 3), or an int in old versions
        ctx.record(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_mem_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    from finetune.models.offline import offline_available
    ctx.record(offline_weights={name: offline_available(name) for name in MODELS},
               weights_used={name: weights_for(ctx, name) for name in MODELS})
    device = ctx.device
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    gflops = {}
    for label, dtype in dtypes.items():
        gflops[label] = matmul_gflops(device, dtype, ctx.sizes.matmul_n)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        gflops["tf32"] = matmul_gflops(device, torch.float32, ctx.sizes.matmul_n)
        torch.backends.cuda.matmul.allow_tf32 = False
    ctx.record(matmul_n=ctx.sizes.matmul_n, matmul_gflops=gflops)
    missing = [p for p, v in versions.items() if str(v).startswith("missing")]
    if missing:
        raise RuntimeError(f"missing packages: {', '.join(missing)}")


def section_finetune_steps(ctx: Context) -> None:
    """bf16 autocast and fp16 + GradScaler on a fixed batch: finite and falling loss, img/s."""
    s, device, runs, failed = ctx.sizes, ctx.device, {}, []
    ctx.record(img_size=s.img, batch=s.batch, steps=s.warmup + s.steps, fp16_init_scale=s.fp16_init_scale)
    for name in MODELS:
        model, data_config, weights = load_backbone(ctx, name)
        state = copy.deepcopy(model.state_dict())
        batch = demo_batch(s.batch, s.img, data_config["mean"], data_config["std"])
        for precision in ("bf16", "fp16"):
            ctx.check_time(f"{name} {precision}")
            model.load_state_dict(state)
            run = train_steps(model, batch, device, precision=precision, channels_last=True,
                              steps=s.steps, warmup=s.warmup, init_scale=s.fp16_init_scale)
            runs[f"{name}/{precision}"] = {"weights": weights, **run}
            if not (run["finite"] and run["decreased"]):
                failed.append(f"{name}/{precision}")
            ctx.record(runs=runs)
        del model
    if failed:
        raise AssertionError(f"loss not finite or not falling: {', '.join(failed)}")


def section_memory_format(ctx: Context) -> None:
    """NCHW vs channels_last training img/s, fp32 and bf16 (GPU: also cuDNN benchmark mode)."""
    import torch
    s, device, rows = ctx.sizes, ctx.device, {}
    configs = [(p, cl, False) for p in ("fp32", "bf16") for cl in (False, True)]
    if device.type == "cuda":
        configs.append(("bf16", True, True))
    ctx.record(img_size=s.img, batch=s.batch, steps=s.steps)
    for name in MODELS:
        model, data_config, weights = load_backbone(ctx, name)
        state = copy.deepcopy(model.state_dict())
        batch = demo_batch(s.batch, s.img, data_config["mean"], data_config["std"])
        train_steps(copy.deepcopy(model), batch, device, precision="fp32", channels_last=False, steps=1,
                    warmup=1)  # untimed: one-time initialisation stays out of the first config's figure
        for precision, channels_last, bench in configs:
            ctx.check_time(f"{name} {precision}")
            model.load_state_dict(state)
            torch.backends.cudnn.benchmark = bench
            run = train_steps(model.to(memory_format=torch.contiguous_format), batch, device, precision=precision,
                              channels_last=channels_last, steps=s.steps, warmup=s.warmup + 2 * bench)
            key = f"{name}/{precision}/{'channels_last' if channels_last else 'nchw'}"
            key += "/cudnn_benchmark" if bench else ""
            rows[key] = round(run["img_per_s"], 1)
            ctx.record(img_per_s=rows)
        torch.backends.cudnn.benchmark = False
        for precision in ("fp32", "bf16"):
            nchw, cl = rows[f"{name}/{precision}/nchw"], rows[f"{name}/{precision}/channels_last"]
            rows[f"{name}/{precision}/cl_vs_nchw"] = round(cl / nchw, 3)
        ctx.record(img_per_s=rows)


def section_compile(ctx: Context) -> None:
    """torch.compile vs eager (channels_last, bf16): compile time and img/s; boxed to the time left."""
    import torch
    s, device = ctx.sizes, ctx.device
    names = ["tiny_cnn"] if ctx.smoke else list(reversed(MODELS))  # mobilenetv2 first
    results: dict[str, Any] = {}
    ctx.record(img_size=s.img, batch=s.batch, steps=s.steps, mode="default", models=results)
    estimate = 0.0
    for name in names:
        if estimate and ctx.left() < 1.3 * estimate:
            results[name] = {"skipped": f"{ctx.left():.0f} s left, the previous model took {estimate:.0f} s"}
            ctx.record(models=results)
            continue
        tic = time.perf_counter()
        if name == "tiny_cnn":
            model, mean, std = tiny_cnn(), (0.5,) * 3, (0.5,) * 3
        else:
            model, data_config, _ = load_backbone(ctx, name)
            mean, std = data_config["mean"], data_config["std"]
        batch = demo_batch(s.batch, s.img, mean, std)
        common = dict(precision="bf16", channels_last=True, steps=s.steps, warmup=s.warmup)
        eager = train_steps(copy.deepcopy(model), batch, device, **common)
        results[name] = {"eager_img_per_s": eager["img_per_s"], "compiling": True}  # kept if the box kills it
        ctx.record(models=results)
        torch._dynamo.reset()
        compiled = train_steps(torch.compile(copy.deepcopy(model).to(device, memory_format=torch.channels_last)),
                               batch, device, **common)
        results[name] = {"compile_s": compiled["first_step_s"], "eager_img_per_s": eager["img_per_s"],
                         "compiled_img_per_s": compiled["img_per_s"],
                         "speedup": compiled["img_per_s"] / eager["img_per_s"], "loss_finite": compiled["finite"]}
        ctx.record(models=results)
        estimate = time.perf_counter() - tic
    if not any("compile_s" in r for r in results.values()):
        raise RuntimeError("no model compiled")
    if not all(r["loss_finite"] for r in results.values() if "compile_s" in r):
        raise AssertionError("a compiled model's loss is not finite")


# --------------------------------------------------------------------------- `finetune train` runs

def cli_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def start_cmd(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (a kill reaches its DataLoader workers), output to ``log``."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish(ctx: Context, proc: subprocess.Popen, what: str) -> str:
    """Wait for ``proc`` within the section's time box; its log, or an error with the log's tail."""
    try:
        proc.wait(timeout=max(1.0, ctx.left()))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise TimeoutError(f"{what}: still running at the section's time box") from None
    text = proc.log.read_text(errors="replace")  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: ...{text[-1500:]}")
    return text


def train_args(ctx: Context, data: Path, out: Path, *extra: str) -> list[str]:
    s = ctx.sizes
    return ["train", "--data", str(data), "--model", "mobilenetv2_100",
            "--weights", weights_for(ctx, "mobilenetv2_100"),
            "--epochs", "2", "--img-size", str(s.cli_img), "--batch-size", str(s.cli_batch),
            "--mixed-precision", "bf16", "--no-progress", "--out", str(out), *extra]


def demo_data(ctx: Context) -> Path:
    from finetune.data.demo import write_demo_folder
    return write_demo_folder(ctx.workdir / "data", train_per_class=ctx.sizes.train_per_class,
                             val_per_class=ctx.sizes.val_per_class)


def run_figures(run: Path) -> dict[str, Any]:
    """world size, val top-1 and img/s per epoch from a finished run directory."""
    meta = json.loads((run / "model.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "log.csv").open()))
    return {"world_size": meta["world_size"], "status": meta["status"], "val_top1": metrics["top1"],
            "train_seconds": metrics["train_seconds"],
            "epoch_img_per_s": {f"{r['epoch']}_{r['phase']}": float(r["train_images_per_s"]) for r in rows},
            "epoch_val_top1": [float(r["val_top1"]) for r in rows]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def section_ddp(ctx: Context) -> None:
    """``finetune train`` in one process under torchrun: an NCCL (CPU: gloo) group, world size 1."""
    data = demo_data(ctx)
    run = ctx.workdir / "ddp-run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--max-restarts", "0",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "finetune.cli",
           *train_args(ctx, data, run)]
    env = cli_env(TORCH_DISTRIBUTED_DEBUG="INFO", TORCH_CPP_LOG_LEVEL="INFO")
    ctx.record(command=" ".join(cmd[1:]).replace(str(ctx.workdir), "WORK"))
    tic = time.perf_counter()
    log = finish(ctx, start_cmd(cmd, ctx.workdir / "ddp.log", env), "torchrun finetune train")
    backends = sorted(set(re.findall(r"backend_name: (\w+)", log)))
    memory_format = re.search(r"memory format: (.*)", log)
    expected = "gloo" if ctx.smoke else "nccl"
    ctx.record(wall_s=time.perf_counter() - tic, backend=backends[0] if len(backends) == 1 else backends,
               expected_backend=expected, memory_format=memory_format.group(1) if memory_format else None,
               **run_figures(run))
    if ctx.result["world_size"] != 1 or backends != [expected]:
        raise AssertionError(f"world_size {ctx.result['world_size']}, backend {backends} (expected 1, {expected})")


def latest_position(run: Path) -> tuple[int, int] | None:
    """(epochs done, batches) of the checkpoint named in ``RUN/checkpoints/latest``."""
    try:
        m = re.search(r"-e(\d+)b(\d+)", (run / "checkpoints" / "latest").read_text())
    except OSError:
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


def kill_mid_epoch2(ctx: Context, proc: subprocess.Popen, run: Path) -> str:
    """SIGKILL ``proc`` once a checkpoint inside its second epoch is named; that checkpoint's name."""
    while True:
        position = latest_position(run)
        if position is not None and position[0] >= 1 and position[1] >= 1:
            kill_group(proc)
            return (run / "checkpoints" / "latest").read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"run ended (exit {proc.returncode}) before a checkpoint in epoch 2: "
                               f"...{proc.log.read_text(errors='replace')[-1500:]}")  # type: ignore[attr-defined]
        if ctx.left() <= 0:
            kill_group(proc)
            raise TimeoutError("no checkpoint in epoch 2 before the section's time box")
        time.sleep(0.005)


def section_resume(ctx: Context) -> None:
    """Uninterrupted run vs one SIGKILLed mid-epoch 2 and resumed: the final checkpoints' weights."""
    import torch
    from safetensors.torch import load_file
    from finetune.train.checkpoints import find_checkpoint
    data = demo_data(ctx)
    ref, cut = ctx.workdir / "resume-ref", ctx.workdir / "resume-cut"
    extra = ("--checkpoint-every", "2", "--memory-format", "channels_last")
    env = cli_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")
    cli = [sys.executable, "-m", "finetune.cli"]
    tic = time.perf_counter()
    finish(ctx, start_cmd([*cli, *train_args(ctx, data, ref, *extra)], ctx.workdir / "ref.log", env), "reference run")
    ctx.record(reference_s=time.perf_counter() - tic, reference=run_figures(ref))
    proc = start_cmd([*cli, *train_args(ctx, data, cut, *extra)], ctx.workdir / "cut.log", env)
    killed_at = kill_mid_epoch2(ctx, proc, cut)
    ctx.record(killed_at=killed_at, complete_before_resume=(cut / "metrics.json").exists())
    if ctx.result["complete_before_resume"]:
        raise AssertionError("the run finished before the kill")
    finish(ctx, start_cmd([*cli, "train", str(cut / "recipe.yaml"), "--resume", "--no-progress"],
                          ctx.workdir / "resume.log", env), "resumed run")
    a = load_file(find_checkpoint(ref) / "model.safetensors")
    b = load_file(find_checkpoint(cut) / "model.safetensors")
    if a.keys() != b.keys():
        raise AssertionError("the two final checkpoints hold different tensors")
    diffs = [(x.float() - b[k].float()).abs().max().item() for k, x in a.items() if x.is_floating_point()]
    ctx.record(resumed=run_figures(cut), final_checkpoint=find_checkpoint(cut).name,
               identical=all(torch.equal(x, b[k]) for k, x in a.items()), max_abs_diff=max(diffs),
               deterministic_algorithms=False, cublas_workspace_config=":4096:8")


SECTIONS: dict[str, Callable[[Context], None]] = {
    "environment": section_environment, "finetune_steps": section_finetune_steps,
    "memory_format": section_memory_format, "ddp": section_ddp, "resume": section_resume,
    "compile": section_compile,
}
assert list(SECTIONS) == list(WEIGHTS)


def run_section(args: argparse.Namespace) -> int:
    """Child process: one section; its figures, then ok / error, go to --section-out."""
    sys.path.insert(0, str(REPO))
    # a cold inductor cache, so that `compile_s` is a real compile time on every run
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.workdir) / "inductor-cache"))
    ctx = Context(args)
    ctx.record(ok=False)
    try:
        import torch
        torch.manual_seed(0)  # the fresh heads' init
        SECTIONS[args.section](ctx)
        ctx.record(ok=True)
    except BaseException as err:  # noqa: BLE001 -- every failure is a figure here
        ctx.record(ok=False, error=f"{type(err).__name__}: {err}"[:3000],
                   traceback=traceback.format_exc().splitlines()[-8:])
    return 0


# --------------------------------------------------------------------------- driver

def spawn_section(name: str, seconds: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run one section in a subprocess boxed to ``seconds`` (+ grace); its result, partial on a kill."""
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--section-out", str(out),
           "--section-seconds", f"{seconds:.1f}", "--workdir", str(workdir)]
    cmd += ["--cpu-smoke"] if args.cpu_smoke else []
    cmd += ["--weights-dir", args.weights_dir] if args.weights_dir else []
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, error = proc.communicate(timeout=seconds + GRACE_S)[0], None
    except subprocess.TimeoutExpired:
        kill_group(proc)
        output, error = proc.communicate()[0], f"killed at its time box ({seconds:.0f} s + {GRACE_S:.0f} s)"
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {"ok": False}
    if error or "error" not in result and not result.get("ok"):
        result.update(ok=False, error=error or f"section process exited {proc.returncode}: ...{output[-1500:]}")
    return {**result, "seconds": round(time.perf_counter() - tic, 1), "time_box_s": round(seconds, 1)}


def summary(name: str, r: dict[str, Any]) -> str:
    """One line of headline figures per section."""
    if not r.get("ok") and "error" in r:
        return r["error"].splitlines()[0][:110]
    if name == "environment":
        mm = r.get("matmul_gflops", {})
        return (f"{r.get('gpu', 'cpu')}  torch {r.get('torch')} cuda {r.get('cuda')} cudnn {r.get('cudnn')}  "
                + " ".join(f"{k} {v / 1000:.1f} TF/s" for k, v in mm.items()))
    if name == "finetune_steps":
        return "  ".join(f"{k.replace('tf_efficientnet_', '').replace('mobilenetv2_100', 'mnv2')} "
                         f"{v['img_per_s']:.0f} img/s loss {v['loss_first']:.2f}->{v['loss_last']:.2f}"
                         for k, v in r.get("runs", {}).items())
    if name == "memory_format":
        return "  ".join(f"{k.replace('tf_efficientnet_', '').replace('mobilenetv2_100', 'mnv2')} {v:.2f}x"
                         for k, v in r.get("img_per_s", {}).items() if k.endswith("cl_vs_nchw"))
    if name == "ddp":
        return (f"backend {r.get('backend')} world {r.get('world_size')} val top-1 {r.get('val_top1', 0):.3f} "
                f"img/s {r.get('epoch_img_per_s')}")
    if name == "resume":
        return (f"killed at {r.get('killed_at')}, identical {r.get('identical')}, "
                f"max |diff| {r.get('max_abs_diff', 0):.3g}")
    return "  ".join(f"{k} compile {v['compile_s']:.0f} s, {v['speedup']:.2f}x" if "compile_s" in v else f"{k} {v}"
                     for k, v in r.get("models", {}).items())


def run_all(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "budget_s": args.budget_s,
                              "sizes": asdict(SMOKE if args.cpu_smoke else GPU),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sections": {}}
    start = time.monotonic()
    for i, name in enumerate(SECTIONS):
        left = args.budget_s - (time.monotonic() - start)
        share = WEIGHTS[name] / sum(list(WEIGHTS.values())[i:])
        if left * share < 5:
            result = {"ok": False, "error": f"skipped: its share of the {left:.0f} s left is under 5 s"}
        else:
            result = spawn_section(name, left * share, args, workdir)
        report["sections"][name] = result
        report.update(wall_s=round(time.monotonic() - start, 1),
                      all_ok=all(r.get("ok") for r in report["sections"].values()))
        write_json(out, report)
        print(f"[{time.monotonic() - start:5.0f} s] {name:<15}{'ok' if result.get('ok') else 'FAILED'}", flush=True)
    print(f"\n{'section':<15}{'ok':<7}{'s':>6}  figures")
    for name, result in report["sections"].items():
        status = "ok" if result.get("ok") else "FAILED"
        print(f"{name:<15}{status:<7}{result.get('seconds', 0):>6.0f}  {summary(name, result)}")
    print(f"wrote {out} ({report['wall_s']:.0f} s)")
    return 0 if report["all_ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json", help="where to write the JSON")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time budget in seconds (default 420; 480 with --cpu-smoke, which takes "
                             "1.5-2.5 min on 2 idle cores: its boxes only stop a hang)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every section on CPU at tiny sizes (tests the script)")
    parser.add_argument("--weights-dir",
                        help="folder of <model>.safetensors, used when the offline packages are missing")
    parser.add_argument("--workdir", help="scratch folder for data and run directories (default: a new temp folder)")
    for hidden in ("--section", "--section-out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--section-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return run_section(args)
    if args.budget_s is None:
        args.budget_s = 480.0 if args.cpu_smoke else 420.0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
