"""The example notebooks (notebooks/*.ipynb) run top to bottom and print the right things.

Each notebook is executed with nbclient in quick mode (``FINETUNE_NOTEBOOK_QUICK=1``: a few
images per class, 1-3 epochs) with a temporary working directory, so its ``runs/`` folder lands
in ``tmp_path``. The kernel is this interpreter (``sys.executable``), through a kernelspec written
to a temporary folder: a ``python3`` kernelspec elsewhere on the machine (``~/.local/share/jupyter``)
cannot swap in another Python.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_quickstart", "02_lora", "03_convert_and_distill")
KERNEL = "finetune-notebook-test"
CELL_TIMEOUT_S = 300  # generous: the whole quick run of a notebook takes well under a minute


def _kernel_manager(folder: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernelspec runs ipykernel on this very interpreter."""
    spec_dir = folder / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(folder)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _run(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**os.environ, "FINETUNE_NOTEBOOK_QUICK": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "IPYTHONDIR": str(tmp_path / "ipython"), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    client = NotebookClient(nb, km=_kernel_manager(tmp_path / "kernels"), kernel_name=KERNEL,
                            timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, on any error
    assert (workdir / "runs" / "notebooks" / name).is_dir(), "the notebook should write under ./runs/notebooks/"
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "text/plain" in output.get("data", {}):
                parts.append(output["data"]["text/plain"])
    return "".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"the notebook output lacks /{pattern}/:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "FINETUNE_NOTEBOOK_QUICK" in code[0].source, "the quick switch belongs in the first code cell"


def test_quickstart(tmp_path: Path) -> None:
    nb = _run("01_quickstart", tmp_path)
    text = _text(nb)
    top1 = _number(r"validation top-1: ([0-9.]+)", text)
    assert top1 > 0.2, f"top-1 {top1} is hardly above chance (0.1) for 10 classes"
    # same split, same weights (fit may have scored in channels_last: allow one image of 100 to flip)
    assert abs(_number(r"evaluate: top-1 ([0-9.]+)", text) - top1) <= 0.011
    assert "recipe.yaml loads back to the same recipe: True" in text
    assert 0.0 <= _number(r"re-run with 2 epochs: top-1 ([0-9.]+)", text) <= 1.0
    # demo images, lr_find, curves, confusion matrix, predictions
    assert _images(nb) >= 5


def test_lora(tmp_path: Path) -> None:
    nb = _run("02_lora", tmp_path)
    text = _text(nb)
    assert _number(r"trainable fraction: ([0-9.]+)%", text) < 10.0
    assert _number(r"the adapter is ([0-9.]+)% of the model file", text) < 15.0
    plain = _number(r"plain timm \+ safetensors: val top-1 ([0-9.]+)", text)
    reported = _number(r"fit reported ([0-9.]+)", text)
    assert abs(plain - reported) <= 0.011, "plain timm should reproduce the run's accuracy (to one image in 100)"
    assert _number(r"max \|logit difference\| = ([0-9.e+-]+)", text) < 1e-3
    assert re.search(r"full fine-tune\s+[0-9.]+", text)
    assert _images(nb) >= 1


def test_convert_and_distill(tmp_path: Path) -> None:
    nb = _run("03_convert_and_distill", tmp_path)
    text = _text(nb)
    assert "policy macs=0.4:" in text  # the per-layer conversion report
    assert 0.3 <= _number(r"MACs ratio: ([0-9.]+)x", text) <= 0.45
    assert _number(r"params ratio: ([0-9.]+)x", text) < 0.6
    for label in ("dense teacher", "converted, after distillation", "SVD only"):
        assert label in text
    assert re.search(r"\n\s+1  contiguous\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+x", text), "the latency table"
    assert _images(nb) >= 2
