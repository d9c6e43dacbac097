"""End-to-end tests of the ``finetune`` console script, run as a real subprocess.

Project rule: every user mistake ends in ONE line on stderr, ``finetune: error: ...``, saying
what was wrong and what to do, with exit code 2 and never a traceback.

Each command costs a few seconds of imports (torch, timm, accelerate), so the slow ones run
once per module, concurrently, in the ``cli`` fixture; the tests then only read their results.
Every command runs in its own empty working directory so that a test can check that an error
left nothing behind (e.g. no ``runs/<model>-<time>/``).

The hub is kept unreachable even on a machine with a network: HTTPS goes through a proxy on a
closed local port, HF_HUB_OFFLINE is unset, and the HF cache is an empty temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune.config import SHORT_KEYS, STRATEGIES

_SCRIPT = Path(sys.executable).with_name("finetune")
FINETUNE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "finetune.cli"]
OFFLINE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100")
TIMEOUT_S = 240
# A tiny but real training run: 8 images, 32 px, random init, one epoch.
TINY_TRAIN = ["--model", "mobilenetv2_050", "--weights", "none", "--epochs", "1", "--strategy", "probe",
              "--img-size", "32", "--batch-size", "4", "--num-workers", "0", "--memory-format", "contiguous",
              "--no-progress"]


@dataclass(repr=False)
class Result:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    cwd: Path

    def __repr__(self) -> str:  # shown by pytest when an assertion about a result fails
        return (f"finetune {' '.join(self.args)}\n  exit {self.returncode} after {self.seconds:.1f}s\n"
                f"  stdout: {self.stdout[-1500:]!r}\n  stderr: {self.stderr[-3000:]!r}")


def cli_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "NO_PROXY", "no_proxy", "COLUMNS")}
    closed_port = "http://127.0.0.1:9"  # nothing listens: the hub probe fails at once
    env.update(
        FINETUNE_CACHE=str(root / "finetune-cache"), HF_HOME=str(root / "hf-home"),
        HTTPS_PROXY=closed_port, https_proxy=closed_port, HTTP_PROXY=closed_port, http_proxy=closed_port,
        OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = TIMEOUT_S) -> Result:
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([*FINETUNE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(args, None, out, err + f"\n[timed out after {timeout}s]", time.perf_counter() - start, cwd)
    return Result(args, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start, cwd)


def user_error(result: Result, *words: str) -> str:
    """Assert the project's error contract and return the message after ``finetune: error: ``."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr must be exactly one line\n{result}"
    line = lines[0]
    assert line.startswith("finetune: error: ") and line[len("finetune: error: "):].strip(), result
    for word in words:
        assert word in line, f"{word!r} not in the message\n{result}"
    return line[len("finetune: error: "):]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------- fixtures

@dataclass
class Folders:
    root: Path
    two: Path  # 2 classes x 4 real digit PNGs
    one: Path  # 1 class, 2 PNGs
    no_images: Path  # class folders with a text file and an empty .png only
    not_a_run: Path  # a folder with files but no model.json
    out_full: Path  # an existing non-empty --out
    out_before: dict
    image: Path  # one readable PNG
    missing: Path  # a path that does not exist


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> Folders:
    root = tmp_path_factory.mktemp("cli")
    two, one, none = root / "two", root / "one", root / "no_images"
    for name in ("zero", "one"):
        (two / name).mkdir(parents=True)
        for src in sorted((digits_folder / name).glob("*.png"))[:4]:
            shutil.copy(src, two / name / src.name)
    (one / "cat").mkdir(parents=True)
    for src in sorted((digits_folder / "seven").glob("*.png"))[:2]:
        shutil.copy(src, one / "cat" / src.name)
    for name in ("a", "b"):
        (none / name).mkdir(parents=True)
    (none / "a" / "notes.txt").write_text("not an image\n")
    (none / "b" / "empty.png").write_bytes(b"")
    not_a_run = root / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "hello.txt").write_text("hello\n")
    out_full = root / "out_full"
    (out_full / "sub").mkdir(parents=True)
    (out_full / "keep.txt").write_text("precious results\n")
    (out_full / "sub" / "inner.csv").write_text("a,b\n1,2\n")
    image = next((two / "zero").glob("*.png"))
    return Folders(root, two, one, none, not_a_run, out_full, snapshot(out_full), image, root / "does-not-exist")


@pytest.fixture(scope="module")
def cli(folders: Folders) -> dict[str, Result]:
    """Run every slow command once, concurrently; name -> Result."""
    f = folders
    env = cli_env(f.root)
    run_dir = f.root / "trained-run"
    independent = {
        "train_run": ["train", "--data", str(f.two), *TINY_TRAIN, "--out", str(run_dir)],
        "missing_data": ["train", "--epochs", "3"],
        "data_missing": ["train", "--data", str(f.missing)],
        "one_class": ["train", "--data", str(f.one)],
        "no_images": ["train", "--data", str(f.no_images)],
        "unknown_model": ["train", "--data", str(f.two), "--model", "mobilenetv2_10"],
        "hub_weights": ["train", "--data", str(f.two), "--model", "mobilenetv3_large_100", "--weights", "hub"],
        "weights_file": ["train", "--data", str(f.two), "--weights", "/nonexistent.pth"],
        "strategy": ["train", "--data", str(f.two), "--strategy", "freeze"],
        "lr": ["train", "--data", str(f.two), "--lr", "abc"],
        "epochs": ["train", "--data", str(f.two), "--epochs", "0"],
        # TINY_TRAIN so that, were the check missing, the mistake would cost seconds, not minutes
        "out_exists": ["train", "--data", str(f.two), *TINY_TRAIN, "--out", str(f.out_full)],
        "eval_not_run": ["eval", str(f.not_a_run), "--data", str(f.two)],
        # a bare relative name, as people type it (`finetune predict myrun photo.jpg`)
        "predict_no_run": ["predict", "no-such-run", "no-such-photo.jpg"],
        "predict_model_name": ["predict", "mobilenetv2_100", str(f.image)],
        "models": ["models"],
        "models_offline": ["models", "--offline-only"],
    }
    dependent = {  # need the trained run
        "predict_missing_input": ["predict", str(run_dir), str(f.image), str(f.missing)],
    }
    workers = min(4, (os.cpu_count() or 2) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_cli, args, f.root / "cwd" / name, env) for name, args in independent.items()}
        futures["train_run"].result()  # the training run was submitted first
        futures.update({name: pool.submit(run_cli, args, f.root / "cwd" / name, env)
                        for name, args in dependent.items()})
        results = {name: future.result() for name, future in futures.items()}
    results["train_run"].cwd = run_dir  # where it wrote
    return results


# --------------------------------------------------------------------------- --help

def quick(args: list[str], tmp_path: Path) -> Result:
    return run_cli(args, tmp_path / "cwd", cli_env(tmp_path), timeout=60)


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    result = quick(["--help"], tmp_path)
    assert result.returncode == 0, result
    for command in ("train", "eval", "predict", "models", "demo", "convert", "distill", "compare", "shard",
                    "export", "compress"):
        assert command in result.stdout
    version = quick(["--version"], tmp_path)
    assert version.returncode == 0 and "finetune-vision" in version.stdout, version


HELP_FLAGS = {
    "train": ["recipe", "--overwrite", "--no-progress", "examples:", *STRATEGIES],
    "eval": ["run", "--data", "--out", "--batch-size", "--json"],
    "predict": ["run", "inputs", "--top-k", "--batch-size", "--json", "--csv"],
    "models": ["--offline-only", "--prepare"],
    "demo": ["--out", "--quick", "--no-progress"],
    "convert": ["source", "--out", "--rank", "--energy", "--macs", "--form", "--calib-data", "--include",
                "--exclude", "--no-latency", "--objective", "--force", "--no-refit", "--latency-batch", "--latency-memory-format"],
    "compare": ["--data", "--test-data", "--model", "--rank", "--epochs", "--img-size"],
    "distill": ["--teacher", "--student", "--data", "--kd-alpha", "--kd-temperature", "--kd-beta", "--epochs"],
    "shard": ["src", "--out", "--labels", "--shard-size", "--val-fraction", "--seed", "examples:"],
    "export": ["run", "--format", "--int8", "--calib-data", "--calib-images", "--calib-method", "--max-drop", "--force",
               "--bias-correction", "--val-data"],
    "compress": ["run", "--data", "--out", "--variants", "--max-drop", "--calib-images", "--distill-epochs"],
}


@pytest.mark.parametrize("command", list(HELP_FLAGS))
def test_subcommand_help(command: str, tmp_path: Path) -> None:
    result = quick([command, "--help"], tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"usage: finetune {command}"), result
    assert result.stderr == "", result
    for flag in HELP_FLAGS[command]:
        assert flag in result.stdout, f"{flag} missing from `finetune {command} --help`"
    if command == "train":  # one flag per TrainConfig field, generated from its metadata
        for name in SHORT_KEYS:
            assert "--" + name.replace("_", "-") in result.stdout, name
        assert "--set KEY=VALUE" in result.stdout
        assert "--check-images" in result.stdout and "--no-check-images" in result.stdout


# --------------------------------------------------------------------------- train mistakes

def test_train_without_data(cli: dict[str, Result]) -> None:
    message = user_error(cli["missing_data"], "--data")
    assert "folder" in message


def test_train_data_does_not_exist(cli: dict[str, Result], folders: Folders) -> None:
    user_error(cli["data_missing"], str(folders.missing), "does not exist")


def test_train_one_class(cli: dict[str, Result]) -> None:
    message = user_error(cli["one_class"], "`cat`")
    assert "one class" in message and "2" in message  # says a classifier needs two


def test_train_no_images(cli: dict[str, Result], folders: Folders) -> None:
    message = user_error(cli["no_images"], str(folders.no_images))
    assert "no images" in message and ".jpg" in message  # what it looked for


def test_train_unknown_model_suggests_close_names(cli: dict[str, Result]) -> None:
    message = user_error(cli["unknown_model"], "`mobilenetv2_10`")
    assert "mobilenetv2_100" in message and "did you mean" in message


def test_train_hub_weights_offline(cli: dict[str, Result]) -> None:
    message = user_error(cli["hub_weights"], "mobilenetv3_large_100")
    assert "--weights offline" in message and "--weights none" in message
    assert "network" in message


def test_train_weights_file_missing(cli: dict[str, Result]) -> None:
    message = user_error(cli["weights_file"], "/nonexistent.pth", "does not exist")
    assert ".safetensors" in message  # what to pass instead


def test_train_invalid_strategy(cli: dict[str, Result]) -> None:
    message = user_error(cli["strategy"], "strategy", "`freeze`")
    assert all(choice in message for choice in STRATEGIES)


def test_train_lr_not_a_number(cli: dict[str, Result]) -> None:
    user_error(cli["lr"], "lr", "`abc`", "not a number")


def test_train_zero_epochs(cli: dict[str, Result]) -> None:
    user_error(cli["epochs"], "epochs", "`0`", "at least 1")


def test_train_out_exists_without_overwrite(cli: dict[str, Result], folders: Folders) -> None:
    user_error(cli["out_exists"], str(folders.out_full), "--overwrite")
    assert snapshot(folders.out_full) == folders.out_before, "existing files were touched"
    assert "epoch" not in cli["out_exists"].stdout


TRAIN_ERRORS = ["missing_data", "data_missing", "one_class", "no_images", "unknown_model", "hub_weights",
                "weights_file", "strategy", "lr", "epochs", "out_exists"]


@pytest.mark.parametrize("name", TRAIN_ERRORS)
def test_train_mistakes_fail_before_training_and_leave_nothing(cli: dict[str, Result], name: str) -> None:
    result = cli[name]
    assert result.returncode == 2, result
    assert "epoch" not in result.stdout, result  # no training started
    left = sorted(str(p.relative_to(result.cwd)) for p in result.cwd.rglob("*"))
    assert left == [], f"`finetune {' '.join(result.args)}` failed but left {left} in its working directory"


# --------------------------------------------------------------------------- eval / predict mistakes

def test_eval_on_a_folder_that_is_not_a_run(cli: dict[str, Result], folders: Folders) -> None:
    message = user_error(cli["eval_not_run"], str(folders.not_a_run), "not a run directory")
    assert "finetune train" in message  # what to pass instead


def test_predict_on_a_run_that_does_not_exist(cli: dict[str, Result]) -> None:
    # Both the run and the input are missing: the run is the first argument and is reported,
    # as a run directory (not as an unknown timm model name).
    message = user_error(cli["predict_no_run"], "no-such-run", "does not exist")
    assert "unknown" not in message and "no-such-photo.jpg" not in message
    assert "finetune train" in message


def test_predict_with_a_model_name_instead_of_a_run(cli: dict[str, Result]) -> None:
    message = user_error(cli["predict_model_name"], "mobilenetv2_100")
    assert "run" in message


def test_tiny_training_run_succeeds(cli: dict[str, Result]) -> None:
    result = cli["train_run"]
    assert result.returncode == 0, result
    for name in ("model.json", "model.safetensors", "recipe.yaml", "metrics.json"):
        assert (result.cwd / name).is_file(), name


def test_predict_on_an_input_that_does_not_exist(cli: dict[str, Result], folders: Folders) -> None:
    assert cli["train_run"].returncode == 0, cli["train_run"]
    result = cli["predict_missing_input"]
    message = user_error(result, str(folders.missing), "does not exist")
    assert "image" in message  # what to pass instead
    assert str(folders.image) not in result.stdout  # nothing predicted for the good file either


# --------------------------------------------------------------------------- argparse-level mistakes

@pytest.mark.parametrize("args", [
    ["eval", "some-run"],  # --data missing
    ["predict", "some-run", "x.png", "--top-k", "three"],
    ["train", "--data", "photos", "--bogus-flag"],
    ["frobnicate"],
])
def test_argument_errors_are_one_line_too(args: list[str], tmp_path: Path) -> None:
    user_error(quick(args, tmp_path))


# --------------------------------------------------------------------------- models

def _offline_rows(stdout: str) -> dict[str, str]:
    """The indented rows under the "Offline ImageNet-1k weights" heading: name -> rest of line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Offline ImageNet-1k weights")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        name, rest = line.split(None, 1)
        rows[name] = rest
    return rows


def _family_names(stdout: str) -> set[str]:
    """Every model named in the per-family listing of hub models."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Hugging Face hub:")) + 1
    names: set[str] = set()
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        body = line.split(": ", 1)[1] if ": " in line else line
        names.update(n.strip().rstrip("*") for n in body.split(",") if n.strip())
    return names


def test_models_lists_offline_models_as_installed(cli: dict[str, Result]) -> None:
    result = cli["models"]
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr
    # generous (the runs share the CPU); a stalled hub probe would take minutes
    assert result.seconds < 60, f"`finetune models` took {result.seconds:.1f}s"
    assert "Hugging Face hub: unreachable" in result.stdout
    rows = _offline_rows(result.stdout)
    assert sorted(rows) == sorted(OFFLINE)
    for name in OFFLINE:
        assert rows[name].split()[0] == "installed", rows[name]
    others = _family_names(result.stdout)
    assert {"mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_b0"} <= others
    assert not others & set(OFFLINE)  # the offline ones are listed once, in their own section
    assert len(others) > 20


def test_models_offline_only(cli: dict[str, Result]) -> None:
    result = cli["models_offline"]
    assert result.returncode == 0, result
    assert result.seconds < 60, f"`finetune models --offline-only` took {result.seconds:.1f}s"
    rows = _offline_rows(result.stdout)
    assert sorted(rows) == sorted(OFFLINE)
    assert all(row.split()[0] == "installed" for row in rows.values()), rows
    assert "Hugging Face hub:" not in result.stdout
