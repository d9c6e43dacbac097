"""The fixed choices of recipe fields (a value outside them is rejected with a did-you-mean hint).

>>> "finetune" in STRATEGIES, AUTO_AUGMENT["randaugment"]
(True, 'rand-m9-mstd0.5-inc1')
>>> check_images_value("yes"), check_images_value("LAZY"), check_images_value("lazzy")
(True, 'lazy', None)
"""

from __future__ import annotations

__all__ = ["AUTO_AUGMENT", "BN_MODES", "MEMORY_FORMATS", "MIXED_PRECISION", "MONITORS", "OBJECTIVES", "STRATEGIES", "TASKS",
           "TRACKERS", "CHECK_IMAGES", "SAMPLERS", "check_images_value"]

STRATEGIES = ("auto", "probe", "full", "finetune", "gradual")
TASKS = ("train", "convert")
MIXED_PRECISION = ("no", "bf16", "fp16")
BN_MODES = ("auto", "frozen", "train")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
OBJECTIVES = ("accuracy", "latency")
# Validation metrics `optim.monitor` selects the best epoch and stops early by (finetune/train/stopping.py)
MONITORS = ("val_top1", "val_loss", "val_macro_f1")
# Experiment trackers of `runtime.report_to`: accelerate's `LoggerType` names (besides `all`); the
# config layer does not import accelerate, a test keeps the two lists equal.
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
# Named auto-augment policies → timm's policy strings. TrivialAugment (Müller & Hutter 2021) is one
# random op per image at a uniformly drawn magnitude: timm's RandAugment with n=1 and mstd>100.
AUTO_AUGMENT = {"none": None, "randaugment": "rand-m9-mstd0.5-inc1", "trivialaugment": "rand-n1-m10-mstd101-inc1",
                "augmix": "augmix-m5-w3-d1", "autoaugment": "original"}
# `data.check_images`: true decodes every image once before training (verdicts cached, see
# finetune/data/scan_cache.py), lazy decodes nothing up front and skips what fails in the loader,
# false decodes nothing and skips nothing beyond missing/empty files.
CHECK_IMAGES = ("true", "false", "lazy")
# `data.sampler`: shuffle = a seeded permutation per epoch; balanced = draws with replacement ∝ 1/count(class)
# (finetune/data/sampling.py BalancedSampler), unlike `data.class_balanced`, which weights the loss.
SAMPLERS = ("shuffle", "balanced")


def check_images_value(value: object) -> bool | str | None:
    """``data.check_images`` as stored: ``True``, ``False`` or ``"lazy"``; ``None`` when ``value`` is none of them.

    Booleans and their spellings (``yes``/``no``, ``on``/``off``, ``1``/``0``) stay booleans, so recipes
    written before ``lazy`` existed read as they did.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    return "lazy" if text == "lazy" else None
