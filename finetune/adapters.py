"""LoRA (parameter-efficient) fine-tuning of timm CNN classifiers through peft.

LoRA adds a trainable low-rank update ``B @ A`` (rank ``r``, scale ``alpha / r``) next to chosen
layers and freezes everything else. For MobileNet / EfficientNet the chosen layers are the dense
1×1 (pointwise, expand, projection, head) convs, which hold almost all the weights; depthwise
convs are tiny and peft cannot adapt them. The new classifier head and every BatchNorm are
trained in full (peft ``modules_to_save``) and saved with the adapter, so an adapter is a
~10× smaller file than the model, and :func:`merge_lora` folds it back into a plain timm model.

>>> import torch
>>> from finetune.models import create_model
>>> from finetune.adapters import apply_lora, describe_trainable, merge_lora
>>> model, _ = create_model("mobilenetv2_100", weights="none", num_classes=10)
>>> peft_model = apply_lora(model, r=8)
>>> describe_trainable(peft_model)
'trainable 178,506 of 2,415,188 parameters (7.4%)'
>>> plain = merge_lora(peft_model)   # plain timm EfficientNet, same state_dict keys as before
>>> plain(torch.randn(1, 3, 64, 64)).shape
torch.Size([1, 10])
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open
from torch import nn

from finetune.errors import FinetuneError

__all__ = [
    "apply_lora",
    "describe_trainable",
    "load_adapter",
    "lora_target_modules",
    "merge_lora",
    "parameter_counts",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# Which modules
# --------------------------------------------------------------------------------------------


def _architecture(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def _head_names(model: nn.Module) -> list[str]:
    """Full names of the classifier head(s); ``[]`` for a headless (``num_classes=0``) model.

    timm names them in ``pretrained_cfg["classifier"]`` (a name or a tuple of names); otherwise
    the module returned by ``get_classifier()`` is looked up by identity.
    """
    modules = dict(model.named_modules())
    cfg_names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = [cfg_names] if isinstance(cfg_names, str) else list(cfg_names or ())
    heads = [name for name in names if name in modules]
    if not heads and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        heads = [name for name, module in modules.items() if module is head and name]
    return [name for name in heads if not isinstance(modules[name], nn.Identity)]


def _unsupported(module: nn.Module) -> str | None:
    """Why peft's LoRA cannot adapt ``module`` (``None`` when it can)."""
    if isinstance(module, nn.Conv2d):
        if module.groups > 1:
            return f"a depthwise/grouped conv (groups={module.groups})"
        if type(module) is not nn.Conv2d and module.kernel_size != (1, 1):
            # e.g. timm's Conv2dSame pads in forward(); peft's lora_A would not, and shapes differ
            kh, kw = module.kernel_size
            return f"a {type(module).__name__} {kh}×{kw} conv with its own padding"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"a {type(module).__name__} (LoRA supports only nn.Conv2d with groups=1 and nn.Linear)"


def _adapter_is_small(module: nn.Module, r: int, max_share: float = 0.25) -> bool:
    """A rank-``r`` adapter adds at most ``max_share`` of the layer's own weights."""
    n_in, n_out = (module.in_features, module.out_features) if isinstance(module, nn.Linear) else \
        (module.in_channels, module.out_channels)
    return r * (n_in + n_out) <= max_share * n_in * n_out


def lora_target_modules(model: nn.Module, targets: str | Sequence[str] = "auto", r: int = 8) -> list[str]:
    """Full names of the modules LoRA adapts, in model order.

    ``"auto"``: every dense 1×1 conv (``nn.Conv2d`` incl. subclasses such as timm's Conv2dSame,
    ``groups == 1``) and every ``nn.Linear`` except the classifier head, where a rank-``r``
    adapter is parameter-efficient: its ``r·(in + out)`` weights at most a quarter of the layer's
    ``in·out`` (MobileNetV2's thin 16→96 expand conv would get an adapter 58% of its own size);
    never depthwise or k×k convs. Otherwise ``targets`` is a module name or regex, or a list of them (``re.fullmatch``
    against full names); a dense k×k ``nn.Conv2d`` may be named explicitly.

    Raises:
        FinetuneError: a pattern is not a valid regex, matches nothing, or matches a module LoRA
            cannot adapt (depthwise conv, BatchNorm, container, ...) or the head.

    >>> from finetune.models import create_model
    >>> model, _ = create_model("mobilenetv2_100", weights="none", num_classes=10)
    >>> lora_target_modules(model)[:3]      # blocks 0-2 are too thin for a rank-8 adapter to pay
    ['blocks.3.0.conv_pwl', 'blocks.3.1.conv_pw', 'blocks.3.1.conv_pwl']
    >>> lora_target_modules(model, [r"blocks\\.6\\..*conv_pwl?", "conv_head"])
    ['blocks.6.0.conv_pw', 'blocks.6.0.conv_pwl', 'conv_head']
    """
    if isinstance(model, PeftModel):
        raise FinetuneError("the model already has LoRA adapters; pass the plain timm model (or merge_lora first)")
    modules = {name: module for name, module in model.named_modules() if name}
    heads = set(_head_names(model))
    if isinstance(targets, str) and targets == "auto":
        found = [
            name for name, module in modules.items()
            if name not in heads and _unsupported(module) is None
            and (isinstance(module, nn.Linear) or module.kernel_size == (1, 1))
            and _adapter_is_small(module, r)
        ]
        if not found:
            raise FinetuneError(
                f"{type(model).__name__} has no dense 1×1 conv or Linear layer besides its head; "
                "pass targets=[...] naming the layers to adapt"
            )
        return found

    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise FinetuneError('targets is empty; pass "auto" or a list of module names / regexes')
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise FinetuneError(f"LoRA target `{pattern}` is not a valid regex ({exc}); fix or escape it") from None
        matches = [name for name in modules if name == pattern or regex.fullmatch(name)]
        if not matches:
            raise FinetuneError(
                f"LoRA target `{pattern}` matches no module of {type(model).__name__}; pass full module "
                "names or regexes matched against them (e.g. `blocks\\..*\\.conv_pwl?`)"
            )
        for name in matches:
            if name in heads:
                raise FinetuneError(
                    f"LoRA target `{pattern}` matches the classifier head `{name}`, which is trained in full; "
                    "leave it out of targets"
                )
            reason = _unsupported(modules[name])
            if reason:
                raise FinetuneError(
                    f"LoRA target `{pattern}` matches `{name}`, {reason}; narrow the pattern to "
                    "dense 1×1 convs / Linear layers (see lora_target_modules(model))"
                )
        chosen.update(matches)
    return [name for name in modules if name in chosen]


def _exact_regex(names: Sequence[str]) -> str:
    """One regex matching exactly ``names``: peft matches a *list* of target names by suffix."""
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")$"


# --------------------------------------------------------------------------------------------
# Apply, count
# --------------------------------------------------------------------------------------------


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "auto",
) -> PeftModel:
    """Wrap ``model`` (in place) in a peft LoRA model: only LoRA, head and BatchNorm train.

    Args:
        r: LoRA rank.
        alpha: LoRA scale numerator; default ``r`` (update scale ``alpha / r = 1``, so the
            learning rate means the same for every rank).
        dropout: dropout on the LoRA branch's input.
        targets: see :func:`lora_target_modules`.

    The classifier head and all BatchNorms (timm's BatchNormAct2d included) go into peft's
    ``modules_to_save``: trainable copies, saved with the adapter. A fresh LoRA has ``B = 0``,
    so the wrapped model computes exactly what ``model`` did.

    >>> from finetune.models import create_model
    >>> model, _ = create_model("tf_efficientnet_lite0", weights="none", num_classes=10)
    >>> apply_lora(model, r=4, targets=[r".*conv_pwl"]).peft_config["default"].r
    4
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise FinetuneError(f"LoRA rank r={r!r} is invalid; pass a positive integer such as 8")
    if not 0.0 <= dropout < 1.0:
        raise FinetuneError(f"LoRA dropout={dropout!r} is invalid; pass a value in [0, 1)")
    target_names = lora_target_modules(model, targets, r=r)
    to_save = _head_names(model) + [
        name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    config = LoraConfig(
        r=r,
        lora_alpha=r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=_exact_regex(target_names),
        modules_to_save=to_save or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    # get_peft_model overwrites base_model_name_or_path with model.name_or_path (absent in timm)
    peft_model.peft_config["default"].base_model_name_or_path = _architecture(model)
    # peft matches modules_to_save by plain str.endswith: make sure it wrapped exactly ours
    wrapped = {
        name.removeprefix(_PEFT_PREFIX) for name, module in peft_model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    }
    if wrapped != set(to_save):
        raise RuntimeError(f"peft wrapped {sorted(wrapped ^ set(to_save))} unexpectedly for modules_to_save")
    return peft_model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor once.

    For a PeftModel this is peft's ``get_nb_trainable_parameters()``: the total includes the
    LoRA weights and the frozen originals kept next to the trainable head / BN copies.

    >>> parameter_counts(nn.Linear(3, 2))
    (8, 8)
    """
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_trainable(model: nn.Module) -> str:
    """One line: ``"trainable 12,345 of 2,431,828 parameters (0.5%)"``.

    >>> describe_trainable(nn.Linear(999, 1000))
    'trainable 1,000,000 of 1,000,000 parameters (100.0%)'
    """
    trainable, total = parameter_counts(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.1f}%)"


# --------------------------------------------------------------------------------------------
# Save, load, merge
# --------------------------------------------------------------------------------------------


def _require_peft(model: nn.Module, what: str) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise FinetuneError(f"{what} needs a LoRA model from apply_lora/load_adapter, got {type(model).__name__}")
    return model


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike) -> Path:
    """Write the adapter in peft's format (adapter_model.safetensors + adapter_config.json).

    The file holds the LoRA weights plus the head and BatchNorm copies (with running stats).
    peft also writes a README.md model card. Returns the directory.
    """
    peft_model = _require_peft(peft_model, "save_adapter")
    directory = Path(directory).expanduser()
    # save_embedding_layers="auto" would look base_model_name_or_path up on the Hugging Face Hub
    peft_model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    return directory


def _check_adapter_fits(base_model: nn.Module, directory: Path, config: dict) -> None:
    """One-line errors for an adapter saved from another architecture / head size."""
    saved_arch, arch = config.get("base_model_name_or_path"), _architecture(base_model)
    if saved_arch and arch and saved_arch != arch:
        raise FinetuneError(
            f"the adapter in `{directory}` was trained on `{saved_arch}`, not `{arch}`; "
            f"load it onto load_model(\"{saved_arch}\", ...)"
        )
    state = base_model.state_dict()
    modules = dict(base_model.named_modules())
    with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as file:
        for key in file.keys():
            name = key.removeprefix(_PEFT_PREFIX)
            if ".lora_" in name:
                module_name = name.split(".lora_")[0]
                if module_name not in modules:
                    raise FinetuneError(
                        f"the adapter in `{directory}` adapts `{module_name}`, which the base model lacks; "
                        "load it onto the architecture it was trained on"
                    )
                continue
            shape = tuple(file.get_slice(key).get_shape())
            if name not in state or tuple(state[name].shape) != shape:
                found = tuple(state[name].shape) if name in state else "missing"
                raise FinetuneError(
                    f"the adapter in `{directory}` has `{name}` of shape {shape}, the base model {found}; "
                    "create the base model with the same architecture and num_classes"
                )


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """Put a saved adapter onto ``base_model`` (in place), a fresh model of the same architecture.

    ``is_trainable=False`` (default) loads it frozen for inference; ``True`` to train further.

    >>> import tempfile
    >>> from finetune.models import create_model
    >>> model, _ = create_model("mobilenetv2_100", weights="none", num_classes=10)
    >>> folder = save_adapter(apply_lora(model), tempfile.mkdtemp())
    >>> base, _ = create_model("mobilenetv2_100", weights="none", num_classes=10)
    >>> type(load_adapter(base, folder)).__name__
    'PeftModel'
    """
    if isinstance(base_model, PeftModel):
        raise FinetuneError("the base model already has LoRA adapters; pass a fresh model from load_model")
    directory = Path(directory).expanduser()
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise FinetuneError(
            f"`{directory}` holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); "
            "pass a folder written by save_adapter"
        )
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"`{directory / ADAPTER_CONFIG}` is not valid JSON ({exc}); save it again") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise FinetuneError(f"`{directory / ADAPTER_CONFIG}` is not a LoRA adapter config; pass a save_adapter folder")
    _check_adapter_fits(base_model, directory, config)
    try:
        return PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"the adapter in `{directory}` does not fit the base model ({first_line})") from None


def merge_lora(peft_model: PeftModel) -> nn.Module:
    """Fold LoRA into the base weights and return the plain timm model (consumes ``peft_model``).

    The trained head / BatchNorm copies replace the originals, so the state_dict keys equal those
    of ``timm.create_model(arch, num_classes=...)``; all parameters get ``requires_grad=True``
    again, as in any fresh model. Deep-copy the PeftModel first to keep the adapter.
    """
    peft_model = _require_peft(peft_model, "merge_lora")
    merged = peft_model.merge_and_unload()
    leftovers = [name for name, module in merged.named_modules()
                 if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))]
    if leftovers:
        raise RuntimeError(f"merge_and_unload left peft wrappers in {leftovers[:3]}")
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged
