"""The scan cache (a re-scan decodes only new or changed files, safe under concurrent runs), one scan
per multi-process job, and lazy image checking (``check_images: lazy``).

Files are backdated by a minute where a test expects them cached: a verdict is only cached for a
file older than :data:`~finetune.data.scan_cache.SETTLE_SECONDS` (a rewrite within the timestamp
granularity could keep its size and mtime).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.config import Recipe
from finetune.data import (BadImageWarning, ImageDataset, Sample, SkipLog, Skipped, check_paths, find_images, lazy_skip_log,
                           list_images, read_skipped, scan_folder, scan_labelled, write_skipped)
from finetune.data import scan_cache
from finetune.data.demo import write_demo_folder
from finetune.data.images import check_file
from finetune.errors import FinetuneError
from finetune.train.checkpoints import find_checkpoint
from helpers import latest_updates, run_finetune, start_finetune, wait_for_checkpoint

E2E = ["--model", "mobilenetv2_100", "--weights", "offline", "--img-size", "32", "--epochs", "1",
       "--memory-format", "contiguous", "--no-progress", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache per test (children started by a test inherit it through the environment)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(path))
    return path


def backdate(root: Path, seconds: float = 60.0) -> Path:
    when = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))
    return root


def make_folder(root: Path, classes: int = 3, per_class: int = 6, bad: bool = True) -> Path:
    """``root/c<k>/<i>.png`` small real PNGs, plus (``bad``) a text file and a truncated JPEG in ``c0``."""
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (8 + i, 8), 10 * k + i).save(root / f"c{k}" / f"{i:02d}.png")
    if bad:
        (root / "c0" / "text.png").write_text("not an image")
        Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "c0" / "cut.jpg", quality=90)
        data = (root / "c0" / "cut.jpg").read_bytes()
        (root / "c0" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return backdate(root)


def shards(cache: Path) -> list[Path]:
    return sorted((cache / "scan").glob("*.json"))


class CountDecodes:
    """Wraps the decoder the cache calls; counts the files it was handed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files = 0
        real = scan_cache.check_files

        def counting(paths, check_images):
            self.files += len(paths) if check_images else 0  # False: a stat per file, no decoding
            return real(paths, check_images)

        monkeypatch.setattr(scan_cache, "check_files", counting)


# --------------------------------------------------------------------------- the cache


def test_second_scan_decodes_nothing_and_agrees(tmp_path, cache):
    root = make_folder(tmp_path / "data")
    first = scan_folder(root, seed=0)
    assert (first.scan.images, first.scan.decoded, first.scan.cached) == (20, 20, 0)
    assert {s.path.name: s.reason.split(":")[0] for s in first.skipped} == {
        "cut.jpg": "truncated/corrupt", "text.png": "not an image (cannot identify)"}
    assert len(shards(cache)) == 3  # one per folder
    second = scan_folder(root, seed=0)
    assert (second.scan.images, second.scan.decoded, second.scan.cached) == (20, 0, 20)
    assert second.skipped == first.skipped and second.train == first.train and second.val == first.val


def test_changed_and_new_files_are_decoded_again(tmp_path):
    root = make_folder(tmp_path / "data", bad=False)
    assert scan_folder(root).scan.decoded == 18
    Image.new("L", (30, 30)).save(root / "c1" / "00.png")  # rewritten: other size and mtime
    (root / "c2" / "00.png").write_text("now garbage")  # an image replaced by a broken file
    Image.new("L", (9, 9)).save(root / "c2" / "new.png")
    for name in ("c1/00.png", "c2/00.png", "c2/new.png"):
        os.utime(root / name, (1e9, 1e9))  # old enough to be cached
    os.utime(root / "c2" / "01.png", ns=(0, 123_000_000_000))  # same bytes, only the mtime moves
    again = scan_folder(root)
    assert (again.scan.images, again.scan.decoded, again.scan.cached) == (19, 4, 15)
    assert [(s.path.name, s.reason) for s in again.skipped] == [("00.png", "not an image (cannot identify)")]
    assert scan_folder(root).scan.decoded == 0


def test_fresh_files_are_not_cached(tmp_path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(root / name / "0.png")
        Image.new("L", (8, 8)).save(root / name / "1.png")
    # written just now: a rewrite in the same timestamp tick would keep size and mtime, so no verdict is kept
    assert scan_folder(root).scan.decoded == 4
    assert scan_folder(root).scan.decoded == 4
    backdate(root)
    assert scan_folder(root).scan.decoded == 4
    assert scan_folder(root).scan.decoded == 0


def test_verdicts_depend_on_the_decompression_limit(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", bad=False)
    Image.new("L", (100, 100)).save(root / "c0" / "big.png")
    backdate(root)
    assert scan_folder(root).skipped == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # the cached "usable" no longer holds
    split = scan_folder(root)
    assert split.scan.decoded == 19 and split.skipped == [Skipped(root / "c0" / "big.png",
                                                                  "decompression bomb (10000 pixels)")]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other-json", "wrong-entries"])
def test_corrupt_cache_is_ignored(tmp_path, cache, damage):
    root = make_folder(tmp_path / "data")
    expected = scan_folder(root).skipped
    for shard in shards(cache):
        text = shard.read_text()
        shard.write_bytes({"garbage": b"\xff\xfe\x00garbage{[", "truncated": text[: len(text) // 2].encode(),
                           "empty": b"", "other-json": b'[1, 2, "x"]',
                           "wrong-entries": text.replace("[", '["x",').encode()}[damage])
    split = scan_folder(root)
    assert split.skipped == expected
    assert (split.scan.decoded, split.scan.cached) == (20, 0)
    assert all(json.loads(s.read_text())["format"] == scan_cache.FORMAT for s in shards(cache))  # rewritten
    assert scan_folder(root).scan.decoded == 0


def test_unwritable_cache_warns_and_scans(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("FINETUNE_CACHE", str(blocker))  # cache_dir()/scan cannot be created
    root = make_folder(tmp_path / "data")
    with pytest.warns(RuntimeWarning, match="scan cache not written"):
        split = scan_folder(root)
    assert len(split.skipped) == 2 and split.scan.decoded == 20


def test_symlinked_file_is_keyed_by_its_target(tmp_path):
    root = make_folder(tmp_path / "data", bad=False)
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.new("L", (8, 8)).save(other / "target.png")
    backdate(other)
    os.symlink(other / "target.png", root / "c1" / "link.png")
    assert scan_folder(root).scan.decoded == 19
    found, skipped, stats = find_images([other / "target.png"])
    assert skipped == [] and (stats.decoded, stats.cached) == (0, 1)  # the target's verdict, stored by the link


def test_eval_and_predict_scans_reuse_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_folder(root / "train", bad=False)
    make_folder(root / "val", per_class=2)
    split = scan_folder(root)
    assert split.scan.decoded == 26 and len(split.skipped) == 2
    counter = CountDecodes(monkeypatch)
    names, samples, skipped = scan_labelled(root)  # what `finetune eval` scans: root/val
    assert len(samples) == 6 and len(skipped) == 2
    found, skipped = list_images([root / "val" / "c0", root / "train" / "c1" / "00.png"])  # `finetune predict`
    assert len(found) == 3 and len(skipped) == 2
    assert counter.files == 0


def test_check_images_false_and_lazy_decode_nothing(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "data")
    (root / "c1" / "empty.png").write_bytes(b"")
    counter = CountDecodes(monkeypatch)
    for value in (False, "false", "lazy"):
        split = scan_folder(root, val_fraction=0.2, check_images=value)
        assert [s.path.name for s in split.skipped] == ["empty.png"]
        assert (split.scan.images, split.scan.decoded, split.scan.cached) == (21, 0, 0)
        assert root / "c0" / "text.png" in [s.path for s in split.train + split.val]  # left to the loader
    assert counter.files == 0 and shards(cache) == []
    with pytest.raises(FinetuneError, match="choose one of true, false, lazy"):
        scan_folder(root, check_images="sometimes")


def test_check_images_recipe_values():
    assert [Recipe(data="x", check_images=v).data.check_images for v in (True, "yes", "off", "Lazy")] == [
        True, True, False, "lazy"]
    assert Recipe.from_dict({}, ["data.check_images=lazy", "data.root=x"]).data.check_images == "lazy"
    with pytest.raises(FinetuneError) as excinfo:
        Recipe(data="x", check_images="lazzy")
    message = str(excinfo.value)
    assert "\n" not in message and "data.check_images" in message and "did you mean `lazy`" in message
    assert "true, false, lazy" in message


# --------------------------------------------------------------------------- concurrent scans


def _scan_in_child(root: str, names: list[str] | None, barrier, results) -> None:
    barrier.wait()  # start together
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    paths = files if names is None else [Path(root) / n for n in names]
    for _ in range(3 if names is not None else 1):
        bad, stats = check_paths(paths)
        results.put((os.getpid(), stats.decoded, stats.cached, sorted(p.name for p in bad)))


def _run_children(args: list[tuple]) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args)), ctx.Queue()
    children = [ctx.Process(target=_scan_in_child, args=(*a, barrier, results)) for a in args]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    out = []
    while not results.empty():
        out.append(results.get())
    return out


def test_two_processes_scanning_at_once_leave_a_valid_cache(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "data", classes=6, per_class=30)
    results = _run_children([(str(root), None), (str(root), None)])
    assert len(results) == 2 and all(r[1] + r[2] == 182 for r in results)
    assert all(r[3] == ["cut.jpg", "text.png"] for r in results)
    for shard in shards(cache):
        json.loads(shard.read_text())  # every shard whole
    assert not list((cache / "scan").glob("*.tmp"))
    counter = CountDecodes(monkeypatch)
    split = scan_folder(root)
    assert (split.scan.decoded, split.scan.cached, counter.files) == (0, 182, 0)
    assert sorted(s.path.name for s in split.skipped) == ["cut.jpg", "text.png"]


def test_writers_of_the_same_shards_never_corrupt_them(tmp_path, cache):
    # two processes write disjoint halves of the same folders three times over: a merge may lose the
    # other's new entries (a decode next time), never produce a broken shard or a wrong verdict
    root = make_folder(tmp_path / "data", classes=4, per_class=40)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    _run_children([(str(root), names[0::2]), (str(root), names[1::2])])
    for shard in shards(cache):
        assert json.loads(shard.read_text())["format"] == scan_cache.FORMAT
    split = scan_folder(root)
    assert split.scan.decoded + split.scan.cached == 162 and [s.path.name for s in split.skipped] == [
        "cut.jpg", "text.png"]
    assert scan_folder(root).scan.decoded == 0


# --------------------------------------------------------------------------- lazy checking


def size_of(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.size)


def test_skip_log_records_failures_from_loader_workers(tmp_path):
    root = make_folder(tmp_path / "data", classes=2, per_class=5)
    split = scan_folder(root, val_fraction=0.0001, check_images="lazy")
    log = SkipLog(tmp_path / "run" / ".lazy-skips" / "rank0")
    samples = split.train + split.val
    dataset = ImageDataset(samples, transform=size_of, skip_log=log)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = [(images.tolist(), labels.tolist()) for images, labels in loader]  # warnings stay in the workers
    recorded = log.read()
    assert [(s.path.name, s.reason.split(":")[0]) for s in recorded] == [
        ("cut.jpg", "truncated/corrupt"), ("text.png", "not an image (cannot identify)")]
    assert len(list(log.directory.glob("*.tsv"))) >= 1  # written by the worker processes
    # a substitute depends on the index only: a fresh dataset, read in another order, returns the same
    fresh = ImageDataset(samples, transform=size_of)
    with pytest.warns(BadImageWarning):
        again = [fresh[i] for i in reversed(range(len(fresh)))][::-1]
    flat = [(size, label) for images, labels in batches for size, label in zip(images, labels)]
    assert flat == [(item[0].tolist(), item[1]) for item in again]
    log.clear()
    assert log.read() == [] and not (tmp_path / "run" / ".lazy-skips").exists()


def test_skip_log_survives_a_line_cut_short(tmp_path):
    log = lazy_skip_log(tmp_path / "run", 1)
    log.record(Path("a\tb.png"), "not an image (cannot identify)")
    with open(log.directory / "999.tsv", "ab") as handle:
        handle.write(b"/data/x.png\tempty file\n/data/cut-sh")  # a crash mid-line
    assert [(str(s.path), s.reason) for s in log.read()] == [
        ("/data/x.png", "empty file"), ("a b.png", "not an image (cannot identify)")]
    write_skipped(log.read(), tmp_path / "skipped.txt")
    assert read_skipped(tmp_path / "skipped.txt") == log.read()


# --------------------------------------------------------------------------- whole runs


def scan_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("scan: ")]
    assert len(lines) == 1, stdout[-3000:]
    return lines[0]


def test_two_process_run_decodes_each_file_once(tmp_path, cache):
    data = backdate(write_demo_folder(tmp_path / "data", train_per_class=4, val_per_class=2))
    out = tmp_path / "run"
    result = run_finetune("train", "--data", str(data), *E2E, "--num-processes", "2", "--out", str(out),
                          timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = scan_line(result.stdout)
    assert line.startswith("scan: 60 images, 60 decoded, 0 from cache"), line
    assert "2 processes: 60 decoded, 60 from cache in total" in line, line
    assert json.loads((out / "model.json").read_text())["world_size"] == 2
    again = scan_folder(data)  # and the next run, eval or predict: nothing to decode
    assert (again.scan.decoded, again.scan.cached) == (0, 60)


def test_lazy_run_lists_files_that_failed_to_load(tmp_path, cache):
    data = write_demo_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    (data / "train" / "bag" / "broken.png").write_text("not an image")
    whole = sorted((data / "val" / "coat").glob("*.png"))[0].read_bytes()
    (data / "val" / "coat" / "cut.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "run"
    result = run_finetune("train", "--data", str(data), *E2E, "--check-images", "lazy", "--num-workers", "2",
                          "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"scan: 42 images, 0 decoded, 0 from cache .*check_images lazy", scan_line(result.stdout))
    assert "check_images lazy: 2 image(s) failed to load during training" in result.stdout, result.stdout[-2000:]
    skipped = read_skipped(out / "skipped.txt")
    assert [(s.path.relative_to(data).as_posix(), s.reason) for s in skipped] == [
        ("train/bag/broken.png", "not an image (cannot identify)"),
        ("val/coat/cut.png", check_file(data / "val" / "coat" / "cut.png", decode=True))]
    assert skipped[1].reason.startswith("truncated/corrupt")
    meta = json.loads((out / "model.json").read_text())
    assert meta["data"]["skipped_during_training"] == 2 and meta["data"]["skipped_images"] == 2
    assert not (out / ".lazy-skips").exists()


RESUME = ["--model", "mobilenetv2_100", "--weights", "offline", "--img-size", "32", "--epochs", "2",
          "--strategy", "full", "--memory-format", "contiguous", "--no-progress", "--batch-size", "32",
          "--check-images", "lazy", "--checkpoint-every", "1"]


def lazy_resume_data(root: Path) -> tuple[Path, list[str]]:
    """82 train / 21 val images of which 2 train and 1 val file fail to load; the broken files' names."""
    data = write_demo_folder(root, train_per_class=8, val_per_class=2)
    (data / "train" / "bag" / "text.png").write_text("not an image")
    whole = sorted((data / "train" / "coat" / "").glob("*.png"))[0].read_bytes()
    (data / "train" / "coat" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (data / "val" / "dress" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return data, ["train/bag/text.png", "train/coat/cut.png", "val/dress/garbage.png"]


def without_timing(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "train_images_per_s")}
            for row in csv.DictReader((run_dir / "log.csv").open())]


def test_lazy_run_resumes_exactly_after_sigkill(tmp_path):
    # --strategy full: every epoch reads the images through the loader, so the killed and the resumed
    # process both meet the broken files; 3 updates per epoch, killed after update 4 (in epoch 2)
    from safetensors.torch import load_file

    data, broken = lazy_resume_data(tmp_path / "data")
    reference, out = tmp_path / "reference", tmp_path / "run"
    result = run_finetune("train", "--data", str(data), *RESUME, "--out", str(reference), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check_images lazy: 3 image(s) failed to load during training" in result.stdout, result.stdout[-2000:]

    job = start_finetune("train", "--data", str(data), *RESUME, "--out", str(out))
    try:
        wait_for_checkpoint(job, out, 4, timeout=400)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL and 4 <= latest_updates(out) < 6, latest_updates(out)
    assert (out / ".lazy-skips").is_dir()  # the killed process's records, kept for the resume
    resumed = run_finetune("train", str(out / "recipe.yaml"), "--resume", "--no-progress", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout, resumed.stdout[-2000:]

    final_a = load_file(find_checkpoint(reference) / "model.safetensors")
    final_b = load_file(find_checkpoint(out) / "model.safetensors")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    best_a, best_b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert without_timing(reference) == without_timing(out)
    for run_dir in (reference, out):
        listed = [s.path.relative_to(data).as_posix() for s in read_skipped(run_dir / "skipped.txt")]
        assert listed == broken, (run_dir, listed)  # every broken file, each once
        meta = json.loads((run_dir / "model.json").read_text())
        assert meta["data"]["skipped_during_training"] == 3 and meta["status"] == "complete"
        assert not (run_dir / ".lazy-skips").exists()
