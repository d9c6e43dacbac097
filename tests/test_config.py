"""Tests for finetune.config.TrainConfig: coercion, validation messages, YAML round trips.

Every user mistake must surface as one :class:`FinetuneError` whose message is a single line
that names the offending key (or, for file-level problems, the file), so that the CLI can
print it as ``finetune: error: ...``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from finetune.config import MIXED_PRECISION, STRATEGIES, TrainConfig, field_help
from finetune.errors import FinetuneError

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def config_error(**kwargs) -> str:
    """Build a TrainConfig that must fail; return its one-line message."""
    with pytest.raises(FinetuneError) as info:
        TrainConfig(**kwargs)
    return _one_line(info.value)


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- coercion

def test_defaults_only_need_data() -> None:
    cfg = TrainConfig(data="photos")
    assert cfg.data == "photos"
    for f in dataclasses.fields(TrainConfig):
        if f.name != "data":
            assert getattr(cfg, f.name) == f.default, f.name


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("3e-4", 3e-4), ("0.01", 0.01), ("2", 2.0)])
def test_float_strings_are_coerced(text: str, expected: float) -> None:
    cfg = TrainConfig(data="x", lr=text)
    assert isinstance(cfg.lr, float)
    assert cfg.lr == pytest.approx(expected)


def test_yaml_exponent_without_dot_is_a_float() -> None:
    # PyYAML (YAML 1.1) reads `1e-3` as the *string* "1e-3"; the config must still get a float.
    data = yaml.safe_load("data: x\nlr: 1e-3\nweight_decay: 5e-2\n")
    assert data["lr"] == "1e-3"  # the premise of this test
    cfg = TrainConfig.from_dict(data)
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfg.weight_decay == pytest.approx(0.05) and isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize("text, expected", [("3", 3), (" 7 ", 7), ("10.0", 10), ("1e1", 10), (4.0, 4)])
def test_int_strings_are_coerced(text, expected: int) -> None:
    cfg = TrainConfig(data="x", epochs=text, strategy="full")
    assert cfg.epochs == expected and type(cfg.epochs) is int


def test_optional_int_accepts_none_spellings() -> None:
    for text in ("none", "None", "null", ""):
        assert TrainConfig(data="x", img_size=text).img_size is None
    assert TrainConfig(data="x", img_size="96").img_size == 96


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("yes", True), ("on", True), ("1", True), (True, True),
    ("false", False), ("FALSE", False), ("no", False), ("off", False), ("0", False), (False, False),
])
def test_bool_strings_are_coerced(text, expected: bool) -> None:
    cfg = TrainConfig(data="x", class_balanced=text, check_images=text)
    assert cfg.class_balanced is expected and cfg.check_images is expected


@pytest.mark.parametrize("key, value, words", [
    ("lr", "abc", ["lr", "abc", "not a number"]),
    ("epochs", "three", ["epochs", "three", "not a number"]),
    ("epochs", "2.5", ["epochs", "2.5", "whole number"]),
    ("batch_size", True, ["batch_size", "True", "not a number"]),
    ("check_images", "maybe", ["check_images", "maybe", "true or false"]),
    ("class_balanced", "2", ["class_balanced", "`2`"]),
])
def test_uncoercible_values_name_key_and_value(key: str, value, words: list[str]) -> None:
    message = config_error(data="x", **{key: value})
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_required_value_cannot_be_none() -> None:
    message = config_error(data="x", epochs=None)
    assert "epochs" in message


# --------------------------------------------------------------------------- choices and keys

def test_invalid_choice_names_key_value_and_choices() -> None:
    message = config_error(data="x", strategy="freeze")
    assert message.startswith("strategy:")
    assert "`freeze`" in message
    for choice in STRATEGIES:
        assert choice in message


@pytest.mark.parametrize("key", [name for name, spec in field_help().items() if spec.get("choices")])
def test_every_choice_field_rejects_unknown_values(key: str) -> None:
    choices = field_help()[key]["choices"]
    message = config_error(data="x", **{key: "bogus"})
    assert key in message and "bogus" in message
    assert all(c in message for c in choices)


def test_choice_is_case_sensitive_and_valid_choices_pass() -> None:
    for choice in STRATEGIES:
        assert TrainConfig(data="x", strategy=choice, epochs=3).strategy == choice
    assert "strategy" in config_error(data="x", strategy="Probe")


def test_unknown_key_lists_the_valid_keys() -> None:
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_dict({"data": "x", "learning_rate": 0.1})
    message = _one_line(info.value)
    assert "learning_rate" in message
    for name in FIELDS:
        assert name in message, f"valid key {name} not listed in {message!r}"


def test_unknown_key_in_overrides_is_an_error_too() -> None:
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_dict({"data": "x"}, overrides={"epoch": 3})
    assert "epoch" in _one_line(info.value) and "epochs" in str(info.value)


@pytest.mark.parametrize("data", [{}, {"data": None}, {"data": ""}, {"epochs": 2}])
def test_from_dict_requires_data(data: dict) -> None:
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_dict(data)
    message = _one_line(info.value)
    assert "data" in message and "--data" in message


# --------------------------------------------------------------------------- impossible values

@pytest.mark.parametrize("kwargs, key, value", [
    (dict(epochs=0), "epochs", "0"),
    (dict(epochs=-2), "epochs", "-2"),
    (dict(batch_size=0), "batch_size", "0"),
    (dict(grad_accum=0), "grad_accum", "0"),
    (dict(val_fraction=1.5), "val_fraction", "1.5"),
    (dict(val_fraction=0), "val_fraction", "0"),
    (dict(val_fraction=1), "val_fraction", "1"),
    (dict(lr=-0.001), "lr", "-0.001"),
    (dict(lr=0), "lr", "0"),
    (dict(body_lr_mult=0), "body_lr_mult", "0"),
    (dict(head_epochs=-1), "head_epochs", "-1"),
    (dict(label_smoothing=1.0), "label_smoothing", "1.0"),
    (dict(aug_scale=0), "aug_scale", "0"),
    (dict(aug_scale=1.5), "aug_scale", "1.5"),
    (dict(img_size=8), "img_size", "8"),
    (dict(weight_decay=-0.1), "weight_decay", "-0.1"),
    (dict(warmup_epochs=-1), "warmup_epochs", "-1"),
])
def test_impossible_values_name_key_and_value(kwargs: dict, key: str, value: str) -> None:
    message = config_error(data="x", strategy="full", **kwargs)
    assert key in message, message
    assert value in message, f"the bad value {value!r} is not in {message!r}"


@pytest.mark.parametrize("head_epochs, epochs", [(3, 3), (5, 3), (1, 1)])
def test_head_epochs_must_leave_room_for_finetuning(head_epochs: int, epochs: int) -> None:
    message = config_error(data="x", strategy="finetune", epochs=epochs, head_epochs=head_epochs)
    assert message.startswith("head_epochs:")
    assert f"`{head_epochs}`" in message and f"epochs={epochs}" in message
    assert "probe" in message  # says what to do instead


def test_head_epochs_only_matter_for_finetune() -> None:
    assert TrainConfig(data="x", strategy="finetune", epochs=3, head_epochs=2).head_epochs == 2
    assert TrainConfig(data="x", strategy="probe", epochs=3, head_epochs=5).epochs == 3
    assert TrainConfig(data="x", strategy="full", epochs=1, head_epochs=1).epochs == 1
    # auto = full for random init, so head epochs cannot get in the way there
    assert TrainConfig(data="x", strategy="auto", weights="none", epochs=1).resolved_strategy == "full"
    # auto with pretrained weights and no room for a head-only epoch: one phase, body at the lower LR
    from finetune.train import plan_phases

    phases = plan_phases(TrainConfig(data="x", strategy="auto", weights="auto", epochs=1))
    assert [(p.name, p.epochs, p.train_body) for p in phases] == [("body", 1, True)]
    assert "head_epochs" in config_error(data="x", strategy="finetune", weights="auto", epochs=1)


@pytest.mark.parametrize("key, value", [
    ("epochs", "nan"), ("epochs", "inf"), ("batch_size", "inf"),
    ("lr", "inf"), ("lr", "nan"), ("weight_decay", "nan"), ("warmup_epochs", "inf"),
])
def test_non_finite_numbers_are_rejected(key: str, value: str) -> None:
    # `--epochs nan` must not end in a ValueError traceback, and `--lr inf` must not train.
    message = config_error(data="x", strategy="full", **{key: value})
    assert key in message


# --------------------------------------------------------------------------- paths

def test_data_tilde_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig(data="~/photos")
    assert cfg.data == os.path.join(str(tmp_path), "photos")
    assert "~" not in cfg.data


def test_data_tilde_is_expanded_from_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = write(tmp_path / "recipe.yaml", "data: ~/photos/cats\n")
    assert TrainConfig.from_yaml(recipe).data == os.path.join(str(tmp_path), "photos", "cats")


# --------------------------------------------------------------------------- YAML files

def test_yaml_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = TrainConfig(
        data=str(tmp_path / "photos"), model="mobilenetv2_100", weights="offline", out="runs/x",
        epochs=7, strategy="finetune", head_epochs=2, batch_size=16, lr="3e-4", body_lr_mult=0.1,
        weight_decay=1e-5, warmup_epochs=0, label_smoothing=0.0, img_size=96, val_fraction=0.25,
        seed=3, mixed_precision="bf16", grad_accum=2, num_workers=0, class_balanced=True, bn="frozen",
        memory_format="contiguous", aug_scale=1, check_images=False,
    )
    recipe = write(tmp_path / "recipe.yaml", cfg.to_yaml())
    again = TrainConfig.from_yaml(recipe)
    assert again.to_dict() == cfg.to_dict()
    assert again == cfg
    # floats stay floats through YAML (1e-05 must not come back as the string "1e-05")
    assert isinstance(again.weight_decay, float) and isinstance(again.lr, float)


def test_yaml_round_trip_of_defaults_and_yaml_lookalike_strings(tmp_path: Path) -> None:
    # "no" is a YAML 1.1 boolean, "null" is None: to_yaml must quote them so they come back as strings.
    cfg = TrainConfig(data="null", model="yes", weights="none", strategy="full")
    assert cfg.mixed_precision == "no"
    again = TrainConfig.from_yaml(write(tmp_path / "r.yaml", cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


def test_hand_written_recipe_with_unquoted_no(tmp_path: Path) -> None:
    # `mixed_precision: no` is how a person writes the default by hand; YAML 1.1 reads it as False.
    recipe = write(tmp_path / "r.yaml", "data: photos\nmixed_precision: no\n")
    assert TrainConfig.from_yaml(recipe).mixed_precision == "no"


def test_from_yaml_overrides_win(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "data: photos\nepochs: 4\nlr: 1e-3\nstrategy: probe\n")
    cfg = TrainConfig.from_yaml(recipe, overrides={"epochs": "9", "data": "other", "seed": 5})
    assert (cfg.data, cfg.epochs, cfg.seed) == ("other", 9, 5)
    assert cfg.lr == pytest.approx(1e-3) and cfg.strategy == "probe"  # untouched keys from the file
    assert TrainConfig.from_yaml(recipe, overrides={}).epochs == 4
    assert TrainConfig.from_yaml(recipe, overrides=None).epochs == 4


def test_from_yaml_override_is_validated(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "data: photos\nepochs: 4\n")
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_yaml(recipe, overrides={"strategy": "freeze"})
    assert "strategy" in _one_line(info.value) and "freeze" in str(info.value)


def test_from_yaml_can_take_data_from_overrides(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", "epochs: 4\nstrategy: probe\n")
    assert TrainConfig.from_yaml(recipe, overrides={"data": "photos"}).data == "photos"
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_yaml(recipe)
    assert "data" in _one_line(info.value)


def _yaml_error(path: Path) -> str:
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_yaml(path)
    message = _one_line(info.value)
    assert str(path) in message, f"the file is not named in {message!r}"
    return message


def test_from_yaml_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _yaml_error(tmp_path / "nope.yaml")


def test_from_yaml_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    _yaml_error(tmp_path / "dir.yaml")


@pytest.mark.parametrize("text", ["data: [unclosed\n", "data: x\n  epochs: 3\n bad: {\n", "key: 'open\n"])
def test_from_yaml_invalid_yaml(tmp_path: Path, text: str) -> None:
    assert "not valid YAML" in _yaml_error(write(tmp_path / "bad.yaml", text))


@pytest.mark.parametrize("text", ["- data: x\n- epochs: 3\n", "just a string\n", "42\n"])
def test_from_yaml_not_a_mapping(tmp_path: Path, text: str) -> None:
    assert "mapping" in _yaml_error(write(tmp_path / "list.yaml", text))


def test_from_yaml_empty_file_asks_for_data(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError) as info:
        TrainConfig.from_yaml(write(tmp_path / "empty.yaml", ""))
    assert "data" in _one_line(info.value)


def test_from_yaml_binary_file(tmp_path: Path) -> None:
    # e.g. `finetune train photo.png` (an image passed where the recipe goes)
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    _yaml_error(path)


def test_from_yaml_errors_inside_file_name_the_key(tmp_path: Path) -> None:
    for text, key in [("data: x\nepochs: 0\n", "epochs"), ("data: x\nbn: maybe\n", "bn"),
                      ("data: x\nlr: fast\n", "lr"), ("data: x\nepoch: 3\n", "epoch")]:
        with pytest.raises(FinetuneError) as info:
            TrainConfig.from_yaml(write(tmp_path / "r.yaml", text))
        assert key in _one_line(info.value), text


# --------------------------------------------------------------------------- flags metadata

def test_field_help_covers_every_field_with_help_text() -> None:
    spec = field_help()
    assert list(spec) == FIELDS
    for name, entry in spec.items():
        assert entry["help"].strip(), name
    assert spec["strategy"]["choices"] == STRATEGIES
    assert spec["mixed_precision"]["choices"] == MIXED_PRECISION
