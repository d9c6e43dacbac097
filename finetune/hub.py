"""A run directory in timm's / the Hugging Face Hub's model-folder format, its model card, and upload.

A training run of a timm architecture gets a ``config.json`` beside ``model.safetensors``, written
by timm's own :func:`timm.models.save_config_for_hf` (architecture, ``num_classes``,
``label_names``, and a ``pretrained_cfg`` with the run's mean/std, input size, interpolation and
crop), so the run folder *is* a timm model folder::

    import timm
    model = timm.create_model("local-dir:runs/photos", pretrained=True)   # the trained model and its labels

and ``finetune push RUN --repo-id me/name`` uploads it (``huggingface_hub``) with ``README.md``,
the model card :func:`write_model_card` writes. Converted (separable) and builder models are not
timm architectures: their folder has no ``config.json`` (``model.json`` says how to load them).
What timm's format cannot hold (the recipe, the split, metrics, the separable plan) stays in
``model.json``.

>>> from finetune.hub import is_timm_native
>>> is_timm_native({"architecture": "mobilenetv2_100"}), is_timm_native({"architecture": "x", "builder": "b"})
(True, False)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from finetune.errors import FinetuneError, one_line
from finetune.io import atomic_path, write_text
from finetune.rundir import RUN_CARD, RUN_META, RUN_METRICS, RUN_TIMM_CONFIG, RUN_WEIGHTS, read_run_meta
# pretrained_cfg keys of ours that timm's PretrainedCfg does not know (they stay in model.json)
_OUR_CFG_KEYS = ("weights_source",)


def is_timm_native(meta: Mapping[str, Any]) -> bool:
    """Whether ``timm.create_model(meta["architecture"])`` rebuilds the run's network."""
    return not meta.get("builder") and not meta.get("separable_plan")


def write_timm_config(run_dir: str | os.PathLike, model: torch.nn.Module, meta: Mapping[str, Any]) -> bool:
    """Write ``RUN/config.json`` with timm's helper, for a timm architecture; whether it was written."""
    from timm.models._hub import save_config_for_hf  # timm 1.0.31 keeps it out of timm.models

    if not is_timm_native(meta) or not isinstance(getattr(model, "pretrained_cfg", None), dict):
        return False
    data_config = dict(meta["data_config"])
    data_config["input_size"] = tuple(data_config["input_size"])
    original = model.pretrained_cfg
    model.pretrained_cfg = {k: v for k, v in original.items() if k not in _OUR_CFG_KEYS and k != "label_names"}
    model.pretrained_cfg["architecture"] = meta["architecture"]
    try:
        with atomic_path(Path(run_dir) / RUN_TIMM_CONFIG) as tmp:
            save_config_for_hf(model, str(tmp), model_config={"label_names": list(meta["classes"])},
                               data_config={k: data_config[k] for k in ("input_size", "interpolation", "mean",
                                                                        "std", "crop_pct", "crop_mode")
                                            if k in data_config})
    finally:
        model.pretrained_cfg = original
    return True


def _metrics_lines(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    data = meta.get("data", {})
    split = f"the validation split ({metrics.get('num_samples', data.get('val_images', '?'))} images)"
    rows = [("top-1", metrics.get("top1")), ("top-5", metrics.get("top5")), ("macro F1", metrics.get("macro_f1")),
            ("balanced accuracy", metrics.get("balanced_accuracy")), ("ECE (15 bins)", metrics.get("ece")),
            ("loss", metrics.get("loss"))]
    lines = [f"Measured by `finetune train` on {split} after training, with the weights in `model.safetensors` "
             f"(best epoch {metrics.get('best_epoch')}); re-measure with `finetune eval RUN --data DIR`.", "",
             "| metric | value |", "|---|---|"]
    return lines + [f"| {name} | {value:.4f} |" for name, value in rows if isinstance(value, (int, float))]


def write_model_card(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN/README.md``: a Hub model card (timm's front matter) with the data set summary, the recipe,
    the metrics and their split, intended use, limitations and how the figures were measured."""
    from timm.models._hub import generate_readme

    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    metrics_file = run_dir / RUN_METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    data = meta.get("data", {})
    classes = list(meta["classes"])
    details = {"Model type": "Image classification", "Architecture": meta["architecture"],
               "Classes": f"{len(classes)}: {', '.join(classes[:20])}{' …' if len(classes) > 20 else ''}",
               "Started from": meta.get("started_from") or meta.get("weights_source") or "unknown",
               "Data": f"{data.get('train_images', '?')} training / {data.get('val_images', '?')} validation "
                          f"images from an image folder ({data.get('layout', 'one folder per class')})",
               "Trained with": f"finetune-vision {meta.get('versions', {}).get('finetune-vision', '?')}"}
    loader = (f"timm.create_model('local-dir:{run_dir.name}', pretrained=True)" if (run_dir / RUN_TIMM_CONFIG).is_file()
              else f"finetune.load_model('{run_dir.name}')")
    card = {"description": f"`{meta['architecture']}` fine-tuned with finetune-vision on a user's image folder.",
            "details": details, "usage": f"```python\nimport timm, finetune\nmodel = {loader}\n```\n",
            "tags": ["image-classification", "timm", "finetune-vision"]}
    text = generate_readme(card, run_dir.name)
    recipe = json.dumps(meta.get("recipe", {}), indent=2)
    text += "\n## Metrics\n\n" + "\n".join(_metrics_lines(metrics, meta)) + "\n"
    text += ("\n## Intended use and limitations\n\nClassifies images into the classes above, for images like "
             "the training folder's (same kind of camera, framing and classes). It has not been evaluated "
             "outside that folder's validation split: accuracy on other images, other classes or other "
             "conditions is unknown, and the validation split is small when the folder is. Check the "
             "per-class figures (`finetune eval`) before relying on it for any one class.\n")
    text += f"\n## Recipe\n\nRe-run with `finetune train recipe.yaml`.\n\n```json\n{recipe}\n```\n"
    write_text(run_dir / RUN_CARD, text)
    return run_dir / RUN_CARD


def push_run(run_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a run folder to the Hugging Face Hub (weights, ``config.json``, model card, ``model.json``,
    metrics and plots; checkpoints and tracker logs stay local); the repository URL.

    >>> push_run("runs/photos", "me/lite0-photos")                    # doctest: +SKIP
    'https://huggingface.co/me/lite0-photos'
    """
    run_dir = Path(run_dir).expanduser()
    meta = read_run_meta(run_dir)
    if not (run_dir / RUN_WEIGHTS).is_file():
        raise FinetuneError(f"`{run_dir}` has no {RUN_WEIGHTS}; only a finished run can be pushed")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise FinetuneError(f"--repo-id `{repo_id}`: give NAMESPACE/NAME, e.g. me/{meta['architecture']}-photos")
    write_model_card(run_dir)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    allow = [RUN_WEIGHTS, RUN_TIMM_CONFIG, RUN_CARD, RUN_META, RUN_METRICS, "recipe.yaml", "log.csv", "*.png",
             "adapter/*"]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), allow_patterns=allow,
                          commit_message=f"finetune-vision run {run_dir.name}")
    except Exception as error:  # noqa: BLE001 -- offline, no token, no permission: one line, the cause named
        raise FinetuneError(f"push to the Hub repository `{repo_id}` failed ({type(error).__name__}: "
                            f"{one_line(error, 160)}); check the network and `huggingface-cli login` "
                            "(or HF_TOKEN)") from None
    return f"https://huggingface.co/{repo_id}"
