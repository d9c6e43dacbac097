"""Running a model on an example input: its device, the input moved there, one eval-mode forward,
the whole-model MAC count (:func:`count_macs`) and the spatial sizes each conv is called at.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
>>> count_macs(net, torch.randn(1, 3, 4, 4)), count_macs(net, {"input": torch.randn(2, 3, 4, 4)})
(4480, 4480)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ExampleInput = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]

__all__ = ["ExampleInput", "count_macs", "default_example", "model_device", "record_calls", "to_device"]


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the first parameter (or buffer); ``None`` for a module with neither.

    >>> model_device(nn.Conv2d(3, 8, 3)), model_device(nn.ReLU())
    (device(type='cpu'), None)
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def to_device(example: ExampleInput, device: torch.device | None) -> ExampleInput:
    if device is None:
        return example
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    return type(example)(v.to(device) if isinstance(v, torch.Tensor) else v for v in example)  # type: ignore[call-arg]


def _batch_size(example: ExampleInput) -> int:
    values: Iterable[Any]
    if isinstance(example, torch.Tensor):
        values = [example]
    elif isinstance(example, Mapping):
        values = example.values()
    else:
        values = example
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _run(model: nn.Module, example: ExampleInput) -> None:
    """One eval-mode, no-grad forward (BN running stats untouched); training flags restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, torch.Tensor):
                model(example)
            elif isinstance(example, Mapping):
                model(**example)
            else:
                model(*example)
    finally:
        for m, flag in flags.items():
            m.training = flag


def count_macs(model: nn.Module, example_input: ExampleInput) -> int:
    """Whole-model multiply-accumulates per image, counted by ``torch.utils.flop_counter``
    (FLOPs / 2, bias adds and elementwise ops not counted) in eval mode on ``example_input``
    (a tensor, a tuple of positional inputs, or a dict of keyword inputs).

    >>> import torch
    >>> from torch import nn
    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 4, 4))   # 8·3·9 per pixel, 16 pixels
    3456
    """
    example = to_device(example_input, model_device(model))
    counter = FlopCounterMode(display=False)
    with counter:
        _run(model, example)
    return int(counter.get_total_flops()) // 2 // _batch_size(example)


def default_example(model: nn.Module) -> torch.Tensor | None:
    """A zero batch at a timm model's ``pretrained_cfg['input_size']``, when it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if not size or len(size) != 3:
        return None
    return torch.zeros(1, *[int(s) for s in size])


def record_calls(model: nn.Module, convs: Mapping[str, nn.Conv2d], example: ExampleInput,
                  shapes: dict[str, list[tuple[int, ...]]] | None = None) -> dict[str, list[tuple[int, int]]]:
    """(input pixels, output pixels) per image for each call of each conv, by forward hooks;
    when ``shapes`` is given, each call's full input shape is appended to ``shapes[name]``."""
    calls: dict[str, list[tuple[int, int]]] = {name: [] for name in convs}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return  # called with keyword input only: its MACs stay unknown (0)
            x = args[0]
            calls[name].append((int(x.shape[-2] * x.shape[-1]), int(output.shape[-2] * output.shape[-1])))
            if shapes is not None:
                shapes.setdefault(name, []).append(tuple(int(d) for d in x.shape))
        return hook

    handles = [conv.register_forward_hook(hook_for(name)) for name, conv in convs.items()]
    try:
        _run(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return calls
