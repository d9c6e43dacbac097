"""Image data: folder scanning and checks, decoding, datasets and transforms, the seeded sampler,
and the embedded demo data set.

>>> from finetune.data import scan_folder, build_transform  # doctest: +SKIP
"""

from finetune.data.folder import *  # noqa: F401,F403
from finetune.data.folder import (FolderSplit, ImageDataset, Sample, Skipped, build_transform,  # noqa: F401
                                  class_weights, draft_size, eval_loader, is_unlabelled_folder, list_images,
                                  load_rgb, scan_folder, scan_labelled, scan_unlabelled, to_rgb, write_skipped)
