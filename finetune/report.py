"""``report.html``: one self-contained page per run or evaluation (images inlined, no network, no script).

It shows the metrics, the training curves, the confusion matrix, per-class precision/recall/F1, a
reliability diagram with the ECE, the most confidently wrong images as a gallery of thumbnails
(true and predicted label), the skipped files and the recipe. ``fit`` writes it for the validation
split, ``finetune eval`` for the folder it evaluated, ``finetune report RUN`` for older runs.

Hand-written HTML (no template engine, no JavaScript) because the page must open from a file with
no network and no dependency: every image is a ``data:`` URI.

>>> import torch
>>> html = report_html(title="demo", metrics={"top1": 0.5, "num_samples": 2, "per_class": {}}, classes=["a", "b"],
...                    probs=torch.tensor([[0.9, 0.1], [0.8, 0.2]]), labels=torch.tensor([0, 1]), paths=[])
>>> html.startswith("<!DOCTYPE html>") and "Most confidently wrong" in html
True
"""

from __future__ import annotations

import base64
import html as escape
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from finetune.io import write_text
from finetune.metrics import expected_calibration_error
from finetune.rundir import RUN_REPORT
GALLERY_SIZE = 24
THUMBNAIL_PX = 128

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img.plot{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;width:140px;font-size:.8em}
.gallery img{width:128px;height:128px;object-fit:contain;background:#eee}pre{background:#f6f6f6;padding:1em;
overflow:auto}"""


def _png_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _file_uri(path: Path) -> str | None:
    return _png_uri(path.read_bytes()) if path.is_file() else None


def _thumbnail(path: str | os.PathLike) -> str | None:
    """A JPEG thumbnail of an image file (or data-set row) as a data URI (``None`` when it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        if os.fspath(path).startswith("hf:"):  # a row of a Hugging Face data set (finetune.data.hf)
            from finetune.data.hf import load_row

            image = load_row(path)
        else:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 -- a file that went away or broke since training: no thumbnail
        return None
    return _png_uri(buffer.getvalue(), "jpeg")


def reliability_png(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> bytes:
    """A reliability diagram (accuracy vs confidence per bin, bin counts shaded), as PNG bytes."""
    from matplotlib.figure import Figure  # no pyplot, no backend switch: a notebook's own plots stay shown

    conf, pred = probs.max(dim=1)
    correct = pred.eq(labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf.double().clamp(0, 1), edges[1:-1], right=False)
    counts = torch.bincount(index, minlength=n_bins).double()
    accuracy = torch.bincount(index, weights=correct, minlength=n_bins) / counts.clamp(min=1)
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    fig = Figure(figsize=(4.2, 4.0), dpi=100)
    ax = fig.subplots()
    ax.bar(centres, accuracy.numpy(), width=1 / n_bins, edgecolor="black",
           color=[(0.2, 0.4, 0.8, 0.25 + 0.75 * float(c) / max(float(counts.max()), 1.0)) for c in counts])
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (ECE {ece:.3f}; darker = more images)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = [("images", metrics.get("num_samples")), ("top-1", metrics.get("top1")), ("top-5", metrics.get("top5")),
            ("macro F1", metrics.get("macro_f1")), ("balanced accuracy", metrics.get("balanced_accuracy")),
            ("ECE (15 bins)", metrics.get("ece")), ("loss", metrics.get("loss")),
            ("best epoch", metrics.get("best_epoch"))]
    cells = "".join(f"<tr><td>{name}</td><td>{value if isinstance(value, int) else f'{value:.4f}'}</td></tr>"
                    for name, value in rows if isinstance(value, (int, float)))
    return f"<table>{cells}</table>"


def _per_class_table(per_class: Mapping[str, Mapping[str, float]]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>"
    rows = "".join(f"<tr><td>{escape.escape(name)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>"
                   f"<td>{r['f1']:.3f}</td><td>{int(r['support'])}</td></tr>" for name, r in per_class.items())
    return f"<table>{head}{rows}</table>"


def _gallery(probs: torch.Tensor, labels: torch.Tensor, paths: Sequence[str | os.PathLike],
             classes: Sequence[str]) -> str:
    """The most confidently wrong images, most confident first."""
    if not len(paths):
        return "<p>No image files for this evaluation.</p>"
    conf, pred = probs.max(dim=1)
    wrong = (pred != labels).nonzero().flatten()
    if not len(wrong):
        return "<p>No image was misclassified.</p>"
    order = wrong[conf[wrong].argsort(descending=True)][:GALLERY_SIZE]
    figures = []
    for i in order.tolist():
        uri = _thumbnail(paths[i])
        image = f'<img src="{uri}" alt="">' if uri else "<div>(unreadable now)</div>"
        figures.append(f"<figure>{image}<figcaption>true <b>{escape.escape(classes[int(labels[i])])}</b><br>"
                       f"predicted <b>{escape.escape(classes[int(pred[i])])}</b> ({conf[i]:.2f})<br>"
                       f"<small>{escape.escape(Path(paths[i]).name)}</small></figcaption></figure>")
    return (f"<p>{len(wrong)} of {len(labels)} images are misclassified; the {len(order)} most confident:</p>"
            f'<div class="gallery">{"".join(figures)}</div>')


def report_html(*, title: str, metrics: Mapping[str, Any], classes: Sequence[str], probs: torch.Tensor,
                labels: torch.Tensor, paths: Sequence[str | os.PathLike], plots: Mapping[str, Path] | None = None,
                skipped: Sequence[tuple[str, str]] = (), recipe: str | None = None, subtitle: str = "") -> str:
    """The page as a string (see :func:`write_report`)."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{escape.escape(title)}</h1><p>{escape.escape(subtitle)}</p>",
             "<h2>Metrics</h2>", _metrics_table(metrics)]
    for heading, key in (("Training curves", "curves"), ("Confusion matrix", "confusion")):
        uri = _file_uri(plots[key]) if plots and key in plots else None
        if uri:
            parts += [f"<h2>{heading}</h2>", f'<img class="plot" src="{uri}" alt="{heading}">']
    parts += ["<h2>Per class</h2>", _per_class_table(metrics.get("per_class", {})),
              "<h2>Calibration</h2>", f'<img class="plot" src="{_png_uri(reliability_png(probs, labels))}" '
              'alt="reliability diagram">',
              "<h2>Most confidently wrong</h2>", _gallery(probs, labels, paths, classes),
              f"<h2>Skipped files ({len(skipped)})</h2>"]
    parts.append("<ul>" + "".join(f"<li>{escape.escape(str(p))}: {escape.escape(str(r))}</li>" for p, r in skipped)
                 + "</ul>" if skipped else "<p>None.</p>")
    if recipe:
        parts += ["<h2>Recipe</h2>", f"<pre>{escape.escape(recipe)}</pre>"]
    return "\n".join(parts) + "\n</body></html>\n"


def write_report(out_dir: str | os.PathLike, **page: Any) -> Path:
    """Write ``OUT/report.html`` (:func:`report_html`'s keywords); its path.

    >>> write_report("runs/photos", title="…", metrics=m, classes=c, probs=p, labels=y, paths=f)  # doctest: +SKIP
    """
    path = Path(out_dir) / RUN_REPORT
    write_text(path, report_html(**page))
    return path
