"""Recipes: typed sections, helpful errors for unknown keys / wrong types / bad YAML, --set overrides, the CLI."""

from __future__ import annotations

import copy

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_recipe
from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.recipe import Recipe, load_recipe, recipe_from_dict


def _error(tree: dict, overrides=()) -> str:
    with pytest.raises(LmforgeError) as info:
        recipe_from_dict(tree, "r.yaml", overrides)
    return str(info.value)


def _write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults and valid recipes


def test_empty_recipe_has_documented_defaults():
    r = recipe_from_dict({})
    assert r.name == "run"
    assert r.model.family == "gpt2" and r.model.size == "tiny"
    assert r.objective.name == "clm" and r.objective.block_size == 128
    assert r.train.lr == 5e-4 and r.train.batch_size == 32 and r.train.betas == (0.9, 0.999)
    assert r.data.sources == [] and r.data.validation_fraction == 0.05
    assert r.tokenizer.kind == "bpe" and r.tokenizer.vocab_size == 8000


def test_tiny_recipe_validates(corpus, tmp_path):
    r = recipe_from_dict(tiny_recipe(corpus, tmp_path / "run", "mlm"))
    assert r.objective.name == "mlm" and r.model.family == "bert"
    assert [s.domain for s in r.data.sources] == ["prose", "code"]
    assert r.data.sources[0].sample_by == "paragraph" and r.data.sources[0].format == "auto"


def test_empty_section_means_defaults(tmp_path):
    # `train:` with every key commented out is YAML null; it must not be a type error.
    path = _write(tmp_path, "train:\nmodel:\n  family: llama\n")
    r = load_recipe(path)
    assert r.train.lr == 5e-4 and r.model.family == "llama"
    assert load_recipe(path, ["train.lr=0.25"]).train.lr == 0.25


# ---------------------------------------------------------------- unknown keys and wrong types


def test_unknown_key_names_dotted_key_and_closest_valid_one():
    msg = _error({"train": {"lrr": 3e-4}})
    assert msg == "r.yaml: unknown key 'train.lrr'; did you mean 'lr'?"


def test_a_field_named_as_other_tools_name_it_points_at_ours():
    assert _error({"train": {"learning_rate": 3e-4}}) == "r.yaml: unknown key 'train.learning_rate'; did you mean 'lr'?"
    assert "did you mean 'grad_accum'?" in _error({"train": {"gradient_accumulation_steps": 2}})


def test_unknown_nested_key_in_source_list():
    msg = _error({"data": {"sources": [{"path": "a.txt"}, {"pth": "b.txt"}]}})
    # the 'Field required' error for 'path' is implied by the suggestion and left out
    assert msg == "r.yaml: unknown key 'data.sources[1].pth'; did you mean 'path'?"


def test_several_errors_are_reported_on_one_line():
    msg = _error({"train": {"lrr": 1, "batch_size": "x"}, "data": {"sources": [{"pth": "a"}, {}]}})
    assert "\n" not in msg
    parts = msg.split("; r.yaml: ")
    assert len(parts) == 4
    assert "unknown key 'data.sources[0].pth'; did you mean 'path'?" in msg
    assert "data.sources[1].path: Field required" in msg  # not a misspelling: still reported
    assert "train.batch_size: Input should be a valid integer" in msg and "(got 'x')" in msg
    assert "unknown key 'train.lrr'; did you mean 'lr'?" in msg


def test_unknown_top_level_section():
    assert _error({"trian": {"lr": 1.0}}) == "r.yaml: unknown key 'trian'; did you mean 'train'?"


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _error({"objective": {"zzzz": 1}})
    assert "unknown key 'objective.zzzz'; valid keys: name, block_size, mlm_probability" in msg


def test_wrong_type_names_field_and_value():
    msg = _error({"train": {"lr": "fast"}})
    assert msg.startswith("r.yaml: train.lr: Input should be a valid number")
    assert "(got 'fast')" in msg
    msg = _error({"train": {"batch_size": "lots"}})
    assert "train.batch_size" in msg and "(got 'lots')" in msg


def test_out_of_range_and_bad_choice():
    msg = _error({"train": {"batch_size": 0}})
    assert "train.batch_size: Input should be greater than or equal to 1 (got 0)" in msg
    msg = _error({"model": {"family": "gpt3"}})
    assert "model.family" in msg and "'gpt2'" in msg and "(got 'gpt3')" in msg
    msg = _error({"data": {"validation_fraction": 1.5}})
    assert "data.validation_fraction" in msg and "(got 1.5)" in msg


def test_model_needs_family_or_path():
    msg = _error({"model": {"family": None}})
    assert "set model.family (from scratch) or model.path (a local checkpoint)" in msg


# ---------------------------------------------------------------- --set overrides


def test_set_overrides_scalar_before_validation():
    r = recipe_from_dict({}, overrides=["train.lr=3e-4", "train.max_steps=7", "name=demo"])
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.train.max_steps == 7 and r.name == "demo"


def test_set_overrides_nested_list_items_and_structures():
    tree = {"data": {"sources": [{"path": "a.txt"}, {"path": "b.txt"}]}}
    r = recipe_from_dict(tree, overrides=["data.sources.1.domain=code", "data.sources.0.sample_by=line",
                                          "train.betas=[0.8, 0.95]", "train.grad_clip=null",
                                          "objective.name=mlm", "model.family=bert"])
    assert [(s.path, s.domain, s.sample_by) for s in r.data.sources] == [
        ("a.txt", "default", "line"), ("b.txt", "code", "paragraph")]
    assert r.train.betas == (0.8, 0.95) and r.train.grad_clip is None
    assert r.objective.name == "mlm" and r.model.family == "bert"


def test_set_does_not_mutate_callers_dict(corpus, tmp_path):
    tree = tiny_recipe(corpus, tmp_path / "run")
    before = copy.deepcopy(tree)
    recipe_from_dict(tree, overrides=["train.lr=0.5", "data.sources.0.domain=other"])
    assert tree == before


def test_set_overrides_are_validated_like_the_file():
    assert "unknown key 'train.lrr'; did you mean 'lr'?" in _error({}, ["train.lrr=1"])
    assert "train.lr" in _error({}, ["train.lr=fast"]) and "(got 'fast')" in _error({}, ["train.lr=fast"])


def test_a_bad_override_is_blamed_on_set_not_on_the_file():
    assert _error({}, ["train.lrr=1"]) == "--set train.lrr=1: unknown key 'train.lrr'; did you mean 'lr'?"
    assert _error({}, ["train.lr=fast"]).startswith("--set train.lr=fast: train.lr: ")
    msg = _error({"data": {"sources": [{"path": "a"}]}}, ["data.sources.0.formt=x"])
    assert msg == "--set data.sources.0.formt=x: unknown key 'data.sources[0].formt'; did you mean 'format'?"
    # the file's own mistakes are still the file's
    assert _error({"train": {"lrr": 1}}, ["train.lr=0.1"]) == "r.yaml: unknown key 'train.lrr'; did you mean 'lr'?"


def test_bad_set_syntax():
    assert _error({}, ["train.lr"]) == "--set 'train.lr': expected KEY=VALUE, e.g. train.lr=3e-4"
    msg = _error({"name": "x"}, ["name.first=1"])
    assert "'name' is not a section" in msg


def test_set_bad_list_index_is_a_user_error():
    tree = {"data": {"sources": [{"path": "a.txt"}]}}
    assert "'3' is not an index of a list of 1 item(s)" in _error(tree, ["data.sources.3.path=x"])
    assert "'first' is not an index of a list of 1 item(s)" in _error(tree, ["data.sources.first.path=x"])


# ---------------------------------------------------------------- files


def test_load_recipe_file_with_overrides(tmp_path):
    path = _write(tmp_path, "name: exp\ntrain:\n  lr: 0.001\n  max_steps: 5\n")
    r = load_recipe(path, ["train.lr=3e-4", "objective.block_size=64"])
    assert (r.name, r.train.lr, r.train.max_steps, r.objective.block_size) == ("exp", 3e-4, 5, 64)


def test_errors_name_the_recipe_file(tmp_path):
    path = _write(tmp_path, "train:\n  lrr: 1\n")
    with pytest.raises(LmforgeError, match=r"recipe\.yaml: unknown key 'train\.lrr'; did you mean 'lr'\?"):
        load_recipe(path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: x\ntrain:\n  lr: 0.1\n bad: indent\n")
    with pytest.raises(LmforgeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: line 4 invalid YAML:")
    path = _write(tmp_path, "name: x\ntrain:\n\tlr: 1\n", "tabs.yaml")
    with pytest.raises(LmforgeError, match=r"tabs\.yaml: line 3 invalid YAML"):
        load_recipe(path)


def test_recipe_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- train\n- model\n")
    with pytest.raises(LmforgeError, match="a recipe is a mapping of sections"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(LmforgeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: recipe file not found"


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "docs.txt").write_text("hello\n")
    path = _write(tmp_path / "sub", "data:\n  sources:\n    - path: docs.txt\n    - path: '*.md'\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    r = load_recipe(path)
    assert r.data.sources[0].path == str(tmp_path / "sub" / "docs.txt")
    assert r.data.sources[1].path == str(tmp_path / "sub" / "*.md")  # globs too


def test_to_yaml_round_trips():
    r = recipe_from_dict({"name": "rt", "train": {"lr": 0.01}, "data": {"sources": [{"path": "x.csv"}]}})
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r


# ---------------------------------------------------------------- CLI


def test_cli_recipe_show_prints_resolved_yaml(tmp_path):
    path = _write(tmp_path, "name: shown\ndata:\n  sources:\n    - path: a.jsonl\n")
    result = CliRunner().invoke(app, ["recipe", "show", str(path), "--set", "train.lr=3e-4",
                                      "--set", "data.sources.0.domain=code"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["name"] == "shown"
    assert shown["train"]["lr"] == 3e-4
    assert shown["train"]["batch_size"] == 32  # a default, filled in
    assert shown["data"]["sources"][0] == {"path": "a.jsonl", "domain": "code", "format": "auto",
                                           "text_column": "text", "sample_by": "paragraph", "split": None}
    assert set(shown) == set(Recipe.model_fields)


def test_cli_recipe_show_bad_recipe_exits_2_with_one_error_line(tmp_path):
    path = _write(tmp_path, "train:\n  lrr: 1\n")
    result = CliRunner().invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {path}: unknown key 'train.lrr'; did you mean 'lr'?"]


def test_cli_misspelt_required_key_and_several_errors_give_one_line(tmp_path):
    path = _write(tmp_path, "data:\n  sources:\n    - pth: a.txt\ntrain:\n  lr: fast\n")
    result = CliRunner().invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "did you mean 'path'?" in lines[0] and "train.lr" in lines[0] and "(got 'fast')" in lines[0]


def test_cli_recipe_show_missing_file_and_bad_set(tmp_path):
    result = CliRunner().invoke(app, ["recipe", "show", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'missing.yaml'}: recipe file not found"]
    path = _write(tmp_path, "name: x\n")
    result = CliRunner().invoke(app, ["recipe", "show", str(path), "--set", "train.lr"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --set 'train.lr': expected KEY=VALUE, e.g. train.lr=3e-4"]


def test_cli_recipe_fields_lists_every_field():
    result = CliRunner().invoke(app, ["recipe", "fields"])
    assert result.exit_code == 0
    assert "  train.lr = 0.0005  — Peak learning rate." in result.output
    assert "[data]" in result.output and "data.split_seed = 0" in result.output
