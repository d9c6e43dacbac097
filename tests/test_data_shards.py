"""WebDataset shards (issue 17 d4): ``finetune shard`` writes the folder's own split and an index that
round-trips; the stream splits processes and loader workers with equal steps and full validation
coverage; training from shards in 1 and in 2 real processes writes the run files of a folder run;
resume at an epoch boundary and mid-epoch equals an uninterrupted run; bad input is one line, exit 2.
The 2-process run reaching the folder run's top-1 within 1 point at the same budget is ``slow``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.data import scan_folder
from finetune.data.demo import write_demo_folder
from finetune.data.shard_stream import PAD_LABEL, ShardLoader, ShardStream
from finetune.data.shards import read_index, resolve_shards
from finetune.train.checkpoints import find_checkpoint
from helpers import run_finetune

TRAIN = ["--model", "mobilenetv2_100", "--weights", "offline", "--img-size", "32", "--memory-format", "contiguous",
         "--no-progress"]


def _members(tar: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def _ok(*args: str, timeout: float = 600):
    result = run_finetune(*args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def shards(digits_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    assert main(["shard", str(digits_folder), "--out", str(out), "--shard-size", "40KB", "--seed", "3"]) == 0
    return out


def test_shards_hold_the_folder_split_bytes_as_stored_and_the_index_round_trips(digits_folder, shards):
    split = scan_folder(digits_folder, val_fraction=0.2, seed=3)  # what `finetune train --seed 3` trains on
    index = read_index(shards)
    assert index["classes"] == split.classes
    for name, samples in (("train", split.train), ("val", split.val)):
        part = index["splits"][name]
        assert part["count"] == len(samples) and len(part["shards"]) > 1
        assert part["class_counts"] == [sum(s.label == c for s in samples) for c in range(len(split.classes))]
        assert [s["name"] for s in part["shards"]] == [f"{name}-{i:06d}.tar" for i in range(len(part["shards"]))]
        stored = Counter()
        for shard in part["shards"]:
            members = _members(shards / shard["name"])
            assert len(members) == shard["count"]
            assert sum(int(m["cls"]) == c for m in members.values()
                       for c in range(len(split.classes)) if shard["class_counts"][c]) == shard["count"]
            stored.update((m["png"], int(m["cls"]), m["fname"].decode()) for m in members.values())
        expected = Counter((s.path.read_bytes(), s.label, str(s.path.relative_to(digits_folder))) for s in samples)
        assert stored == expected  # the split's images, byte for byte (no re-encode), with their labels
    source = resolve_shards(f"wds:{shards}/train-{{000000..{len(index['splits']['train']['shards']) - 1:06d}}}.tar")
    assert sum(source.counts) == len(split.train) and source.classes == split.classes
    assert (shards / "skipped.txt").read_text() == ""


def test_manifest_shards_split_like_the_manifest(digits_folder, tmp_path):
    manifest = tmp_path / "labels.csv"
    rows = [(str(p.relative_to(digits_folder)), p.parent.name) for p in sorted(digits_folder.glob("*/*.png"))]
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows[:100], ("missing.png", "zero")])
    out = tmp_path / "s"
    assert main(["shard", str(digits_folder), "--labels", str(manifest), "--out", str(out)]) == 0
    index = read_index(out)
    assert index["splits"]["train"]["count"] + index["splits"]["val"]["count"] == 100
    assert [s["path"].endswith("missing.png") for s in index["skipped"]] == [True]
    assert "missing.png" in (out / "skipped.txt").read_text()


def test_broken_files_are_skipped_and_listed_like_the_folder_scan(messy_folder, tmp_path, capsys):
    out = tmp_path / "messy"
    assert main(["shard", str(messy_folder), "--out", str(out)]) == 0
    split = scan_folder(messy_folder)
    index = read_index(out)
    assert sorted(s["path"] for s in index["skipped"]) == sorted(str(s.path) for s in split.skipped)
    assert len(split.skipped) == 6 and len((out / "skipped.txt").read_text().splitlines()) == 6
    assert index["classes"] == split.classes and index["warnings"] == split.warnings
    assert f"skipped 6 unreadable image(s); list in {out}/skipped.txt" in capsys.readouterr().out


def test_the_stream_gives_every_process_the_same_steps_and_validation_each_image_once(shards):
    train, val = resolve_shards(f"wds:{shards}"), resolve_shards(f"wds:{shards}", "val")
    tf = lambda image: torch.tensor(image.getpixel((16, 16)), dtype=torch.float32)  # noqa: E731

    def batches(source, rank, *, is_train, epoch=1, workers=0, batch=8):
        stream = ShardStream(source.urls, source.counts, batch_size=batch, seed=0, train=is_train, transform=tf,
                             rank=rank, processes=2, pad_shape=(3,))
        loader = ShardLoader(stream, num_workers=workers)
        loader.set_epoch(epoch)
        return list(loader)

    ranks = [batches(val, r, is_train=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ShardStream(val.urls, val.counts, batch_size=8, seed=0,
                                                             train=False, processes=2))
    labels = torch.cat([y for rank in ranks for _, y in rank])
    real = labels[labels != PAD_LABEL]
    assert len(real) == sum(val.counts) and all(len(y) == 8 for rank in ranks for _, y in rank)
    assert torch.bincount(real).tolist() == val.index["splits"]["val"]["class_counts"]

    expected = -(-sum(train.counts) // 16)  # ceil(N / (processes × batch)) full batches in every process
    first = [batches(train, r, is_train=True, workers=2) for r in (0, 1)]
    assert [len(b) for b in first] == [expected, expected]
    again = batches(train, 0, is_train=True, workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[0], again))
    other = batches(train, 0, is_train=True, workers=2, epoch=2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first[0], other))  # a new order every epoch
    stream = ShardStream(train.urls, train.counts, batch_size=8, seed=0, train=True, transform=tf, processes=2,
                         pad_shape=(3,))
    resumed = ShardLoader(stream, num_workers=2)
    resumed.set_epoch(1)
    rest = list(resumed.skip(3))  # mid-epoch: skipping the consumed batches continues the same stream
    assert len(rest) == expected - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, first[0][3:]))


@pytest.mark.parametrize("case", ["no-match", "no-index", "no-cls", "balanced", "lazy"])
def test_bad_shard_input_is_one_line_and_exit_code_2(shards, tmp_path, capsys, case):
    data = f"wds:{shards}"
    extra: list[str] = []
    if case == "no-match":
        data = f"wds:{shards}/train-{{000100..000109}}.tar"
    elif case == "no-index":
        (tmp_path / "lone").mkdir()
        shutil.copy(shards / "train-000000.tar", tmp_path / "lone")
        data = f"wds:{tmp_path}/lone/train-{{000000..000000}}.tar"
    elif case == "no-cls":
        copy = tmp_path / "copy"
        shutil.copytree(shards, copy)
        with tarfile.open(copy / "train-000000.tar", "w") as archive:
            payload = (shards / "skipped.txt").read_bytes() or b"x"
            info = tarfile.TarInfo("000000000.png")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        data = f"wds:{copy}"
    elif case in ("balanced", "lazy"):
        extra = ["--sampler", "balanced"] if case == "balanced" else ["--check-images", "lazy"]
    code = main(["train", "--data", data, "--out", str(tmp_path / "run"), *TRAIN, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("finetune: error: "), err
    assert {"no-match": "no shards match", "no-index": "no shard index", "no-cls": "has no `cls`",
            "balanced": "--class-balanced", "lazy": "already decoded"}[case] in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- training from shards


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    data = write_demo_folder(tmp_path_factory.mktemp("demo") / "data", train_per_class=16, val_per_class=5)
    out = data.parent / "shards"
    assert main(["shard", str(data), "--out", str(out), "--shard-size", "30KB"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    n_train = len(read_index(demo_shards)["splits"]["train"]["shards"]) - 1
    n_val = len(read_index(demo_shards)["splits"]["val"]["shards"]) - 1
    _ok("train", "--data", f"wds:{demo_shards}/train-{{000000..{n_train:06d}}}.tar",
        "--val-data", f"wds:{demo_shards}/val-{{000000..{n_val:06d}}}.tar", *TRAIN, "--epochs", "2",
        "--batch-size", "32", "--checkpoint-every", "2", "--keep-checkpoints", "50", "--out", str(out))
    return out


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(find_checkpoint(run_dir) / "model.safetensors")


def _log(run_dir: Path) -> list[dict[str, str]]:
    timing = ("epoch_seconds", "train_images_per_s")
    return [{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader((run_dir / "log.csv").open())]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _final(a), _final(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_one_process_trains_from_shards_and_writes_the_files_of_a_folder_run(reference):
    for name in ("log.csv", "metrics.json", "model.safetensors", "model.json", "report.html", "recipe.yaml"):
        assert (reference / name).is_file(), name
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["num_samples"] == 50 and len(metrics["classes"]) == 10  # every val image once, no padding
    rows = list(csv.DictReader((reference / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((reference / "model.json").read_text())["data"]["train_images"] == 160
    assert "wds:/" in (reference / "recipe.yaml").read_text()  # absolute, re-runnable


@pytest.mark.parametrize("where", ["epoch-boundary", "mid-epoch"])
def test_resume_from_a_shard_checkpoint_equals_the_uninterrupted_run(reference, tmp_path, where):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    tag = "e001b00000" if where == "epoch-boundary" else "e001b00002"  # after epoch 1 / 2 batches into epoch 2
    (checkpoint,) = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(tag)]
    for later in (run / "checkpoints").iterdir():
        if later.is_dir() and later.name > checkpoint.name:
            shutil.rmtree(later)
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    recipe = run / "recipe.yaml"  # the copy is its own run: its recipe names it
    recipe.write_text(recipe.read_text().replace(str(reference.resolve()), str(run.resolve())))
    result = _ok("train", str(run / "recipe.yaml"), "--resume", "--no-progress")
    assert f"resuming from {run.resolve() / 'checkpoints' / checkpoint.name}" in result.stdout
    assert _same_weights(run, reference)
    assert _log(run) == _log(reference)


def test_two_processes_train_from_shards(demo_shards, tmp_path):
    out = tmp_path / "two"
    _ok("train", "--data", f"wds:{demo_shards}", *TRAIN, "--epochs", "1", "--batch-size", "16", "--num-processes",
        "2", "--out", str(out))
    assert json.loads((out / "model.json").read_text())["world_size"] == 2
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 50


@pytest.mark.slow
def test_two_process_shard_run_reaches_the_folder_runs_top1_within_one_point(tmp_path):
    data = write_demo_folder(tmp_path / "data", train_per_class=60, val_per_class=100)  # 1 point = 10 images
    assert main(["shard", str(data), "--out", str(tmp_path / "s"), "--shard-size", "100KB"]) == 0
    budget = [*TRAIN, "--epochs", "6"]
    _ok("train", "--data", str(data), *budget, "--batch-size", "32", "--out", str(tmp_path / "folder"))
    _ok("train", "--data", f"wds:{tmp_path / 's'}", *budget, "--batch-size", "16", "--num-processes", "2",
        "--out", str(tmp_path / "shards"))
    folder = json.loads((tmp_path / "folder" / "metrics.json").read_text())
    sharded = json.loads((tmp_path / "shards" / "metrics.json").read_text())
    assert sharded["num_samples"] == folder["num_samples"] == 1000
    assert abs(sharded["top1"] - folder["top1"]) <= 0.01, (sharded["top1"], folder["top1"])
