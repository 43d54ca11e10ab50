"""Recipe loading: typed config, overrides, validation messages."""

from __future__ import annotations

import pytest
import yaml

from hftoolkit.config import Recipe, field_docs, load_recipe, to_dict
from hftoolkit.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_nested_values(tmp_path):
    """A recipe's nested keys land in typed fields; without this nothing downstream can trust the config."""
    r = load_recipe(
        write(tmp_path, "task: qa\ndata: {synthetic: {num_train: 10}}\ntrain: {learning_rate: 1e-4}\n")
    )
    assert r.task == "qa"
    assert r.data.synthetic.num_train == 10
    assert r.train.learning_rate == 1e-4 and isinstance(
        r.train.learning_rate, float
    )  # YAML reads 1e-4 as str
    assert r.train.per_device_train_batch_size == 8


def test_override_changes_value_and_type(tmp_path):
    """key.sub=value overrides are parsed as YAML and coerced; else CLI overrides would silently be strings."""
    r = load_recipe(
        write(tmp_path, "data: {synthetic: {}}\n"),
        ["train.max_steps=7", "data.packing=false", "eval.stop_strings=[a, b]"],
    )
    assert r.train.max_steps == 7 and r.data.packing is False and r.eval.stop_strings == ["a", "b"]


def test_unknown_key_names_nearest(tmp_path):
    """A typo is an error naming the nearest valid key, not a silently ignored setting."""
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rte'.*did you mean 'learning_rate'"):
        load_recipe(write(tmp_path, "data: {synthetic: {}}\ntrain: {learning_rte: 0.1}\n"))
    with pytest.raises(UserError, match=r"unknown key 'trian.max_steps'.*did you mean 'train'"):
        load_recipe(write(tmp_path, "data: {synthetic: {}}\n"), ["trian.max_steps=3"])


def test_wrong_type_names_key_and_type(tmp_path):
    """Wrong types are rejected with the key and the expected type."""
    with pytest.raises(
        UserError, match=r"train.per_device_train_batch_size: expected an integer, got 'eight'"
    ):
        load_recipe(write(tmp_path, "data: {synthetic: {}}\n"), ["train.per_device_train_batch_size=eight"])
    with pytest.raises(UserError, match=r"data.packing: expected true or false"):
        load_recipe(write(tmp_path, "data: {synthetic: {}, packing: 3}\n"))
    with pytest.raises(UserError, match=r"task: expected one of"):
        load_recipe(write(tmp_path, "task: poetry\ndata: {synthetic: {}}\n"))


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.learning_rate=5", "train.learning_rate"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio"),
        ("train.gradient_accumulation_steps=0", "gradient_accumulation_steps"),
        ("eval.num_beams=0", "eval.num_beams"),
        ("hub.push=true", "hub.repo_id"),
    ],
)
def test_out_of_range_values(tmp_path, override, words):
    """Out-of-range values fail before any work, naming the key."""
    with pytest.raises(UserError, match=words):
        load_recipe(write(tmp_path, "data: {synthetic: {}}\n"), [override])


def test_malformed_yaml_names_line(tmp_path):
    """Malformed YAML names the file and line instead of a parser traceback."""
    with pytest.raises(UserError, match=r"r.yaml: line \d+, column \d+: malformed YAML"):
        load_recipe(write(tmp_path, "task: qa\ndata: [unclosed\n"))
    with pytest.raises(UserError, match="expected a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_round_trip_and_docs(tmp_path):
    """The resolved config written to config.yaml loads back to the same recipe; every field is documented."""
    r = load_recipe(
        write(tmp_path, "task: summarization\ndata: {synthetic: {num_train: 5}}\n"), ["train.max_steps=3"]
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(r)))
    assert load_recipe(path) == r
    docs = field_docs()
    assert "train.learning_rate" in docs and "data.synthetic.num_train" in docs
    import dataclasses

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            yield prefix + f.name

    assert all(k in docs for k in keys(Recipe))
