"""The layout holds: imports run one way, modules stay small, ``fit`` stays orchestration, and the
wheel ships the recipes.

Read statically (``ast``), so every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"

#: Bottom to top. A module may import its own layer (without a cycle) and the layers below it.
LAYERS = [
    ["finetune.version", "finetune.errors", "finetune.assets"],
    ["finetune.io"],
    ["finetune.config"],
    ["finetune.data", "finetune.models"],
    ["finetune.convert", "finetune.distill", "finetune.adapters", "finetune.metrics"],
    ["finetune.rundir", "finetune.hub", "finetune.report"],
    ["finetune.train"],
    ["finetune.tasks", "finetune.inference", "finetune.export"],
    ["finetune.cli"],
    ["finetune"],  # the public namespace re-exports everything: nothing inside imports it
]
MAX_MODULE_LINES = 500
MAX_FIT_LINES = 100
MAX_TRAIN_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every finetune module ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "finetune")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "finetune":
                continue
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return {m for m in found if m in known and m != name}


def _layer(module: str) -> int:
    best, rank = -1, None
    for index, members in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and len(member) > best:
                best, rank = len(member), index
    assert rank is not None, f"{module} is in no layer of tests/test_architecture.py::LAYERS"
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_upward_import(graph):
    upward = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
              if _layer(d) > _layer(m) and not (m == "finetune" or d.startswith(m + "."))]
    assert not upward, "imports must run bottom to top:\n" + "\n".join(sorted(upward))


def test_no_import_cycle(graph):
    # a package's __init__ importing its own submodules is how it re-exports: not an edge back
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_small():
    big = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    over = {name: n for name, n in big.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {over}"


def _function_lengths(path: Path) -> dict[str, int]:
    lengths = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_fit_is_orchestration():
    lengths: dict[str, int] = {}
    for path in sorted((PACKAGE / "train").glob("*.py")):
        lengths.update(_function_lengths(path))
    fit = [n for name, n in lengths.items() if name.endswith(":fit")]
    assert fit and max(fit) < MAX_FIT_LINES, f"fit is {fit} lines"
    long = {name: n for name, n in lengths.items() if n > MAX_TRAIN_FUNCTION_LINES}
    assert not long, f"functions in finetune/train over {MAX_TRAIN_FUNCTION_LINES} lines: {long}"


def test_public_api_imports():
    import finetune

    for name in ("Recipe", "fit", "evaluate", "predict", "load_model", "load_recipe", "convert_to_separable",
                 "apply_lora", "merge_lora", "lr_find", "save_run", "run_recipe", "__version__"):
        assert getattr(finetune, name) is not None, name
    assert sorted(finetune.__all__) == sorted(dir(finetune))


def test_wheel_ships_the_recipes(tmp_path):
    """A wheel unpacked outside the checkout lists every shipped recipe from a folder without `recipes/`."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("finetune_vision-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    env.pop("FINETUNE_RECIPES", None)
    where = subprocess.run([sys.executable, "-c", "import finetune; print(finetune.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(unpacked), where.stdout  # not the checkout's copy
    listed = subprocess.run([sys.executable, "-m", "finetune.cli", "recipes"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip() and "finetune train" not in line}
    shipped = {p.stem for p in (PACKAGE / "recipes").glob("*.yaml")}
    assert shipped and names == shipped, (names, shipped)
    for link in (ROOT / "recipes").glob("*.yaml"):  # the top-level folder points at the shipped files
        assert link.resolve().parent == (PACKAGE / "recipes").resolve(), link
