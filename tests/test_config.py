"""Recipe: sections, short keys, coercion, validation messages, YAML round trips, overrides, recipes/.

Every user mistake must surface as one :class:`FinetuneError` whose message is a single line that
names the offending key (dotted) and the fix, so the CLI can print it as ``finetune: error: ...``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.config import MIXED_PRECISION, SECTIONS, SHORT_KEYS, STRATEGIES, Recipe, field_specs
from finetune.errors import FinetuneError
from finetune.config.lookup import SHIPPED, find_recipe, list_recipes, load_recipe

REPO = Path(__file__).resolve().parent.parent


def recipe_error(*args, **kwargs) -> str:
    """Build a Recipe that must fail (kwargs, or from_dict(*args)); return its one-line message."""
    with pytest.raises(FinetuneError) as info:
        Recipe.from_dict(*args) if args else Recipe(**kwargs)
    return one_line(info.value)


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- building

def test_defaults_and_the_short_form() -> None:
    recipe = Recipe(model="tf_efficientnet_lite0", data="~/photos", epochs=3)
    assert recipe.model.name == "tf_efficientnet_lite0" and recipe.optim.epochs == 3
    assert recipe.data.root == os.path.expanduser("~/photos")
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if (section, f.name) not in {("model", "name"), ("data", "root"), ("optim", "epochs")}:
                assert getattr(getattr(recipe, section), f.name) == f.default, f"{section}.{f.name}"


def test_sections_as_objects_mappings_and_shorthand_agree() -> None:
    from finetune.config import DataConfig, OptimConfig

    a = Recipe(data=DataConfig(root="x", batch_size=8), optim=OptimConfig(lr=3e-4), strategy="probe")
    b = Recipe(data={"root": "x", "batch_size": 8}, optim={"lr": "3e-4"}, strategy={"name": "probe"})
    c = Recipe.from_dict({"data": "x", "batch_size": 8, "lr": 3e-4, "strategy": "probe"})
    d = Recipe.from_dict({}, ["data.root=x", "data.batch_size=8", "optim.lr=3e-4", "strategy.name=probe"])
    assert a == b == c == d


def test_every_short_key_points_at_a_real_field() -> None:
    specs = field_specs()
    assert set(SHORT_KEYS.values()) <= set(specs)
    recipe = Recipe.from_dict({"data": "x"}, {"ema": True, "layer_decay": 0.8, "auto_augment": "randaugment"})
    assert recipe.strategy.ema is True and recipe.optim.layer_decay == 0.8
    assert recipe.augment.timm_auto_augment == "rand-m9-mstd0.5-inc1"


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("3e-4", 3e-4), ("0.01", 0.01), ("2", 2.0)])
def test_float_strings_are_coerced(text: str, expected: float) -> None:
    assert Recipe(data="x", lr=text).optim.lr == pytest.approx(expected)


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-3` as the *string* "1e-3"; the recipe must still get a float.
    text = "data: {root: x}\noptim:\n  lr: 1e-3\n  weight_decay: 5e-2\n"
    assert yaml.safe_load(text)["optim"]["lr"] == "1e-3"  # the premise of this test
    recipe = Recipe.from_yaml(write(tmp_path / "r.yaml", text))
    assert recipe.optim.lr == pytest.approx(1e-3) and isinstance(recipe.optim.lr, float)
    assert recipe.optim.weight_decay == pytest.approx(0.05)


@pytest.mark.parametrize("text, expected", [("3", 3), (" 7 ", 7), ("10.0", 10), ("1e1", 10), (4.0, 4)])
def test_int_strings_are_coerced(text, expected: int) -> None:
    recipe = Recipe(data="x", epochs=text)
    assert recipe.optim.epochs == expected and type(recipe.optim.epochs) is int


@pytest.mark.parametrize("text, expected", [("true", True), ("no", False), ("1", True), ("off", False)])
def test_bool_strings_are_coerced(text: str, expected: bool) -> None:
    assert Recipe(data="x", ema=text).strategy.ema is expected


def test_optional_values_accept_none_spellings() -> None:
    for text in ("none", "None", "null", ""):
        assert Recipe(data="x", img_size=text).model.img_size is None
    assert Recipe.from_dict({}, ["model.img_size=96"]).model.img_size == 96


# --------------------------------------------------------------------------- mistakes a new user makes

@pytest.mark.parametrize("args, words", [
    (({"optim": {"lrr": 0.1}},), ["`optim.lrr`", "did you mean `optim.lr`"]),
    (({"optimizer": {"lr": 0.1}},), ["`optimizer`", "did you mean `optim`"]),
    (({"epoch": 3},), ["`epoch`", "did you mean `epochs`"]),
    (({}, ["optim.lr=abc"]), ["optim.lr", "`abc`", "not a number", "0.001"]),
    (({}, ["strategy.name=fulll"]), ["strategy.name", "`fulll`", "did you mean `full`", *STRATEGIES]),
    (({}, ["runtime.mixed_precision=fp8"]), ["runtime.mixed_precision", *MIXED_PRECISION]),
    (({}, ["optim.epochs=0"]), ["optim.epochs", "at least 1"]),
    (({}, ["optim.epochs=2.5"]), ["optim.epochs", "whole number"]),
    (({}, ["optim.lr=-1"]), ["optim.lr", "greater than 0"]),
    (({}, ["optim.lr=nan"]), ["optim.lr", "finite"]),
    (({}, ["data.val_fraction=1.5"]), ["data.val_fraction", "less than 1"]),
    (({}, ["augment.auto_augment=randaugmnet"]), ["augment.auto_augment", "did you mean `randaugment`"]),
    (({}, ["strategy.ema=maybe"]), ["strategy.ema", "true or false"]),
    (({}, ["optim.lr"]), ["KEY=VALUE", "optim.lr=3e-4"]),
    (({}, ["lora.enabled=true", "strategy.name=probe"]), ["strategy.name", "lora.enabled"]),
    (({}, ["strategy.name=finetune", "optim.epochs=1"]), ["strategy.head_epochs", "optim.epochs=1"]),
    (({"model": ["a", "b"]},), ["model", "mapping"]),
])
def test_mistakes_are_one_line_naming_the_key_and_the_fix(args, words) -> None:
    message = recipe_error(*args)
    for word in words:
        assert word in message, (word, message)


def test_missing_data_root_is_only_an_error_when_training() -> None:
    recipe = Recipe.from_dict({"model": "mobilenetv2_100"})  # a shipped recipe leaves data.root unset
    with pytest.raises(FinetuneError) as info:
        recipe.require_data()
    message = one_line(info.value)
    assert "data.root" in message and "--data" in message and "--set data.root=" in message


def test_yaml_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.yaml", "data: {root: x}\nstrategy: {name: fulll}\n")
    with pytest.raises(FinetuneError) as info:
        Recipe.from_yaml(path)
    message = one_line(info.value)
    assert message.startswith("mine.yaml: strategy.name") and "did you mean `full`" in message


@pytest.mark.parametrize("text", ["a: [1, 2", "\tdata: x\n", ": :"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    with pytest.raises(FinetuneError, match="not valid YAML|unknown key"):
        Recipe.from_yaml(write(tmp_path / "bad.yaml", text))


def test_yaml_file_problems(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(FinetuneError, match="is a folder"):
        Recipe.from_yaml(tmp_path)
    with pytest.raises(FinetuneError, match="mapping"):
        Recipe.from_yaml(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(FinetuneError, match="not a text file"):
        Recipe.from_yaml(tmp_path / "bin.yaml")


# --------------------------------------------------------------------------- round trips and overrides

def test_yaml_round_trip_is_exact(tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"name": "x", "description": "y"}, [
        "data.root=~/photos", "optim.lr=3e-4", "optim.layer_decay=0.8", "strategy.name=gradual",
        "strategy.ema=true", "augment.auto_augment=trivialaugment", "augment.mixup=0.2", "runtime.seed=7",
        "model.weights=no",  # a YAML 1.1 boolean lookalike must stay a string
    ])
    again = Recipe.from_yaml(write(tmp_path / "r.yaml", recipe.to_yaml()))
    assert again == recipe and again.to_dict() == recipe.to_dict()
    assert again.model.weights == "no"


def test_overrides_win_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "data: {root: a}\noptim: {lr: 0.1, epochs: 3}\n")
    recipe = Recipe.from_yaml(path, overrides=["optim.lr=3e-4", "data.root=b"])
    assert recipe.optim.lr == pytest.approx(3e-4) and recipe.optim.epochs == 3 and recipe.data.root == "b"
    assert Recipe.from_yaml(path, {"epochs": 5}).optim.epochs == 5  # short names work as override keys
    with pytest.raises(FinetuneError, match="optim.epochs"):
        Recipe.from_yaml(path, ["optim.epochs=-1"])
    assert recipe.replace(["optim.lr=0.5"]).optim.lr == 0.5 and recipe.optim.lr == pytest.approx(3e-4)


def test_field_specs_have_help_for_every_field() -> None:
    for key, spec in field_specs().items():
        assert spec["help"].strip(), key


# --------------------------------------------------------------------------- shipped recipes

SHIPPED_NAMES = sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def test_the_required_recipes_ship() -> None:
    required = {"efficientnet_lite0_folder", "mobilenetv2_folder", "mobilenetv2_lora",
                "efficientnet_lite0_gradual_llrd_ema", "mobilenetv3_large_hub", "convert_resnet18_separable"}
    assert required <= set(SHIPPED_NAMES)


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_every_shipped_recipe_loads_validates_and_is_listed(name: str) -> None:
    path = SHIPPED / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    recipe = Recipe.from_yaml(path)
    assert recipe.name == name, "the recipe's name must match its file name"
    assert recipe.description.strip(), "every recipe explains itself in one line"
    assert recipe.data.root is None, "shipped recipes leave data.root to the user (--data / --set data.root=)"
    assert set(raw) <= {"name", "description", "task", *SECTIONS}, "shipped recipes use sections, not short keys"
    assert name in {entry.name for entry in list_recipes()}
    assert find_recipe(name) .resolve() == path.resolve()
    assert load_recipe(name, ["data.root=/tmp/x"]).data.root == "/tmp/x"
    assert name in (REPO / "recipes" / "README.md").read_text(), "each recipe is documented in recipes/README.md"


def test_recipe_by_name_suggests_close_names() -> None:
    with pytest.raises(FinetuneError) as info:
        find_recipe("mobilenetv2_lor")
    assert "did you mean `mobilenetv2_lora`" in one_line(info.value)


def test_finetune_recipes_command_lists_every_recipe(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "recipes"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in SHIPPED_NAMES:
        assert name in result.stdout
    keys = subprocess.run([sys.executable, "-m", "finetune.cli", "recipes", "--keys"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert "optim.layer_decay" in keys.stdout and "--layer-decay" in keys.stdout


@pytest.mark.parametrize("argv, words", [
    (["train", "efficientnet_lite0_folder"], ["data.root", "--data"]),
    (["train", "efficientnet_lite0_folder", "--set", "optim.lrr=1"], ["optim.lrr", "optim.lr"]),
    (["train", "efficientnet_lite0_folder", "--set", "strategy.name=fulll"], ["strategy.name", "full"]),
    (["train", "mobilenetv2_lor"], ["mobilenetv2_lora"]),
    (["train", "--data", "x", "--set", "optim.lr"], ["KEY=VALUE"]),
])
def test_cli_recipe_mistakes_exit_2_with_one_line(argv: list[str], words: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "finetune.cli", *argv], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
