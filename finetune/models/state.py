"""State dicts read from users' files and checked against a model: the one place that decides
whether a file's weights fit an architecture (offline packages, ``--weights FILE``, builder
weights, run directories all go through :func:`check_state_dict`).

>>> import torch
>>> ref = torch.nn.Linear(3, 2).state_dict()
>>> sorted(check_state_dict(dict(ref), ref, "weights", "a Linear(3, 2)"))
['bias', 'weight']
>>> check_state_dict({"weight": torch.zeros(2, 4)}, ref, "weights file `w.pt`", "a Linear(3, 2)")
Traceback (most recent call last):
...
finetune.errors.FinetuneError: weights file `w.pt` does not match a Linear(3, 2): 1 missing keys (e.g. bias); 1 shape mismatches, file vs model (e.g. weight (2, 4) vs (2, 3)); pass the architecture the file was saved from
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from finetune.errors import FinetuneError
from finetune.io import safe_torch_load

StateDict = dict[str, torch.Tensor]
DEFAULT_FIX = "pass the architecture the file was saved from"


def is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: never compared, zero-filled when a file lacks it."""
    return key.endswith("num_batches_tracked")


def check_state_dict(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str,
                     target: str, fix: str = DEFAULT_FIX) -> StateDict:
    """Every key and shape of ``reference`` must be in ``state`` (nanoGPT ``from_pretrained`` style).

    Returns the state in ``reference`` order, BatchNorm counters copied when present and
    zero-filled when absent, so it loads with ``strict=True``. Otherwise raises one line:
    ``{what} does not match {target}: <what is wrong, with an example key>; {fix}``.
    """
    missing = [k for k in reference if k not in state and not is_counter(k)]
    unexpected = [k for k in state if k not in reference and not is_counter(k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in reference.items()
             if k in state and not is_counter(k) and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        problems = [f"{len(items)} {label} (e.g. {items[0]})" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches, file vs model", wrong)) if items]
        raise FinetuneError(f"{what} does not match {target}: {'; '.join(problems)}; {fix}")
    return {k: (state[k] if k in state else torch.zeros_like(v)) for k, v in reference.items()}


def load_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, target: str,
                 fix: str = DEFAULT_FIX) -> None:
    """:func:`check_state_dict` against ``model``'s own state dict, then load it strictly (no grad)."""
    checked = check_state_dict(state, model.state_dict(), what, target, fix)
    with torch.no_grad():
        model.load_state_dict(checked, strict=True)


def strip_parallel_prefix(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, bool]:
    """Drop the ``module.`` prefix DataParallel/DDP checkpoints put on every key (as timm does);
    returns the state and whether anything changed.

    >>> strip_parallel_prefix({"module.w": 1})
    ({'w': 1}, True)
    """
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}, True
    return dict(state), False


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """A user's ``.safetensors`` or ``.pth`` state dict, ``module.`` prefixes stripped.

    ``.pth`` files go through ``torch.load(weights_only=True)``: a pickle that would run code is
    refused with one line. A checkpoint dict holding ``state_dict`` or ``model`` is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FinetuneError(f"weights file `{path}` {what}; pass a .safetensors/.pth state dict")
    if path.suffix == ".safetensors":
        return strip_parallel_prefix(read_safetensors(path))[0]
    return strip_parallel_prefix(torch_load_state_dict(path))[0]


def read_safetensors(path: Path) -> StateDict:
    """``safetensors.torch.load_file`` on the CPU, with a one-line error for a damaged header."""
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise FinetuneError(f"`{path}` is not a readable safetensors file ({err})") from None


def torch_load_state_dict(path: Path) -> StateDict:
    """A ``.pth`` state dict read with ``weights_only=True`` (``state_dict``/``model`` entries unwrapped)."""
    obj = safe_torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"`{path}` does not hold a state dict of tensors; save `model.state_dict()`")
    return obj
