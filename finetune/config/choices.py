"""The fixed choices of recipe fields (a value outside them is rejected with a did-you-mean hint).

>>> "finetune" in STRATEGIES, AUTO_AUGMENT["randaugment"]
(True, 'rand-m9-mstd0.5-inc1')
"""

from __future__ import annotations

__all__ = ["AUTO_AUGMENT", "BN_MODES", "MEMORY_FORMATS", "MIXED_PRECISION", "OBJECTIVES", "STRATEGIES", "TASKS",
           "TRACKERS"]

STRATEGIES = ("auto", "probe", "full", "finetune", "gradual")
TASKS = ("train", "convert")
MIXED_PRECISION = ("no", "bf16", "fp16")
BN_MODES = ("auto", "frozen", "train")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
OBJECTIVES = ("accuracy", "latency")
# Experiment trackers of `runtime.report_to`: accelerate's `LoggerType` names (besides `all`); the
# config layer does not import accelerate, a test keeps the two lists equal.
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
# Named auto-augment policies → timm's policy strings. TrivialAugment (Müller & Hutter 2021) is one
# random op per image at a uniformly drawn magnitude: timm's RandAugment with n=1 and mstd>100.
AUTO_AUGMENT = {"none": None, "randaugment": "rand-m9-mstd0.5-inc1", "trivialaugment": "rand-n1-m10-mstd101-inc1",
                "augmix": "augmix-m5-w3-d1", "autoaugment": "original"}
