"""Image data: which files are images (:mod:`~finetune.data.files`), decoding and checking them
(:mod:`~finetune.data.images`), remembering what was checked (:mod:`~finetune.data.scan_cache`),
recording what fails to load during training (:mod:`~finetune.data.skiplog`), class folders and their
train/val split (:mod:`~finetune.data.folder`), CSV/JSON Lines manifests (:mod:`~finetune.data.manifest`), Hugging Face data sets
(:mod:`~finetune.data.hf`), datasets, transforms and loaders (:mod:`~finetune.data.dataset`), the seeded
sampler (:mod:`~finetune.data.sampling`), WebDataset shards -- writing them and their index
(:mod:`~finetune.data.shards`) and streaming them (:mod:`~finetune.data.shard_stream`) -- and the
embedded demo data set (:mod:`~finetune.data.demo`).

>>> from finetune.data import IMAGE_EXTENSIONS, draft_size
>>> ".jpg" in IMAGE_EXTENSIONS, draft_size({"input_size": (3, 96, 96)})
(True, 192)
"""

from __future__ import annotations

from finetune.data.dataset import (BadImageWarning, ImageDataset, PathTable, build_transform, class_weights, draft_size,
                                   eval_loader)
from finetune.data.files import (IMAGE_EXTENSIONS, Skipped, find_images, list_images, merge_skipped, read_skipped,
                                 write_skipped)
from finetune.data.folder import (VAL_DIR_NAMES, FolderSplit, Sample, is_unlabelled_folder, scan_folder, scan_labelled,
                                  scan_unlabelled)
from finetune.data.hf import is_hf_source, scan_hf, scan_hf_labelled
from finetune.data.images import load_rgb, to_rgb
from finetune.data.manifest import manifest_path, read_manifest, scan_manifest, scan_manifest_labelled
from finetune.data.scan_cache import ScanStats, check_paths, decodes
from finetune.data.skiplog import SkipLog, lazy_skip_log

__all__ = [
    "IMAGE_EXTENSIONS",
    "VAL_DIR_NAMES",
    "BadImageWarning",
    "FolderSplit",
    "ImageDataset",
    "PathTable",
    "Sample",
    "ScanStats",
    "SkipLog",
    "Skipped",
    "build_transform",
    "check_paths",
    "class_weights",
    "decodes",
    "draft_size",
    "eval_loader",
    "find_images",
    "is_hf_source",
    "is_unlabelled_folder",
    "lazy_skip_log",
    "list_images",
    "load_rgb",
    "manifest_path",
    "merge_skipped",
    "read_manifest",
    "read_skipped",
    "scan_folder",
    "scan_hf",
    "scan_hf_labelled",
    "scan_labelled",
    "scan_manifest",
    "scan_manifest_labelled",
    "scan_unlabelled",
    "to_rgb",
    "write_skipped",
]
