"""``data.sampler: balanced``: class-balanced draws that stay a function of (seed, epoch, index),
so exact resume after ``kill -9`` still holds.

The folder is the demo set with five classes cut to a quarter (16 vs 4 training images each).
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import Recipe
from finetune.data import scan_folder
from finetune.data.demo import write_demo_folder
from finetune.data.sampling import BalancedSampler, EpochSampler
from finetune.train.checkpoints import find_checkpoint
from helpers import run_finetune, start_finetune, wait_for_checkpoint

MAJOR, MINOR = 16, 4  # training images per class: classes 0-4 keep 16, classes 5-9 keep 4
EPOCHS = 2
TRAIN = ["--model", "mobilenetv2_100", "--weights", "offline", "--epochs", str(EPOCHS), "--img-size", "32",
         "--batch-size", "32", "--memory-format", "contiguous", "--checkpoint-every", "1", "--no-progress",
         "--sampler", "balanced", "--num-workers", "0"]
TIMING = ("epoch_seconds", "train_images_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = write_demo_folder(tmp_path_factory.mktemp("balanced") / "data", train_per_class=MAJOR, val_per_class=4)
    for folder in sorted((root / "train").iterdir())[5:]:
        for image in sorted(folder.iterdir())[MINOR:]:
            image.unlink()
    return root


@pytest.fixture(scope="module")
def labels(data) -> list[int]:
    split = scan_folder(data, check_images=False)
    return [s.label for s in split.train]


def _shares(draws: list[int], labels: list[int]) -> list[float]:
    counts = Counter(labels[i % len(labels)] for i in draws)
    return [counts[c] / len(draws) for c in range(10)]


def test_folder_is_imbalanced(labels):
    counts = Counter(labels)
    assert [counts[c] for c in range(10)] == [MAJOR] * 5 + [MINOR] * 5


def test_class_frequencies_are_close_to_uniform(labels):
    sampler = BalancedSampler(labels, seed=0)
    draws: list[int] = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        epoch_draws = list(sampler)
        assert len(epoch_draws) == len(labels)  # one data set's worth per epoch
        assert all(d // len(labels) == epoch for d in epoch_draws)
        draws += epoch_draws
    # 20 epochs x 100 draws, seed 0: every class within 0.1 ± 0.03 (binomial sd ≈ 0.0067)
    assert max(abs(s - 0.1) for s in _shares(draws, labels)) < 0.03
    # one epoch alone (100 draws), seed 0: within 0.1 ± 0.08 (sd 0.03), the small classes half of it ± 0.1
    sampler.set_epoch(0)
    one = _shares(list(sampler), labels)
    assert max(abs(s - 0.1) for s in one) < 0.08 and abs(sum(one[5:]) - 0.5) < 0.1
    # the shuffled order keeps the folder's shares: 4 / 100 for a small class
    assert _shares(list(EpochSampler(len(labels), seed=0)), labels)[9] == pytest.approx(MINOR / len(labels))


def test_same_seed_and_epoch_same_order_other_epochs_differ(labels):
    a, b = BalancedSampler(labels, seed=3), BalancedSampler(labels, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) == list(a)  # repeatable, and iterating does not advance anything
    first = [d % len(labels) for d in a]
    a.set_epoch(2)
    assert [d % len(labels) for d in a] != first
    c = BalancedSampler(labels, seed=4)
    c.set_epoch(1)
    assert [d % len(labels) for d in c] != first
    assert len(set(first)) < len(labels)  # with replacement: some images repeat


def test_recipe_key_and_flag():
    assert Recipe(data=".").data.sampler == "shuffle"
    assert Recipe(data=".", sampler="balanced").data.sampler == "balanced"
    with pytest.raises(Exception, match="did you mean `balanced`"):
        Recipe(data=".", sampler="balance")


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(find_checkpoint(run_dir) / "model.safetensors")


def _log(run_dir: Path) -> list[str]:
    import csv

    return [str({k: v for k, v in row.items() if k not in TIMING}) for row in csv.DictReader((run_dir / "log.csv").open())]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("balanced_ref") / "run"
    result = run_finetune("train", "--data", str(data), *TRAIN, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("trial", range(1))
def test_balanced_resume_after_sigkill_is_bit_identical(data, reference, tmp_path, trial):
    rng = random.Random(2000 + trial)
    out = tmp_path / "run"
    updates = EPOCHS * 4  # 100 images, batch 32: 4 updates per epoch
    job = start_finetune("train", "--data", str(data), *TRAIN, "--out", str(out))
    wait_for_checkpoint(job, out, rng.choice([1, 2, 3, 5, 6, 7]))  # mid-epoch checkpoints
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    assert "sampler: balanced" in (out / "recipe.yaml").read_text()
    resumed = run_finetune("train", str(out / "recipe.yaml"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    wa, wb = _final(reference), _final(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ after resume"
    assert _log(reference) == _log(out)
    assert int((out / "checkpoints" / "latest").read_text().split("-")[1]) == updates
