"""Builder references: how a run directory names a model that is not a timm model.

A *builder ref* is a string ``"package.module:callable"`` (``"torchvision.models:resnet18"``,
``"my_project.nets:make_net"``; the part after ``:`` may be dotted, ``"pkg.mod:Class.build"``)
plus JSON-able keyword arguments (``{"num_classes": 10}``). ``callable(**kwargs)`` must return
a fresh ``torch.nn.Module`` of the architecture; a converted run stores the ref, the kwargs and
the separable plan in ``model.json``, so reloading it calls the builder, re-applies the plan and
loads ``model.safetensors`` -- no SVD, no pickle.

The module is imported the way ``python -m`` would find it: installed packages first, then the
current directory (appended to ``sys.path`` only when the first import fails, so it never
shadows an installed package; the same convention as ``uvicorn``/``gunicorn`` app refs).

Security: a builder ref imports and runs code, exactly like a pip-installed package or a
``pickle``. It is only ever taken from the user's own run directories (``model.json``) and
command-line flags, never from downloaded weights files (those stay safetensors or
``torch.load(weights_only=True)``). Load run directories you trust, as you would run their
code. Refs into the Python standard library (``os:system``, ``builtins:exec``...) are refused
outright, since no model builder lives there; that is a tripwire, not a sandbox.

>>> ref = builder_ref(build_model)                       # any importable function
>>> ref
'finetune.models.builders:build_model'
>>> resolve_builder(ref) is build_model
True
>>> net = build_model("torch.nn:Conv2d", {"in_channels": 3, "out_channels": 8, "kernel_size": 3})
>>> type(net).__name__
'Conv2d'
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from finetune.errors import FinetuneError
from finetune.models.state import load_checked, read_state_dict

__all__ = [
    "BUILDER_FORMAT",
    "build_model",
    "builder_ref",
    "check_builder_kwargs",
    "is_builder_ref",
    "load_weights_into",
    "parse_builder_ref",
    "resolve_builder",
]

BUILDER_FORMAT = "package.module:callable"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_REF = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT}(?:\.{_IDENT})*)$")
_FIX = f"a builder ref is `{BUILDER_FORMAT}`, e.g. `torchvision.models:resnet18`"


def is_builder_ref(text: object) -> bool:
    """True when ``text`` has the shape of a builder ref (``module.path:attr``); imports nothing.

    Neither timm names (``resnet18``, ``hf-hub:org/name``) nor paths look like one.

    >>> is_builder_ref("torchvision.models:resnet18"), is_builder_ref("resnet18"), is_builder_ref("C:\\\\runs")
    (True, False, False)
    """
    return isinstance(text, str) and _REF.match(text) is not None


def parse_builder_ref(ref: str) -> tuple[str, str]:
    """``"pkg.mod:attr.path"`` -> ``("pkg.mod", "attr.path")``, or a one-line error.

    >>> parse_builder_ref("torchvision.models:resnet18")
    ('torchvision.models', 'resnet18')
    """
    if not isinstance(ref, str):
        raise FinetuneError(f"builder `{ref!r}` is a {type(ref).__name__}, not a string; {_FIX}")
    match = _REF.match(ref.strip())
    if match is None:
        raise FinetuneError(f"builder `{ref}` is not `{BUILDER_FORMAT}`; {_FIX} "
                            "(module path, one colon, then the function or class)")
    module, attr = match.groups()
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise FinetuneError(f"builder `{ref}` points into the Python standard library (`{top}`), which builds no "
                            f"models; {_FIX} or a function in your own package")
    return module, attr


def _import(module: str, ref: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        cwd = os.getcwd()
        # the ref's own module (or a parent package) is missing: try the current directory, like `python -m`
        if (module == missing or module.startswith(missing + ".")) and cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)
            importlib.invalidate_caches()
            try:
                return importlib.import_module(module)
            except ModuleNotFoundError as again:
                exc, missing = again, again.name or ""
        if module == missing or module.startswith(missing + "."):
            raise FinetuneError(
                f"builder `{ref}`: no module named `{missing}` (searched the installed packages and `{cwd}`); "
                "install the package that defines it, run from the folder that holds it, or set PYTHONPATH"
            ) from None
        raise FinetuneError(f"builder `{ref}`: importing `{module}` needs `{missing}`, which is not installed; "
                            f"install it (`pip install {missing.split('.')[0]}`)") from None
    except Exception as exc:  # the user's module itself raised while importing
        raise FinetuneError(f"builder `{ref}`: importing `{module}` raised {type(exc).__name__}: {exc}; "
                            "fix that module (import it in Python to see the traceback)") from exc


def resolve_builder(ref: str) -> Callable[..., Any]:
    """The callable a builder ref names (imports its module), or a one-line :class:`FinetuneError`.

    >>> resolve_builder("torch.nn:Linear").__name__
    'Linear'
    """
    module_name, attr = parse_builder_ref(ref)
    obj = _import(module_name, ref)
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ".".join([module_name, *attr.split(".")[:i]])
            raise FinetuneError(f"builder `{ref}`: `{where}` has no attribute `{part}`; check the name after "
                                f"the colon ({_FIX})") from None
    if not callable(obj):
        raise FinetuneError(f"builder `{ref}` is a {type(obj).__name__}, not a function or class; point it at the "
                            "function (or nn.Module class) that builds the model")
    return obj


def check_builder_kwargs(kwargs: Mapping[str, Any] | None, ref: str = "") -> dict[str, Any]:
    """``kwargs`` as a plain dict of JSON values (they are stored in ``model.json``), or an error."""
    if kwargs is None:
        return {}
    what = f"builder kwargs of `{ref}`" if ref else "builder kwargs"
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise FinetuneError(f"{what} must be a JSON object with string keys, e.g. {{\"num_classes\": 10}}; "
                            f"got {kwargs!r}")
    try:
        return json.loads(json.dumps(dict(kwargs), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise FinetuneError(f"{what} must be JSON values (numbers, strings, lists, dicts) because they are stored "
                            f"in model.json ({exc}); build other objects inside the builder function") from None


def build_model(ref: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the builder: ``resolve_builder(ref)(**kwargs)``, checked to return an ``nn.Module``."""
    fn = resolve_builder(ref)
    kwargs = check_builder_kwargs(kwargs, ref)
    try:
        model = fn(**kwargs)
    except Exception as exc:
        shown = json.dumps(kwargs) if kwargs else "no kwargs"
        raise FinetuneError(f"builder `{ref}` with {shown} raised {type(exc).__name__}: {exc}; check the builder "
                            "kwargs (--builder-kwargs)") from exc
    if not isinstance(model, nn.Module):
        raise FinetuneError(f"builder `{ref}` returned a {type(model).__name__}, not a torch.nn.Module; point it at a "
                            "function that returns the model")
    return model


def builder_ref(fn: Callable[..., Any] | str) -> str:
    """The ref ``"module:qualname"`` of an importable function or class (a string is checked and returned).

    Lambdas, functions defined inside other functions, ``functools.partial`` objects and anything
    defined in ``__main__`` (a script or notebook) cannot be imported back by another process:
    they are refused with a message saying to define the builder in an importable module.
    """
    if isinstance(fn, str):
        parse_builder_ref(fn)
        return fn.strip()
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    fix = ("define the builder as a top-level function in an importable module (e.g. my_project/nets.py: "
           "`def make_net(num_classes): ...`) and pass it, or its ref `my_project.nets:make_net`, with JSON "
           "builder_kwargs")
    if not callable(fn) or not module or not qualname:
        raise FinetuneError(f"cannot name `{name}` as a builder (a {type(fn).__name__} has no importable name); {fix}")
    if "<lambda>" in qualname:
        raise FinetuneError(f"a lambda cannot be a builder: it has no importable name; {fix}")
    if "<locals>" in qualname:
        raise FinetuneError(f"builder `{qualname}` is defined inside another function, so it cannot be imported "
                            f"again; {fix}")
    if module == "__main__" or module.startswith("__mp_main__") or module.startswith("<"):
        raise FinetuneError(f"builder `{qualname}` is defined in `__main__` (a script or notebook), which another "
                            f"process cannot import; {fix}")
    ref = f"{module}:{qualname}"
    if resolve_builder(ref) is not fn:
        raise FinetuneError(f"`{ref}` does not import back to the same object (was it redefined or wrapped?); {fix}")
    return ref


def load_weights_into(model: nn.Module, path: str | os.PathLike, what: str) -> str:
    """Load a user's ``.safetensors`` / ``.pth`` state dict into ``model`` (strictly); returns a description.

    Read and checked by :mod:`finetune.models.state` like every other weights file: ``.pth``
    through ``torch.load(weights_only=True)`` (pickled code is refused), ``module.`` prefixes
    (DataParallel) stripped, missing BatchNorm ``num_batches_tracked`` counters tolerated.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        state_what = "is a directory" if path.is_dir() else "does not exist"
        raise FinetuneError(f"weights file `{path}` {state_what}; pass the dense model's .safetensors/.pth state dict")
    load_checked(model, read_state_dict(path), f"weights file `{path}`", what,
                 fix="build the same architecture it was saved from (check the builder kwargs, e.g. num_classes)")
    return f"weights from file `{path}`"
