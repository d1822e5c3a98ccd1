"""Recipe TOML -> typed Recipe: defaults, path resolution, --set overrides and error messages."""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli

from finetune.contract.recipe import DataOptions, PeftSection, TaskOptions, TrainSection
from finetune.engine.plugins import reset_registry
from finetune.engine.recipe_file import apply_overrides, load_recipe, parse_override
from finetune.errors import RecipeError

# A backbone string that is not a folder: recipe validation never resolves the backbone.
BACKBONE = "org/some-model"


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Every test sees only the installed plugins (no FINETUNE_PLUGINS from the outside world)."""
    monkeypatch.delenv("FINETUNE_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()


def write_recipe(folder: Path, sections: dict[str, str] | None = None, *, name: str = "recipe.toml",
                 raw: str | None = None) -> Path:
    """Write a recipe: a minimal valid one, with ``sections`` replacing/adding whole section bodies."""
    body = {
        "task": 'name = "text-classification"',
        "model": f'backbone = "{BACKBONE}"',
        "data": 'train = "data/train.csv"',
    }
    body.update(sections or {})
    text = raw if raw is not None else "\n".join(
        f"[{section}]\n{textwrap.dedent(content).strip()}\n"
        for section, content in body.items() if content is not None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def recipe_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------
# parsing into the typed Recipe

def test_minimal_recipe_fills_core_and_plugin_defaults(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, name="sentiment.toml"))
    # core defaults
    assert recipe.train.epochs == 3
    assert recipe.train.learning_rate == pytest.approx(5e-4)
    assert recipe.train.mixed_precision == "auto"
    assert recipe.peft.r == 8 and recipe.peft.alpha == 16 and recipe.peft.target_modules == "auto"
    assert recipe.data.split == pytest.approx(0.2) and recipe.data.eval is None
    assert recipe.hub.push is False
    # plugin (text-classification) options are typed and defaulted too
    assert type(recipe.data).__name__ == "TextClassificationData"
    assert isinstance(recipe.data, DataOptions) and isinstance(recipe.task, TaskOptions)
    assert recipe.data.text_column == "text" and recipe.data.label_column == "label"
    assert recipe.data.max_length == 128
    assert recipe.task.baseline is True
    # default output folder: runs/<recipe file stem> beside the recipe
    assert recipe.output.dir == str(tmp_path.resolve() / "runs" / "sentiment")
    assert recipe.source == (tmp_path / "sentiment.toml").resolve()
    assert recipe.model.backbone == BACKBONE  # a Hub id is left alone


def test_values_are_typed(tmp_path):
    path = write_recipe(tmp_path, {
        "task": 'name = "text-classification"\nbaseline = false',
        "data": 'train = "t.csv"\ntext_column = "sentence"\nmax_length = 64\nlimit = 10',
        "peft": 'r = 4\ntarget_modules = ["query", "value"]',
        "train": 'epochs = 1\nlearning_rate = 1e-3\nlr_scheduler = "cosine"\nmax_grad_norm = 0.5',
    })
    recipe = load_recipe(path)
    assert recipe.task.baseline is False
    assert recipe.data.text_column == "sentence" and recipe.data.max_length == 64 and recipe.data.limit == 10
    assert isinstance(recipe.peft, PeftSection) and recipe.peft.r == 4
    assert recipe.peft.target_modules == ["query", "value"]
    assert isinstance(recipe.train, TrainSection)
    assert recipe.train.epochs == 1 and recipe.train.learning_rate == pytest.approx(1e-3)
    assert recipe.train.lr_scheduler == "cosine" and recipe.train.max_grad_norm == pytest.approx(0.5)


def test_relative_paths_resolve_against_recipe_folder_not_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    path = write_recipe(folder, {
        "data": 'train = "data/train.csv"\neval = "data/eval.csv"',
        "output": 'dir = "out/run1"',
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path)
    base = folder.resolve()
    assert recipe.data.train == str(base / "data" / "train.csv")
    assert recipe.data.eval == str(base / "data" / "eval.csv")  # an optional path field resolves too
    assert recipe.output.dir == str(base / "out" / "run1")


def test_every_shipped_recipe_writes_its_run_under_the_repos_runs_folder(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)  # resolved against the recipe's folder, wherever it is run from
    recipes = sorted((repo / "recipes").glob("*.toml"))
    assert len(recipes) >= 5
    for path in recipes:
        out = Path(load_recipe(path).output.dir)
        assert out.parent == repo / "runs" and out.name == path.stem, f"{path.name}: output.dir is {out}"


def test_absolute_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    absolute = tmp_path / "abs" / "train.csv"
    path = write_recipe(tmp_path / "p", {"data": f'train = "{absolute}"\neval = "~/eval.csv"'})
    recipe = load_recipe(path)
    assert recipe.data.train == str(absolute)
    assert recipe.data.eval == str(tmp_path / "home" / "eval.csv")


def test_backbone_folder_beside_recipe_is_resolved(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "models" / "mine").mkdir(parents=True)
    (folder / "models" / "mine" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # "models/mine" does not exist relative to the cwd
    recipe = load_recipe(write_recipe(folder, {"model": 'backbone = "models/mine"'}))
    assert recipe.model.backbone == str((folder / "models" / "mine").resolve())


def test_backbone_written_as_relative_path_is_resolved_even_if_missing(tmp_path):
    folder = tmp_path / "project"
    recipe = load_recipe(write_recipe(folder, {"model": 'backbone = "./models/missing"'}))
    # resolved, so a later "not an existing folder" error shows the real place looked at
    assert recipe.model.backbone == str((folder / "models" / "missing").resolve())


def test_resolved_recipe_round_trips(tmp_path):
    path = write_recipe(tmp_path / "a", {
        "data": 'train = "data/train.csv"\neval = "data/eval.csv"\ntext_column = "sentence"',
        "peft": 'target_modules = ["query", "value"]',
        "train": "epochs = 2\nlearning_rate = 1e-4",
    })
    recipe = load_recipe(path)
    text = recipe.to_toml()
    parsed = tomllib.loads(text)
    assert parsed == recipe.to_dict()
    assert parsed["train"]["learning_rate"] == pytest.approx(1e-4)
    assert parsed["data"]["eval"] == str((tmp_path / "a" / "data" / "eval.csv").resolve())
    assert "eval_batch_size" not in parsed["train"]  # None values are dropped, not written as strings
    # the resolved recipe, saved in another folder, loads to exactly the same recipe
    again = load_recipe(write_recipe(tmp_path / "b", raw=text))
    assert again.to_dict() == recipe.to_dict()
    assert again.to_toml() == text


def test_utf8_bom_is_tolerated(tmp_path):
    path = write_recipe(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_recipe(path).task.name == "text-classification"


# ---------------------------------------------------------------------------
# --set overrides

@pytest.mark.parametrize(("item", "keys", "value"), [
    ("train.learning_rate=1e-4", ["train", "learning_rate"], 1e-4),
    ("train.epochs=5", ["train", "epochs"], 5),
    ("train.tensorboard=true", ["train", "tensorboard"], True),
    ("data.text_column=sentence", ["data", "text_column"], "sentence"),
    ('data.text_column="42"', ["data", "text_column"], "42"),
    ("output.dir=runs/new-name", ["output", "dir"], "runs/new-name"),
    ('peft.target_modules=["query", "value"]', ["peft", "target_modules"], ["query", "value"]),
    ("peft.target_modules=[1, 2]", ["peft", "target_modules"], [1, 2]),
    (" train.metric = macro_f1 ", ["train", "metric"], "macro_f1"),
    ("data.text_column=a=b", ["data", "text_column"], "a=b"),
    ("train.metric=", ["train", "metric"], ""),
])
def test_parse_override_parses_toml_literals_with_string_fallback(item, keys, value):
    parsed_keys, parsed_value = parse_override(item)
    assert parsed_keys == keys
    assert parsed_value == value
    assert type(parsed_value) is type(value)


@pytest.mark.parametrize(("item", "expected"), [
    ("foo", "expected KEY=VALUE"),
    ("train.epochs", "expected KEY=VALUE"),
    ("train=1", "must be SECTION.KEY"),
    ("=1", "must be SECTION.KEY"),
    (".epochs=1", "must be SECTION.KEY"),
])
def test_parse_override_rejects_bad_forms(item, expected):
    with pytest.raises(RecipeError) as info:
        parse_override(item)
    message = str(info.value)
    assert expected in message
    assert repr(item) in message  # names what the user typed
    assert "train.learning_rate=1e-4" in message or "train.epochs" in message  # shows an example


def test_apply_overrides_does_not_mutate_input_and_refuses_values_as_sections():
    raw = {"data": {"train": "x.csv"}}
    out = apply_overrides(raw, ["data.split=0.3", "train.epochs=1"])
    assert out == {"data": {"train": "x.csv", "split": 0.3}, "train": {"epochs": 1}}
    assert raw == {"data": {"train": "x.csv"}}
    with pytest.raises(RecipeError, match=r"'train' is a value, not a section"):
        apply_overrides(raw, ["data.train.x=1"])


def test_overrides_are_applied_typed_and_resolved(tmp_path):
    path = write_recipe(tmp_path)
    recipe = load_recipe(path, ["train.learning_rate=1e-4", "data.text_column=sentence",
                                'peft.target_modules=["query"]', "data.eval=data/eval.csv", "train.epochs=7"])
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.train.epochs == 7
    assert recipe.data.text_column == "sentence"
    assert recipe.peft.target_modules == ["query"]
    assert recipe.data.eval == str((tmp_path / "data" / "eval.csv").resolve())
    assert tomllib.loads(recipe.to_toml())["train"]["learning_rate"] == pytest.approx(1e-4)


def test_override_unknown_key_gets_did_you_mean(tmp_path):
    message = recipe_error(write_recipe(tmp_path), ["train.lerning_rate=1e-4"])
    assert "train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in message
    assert "Valid keys in [train]:" in message
    assert "--set train.lerning_rate=1e-4" in message  # says where the bad key came from


def test_override_unknown_section_gets_did_you_mean(tmp_path):
    message = recipe_error(write_recipe(tmp_path), ["trian.epochs=1"])
    assert "[trian]: unknown section (did you mean 'train'?)" in message


def test_override_bad_value_is_validated(tmp_path):
    message = recipe_error(write_recipe(tmp_path), ["train.epochs=zero"])
    assert "train.epochs: invalid value 'zero' (str)" in message
    assert "integer" in message


# ---------------------------------------------------------------------------
# errors in the recipe file

def test_malformed_toml_reports_file_line_and_column(tmp_path):
    path = write_recipe(tmp_path, raw='[task]\nname = "text-classification"\n[model]\nbackbone = "x\n')
    message = recipe_error(path)
    assert str(path.resolve()) in message
    assert "malformed TOML" in message
    assert "line 4" in message and "column" in message


def test_duplicate_key_is_a_toml_error(tmp_path):
    path = write_recipe(tmp_path, {"train": "epochs = 1\nepochs = 2"})
    message = recipe_error(path)
    assert "malformed TOML" in message and "line" in message


def test_recipe_file_not_found_and_folder(tmp_path):
    assert "recipe file not found" in recipe_error(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in recipe_error(tmp_path / "nope.toml")
    assert "is a folder" in recipe_error(tmp_path)


def test_unknown_section_did_you_mean(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"trian": "epochs = 1"}))
    assert message.startswith("[trian]: unknown section (did you mean 'train'?)")
    assert "Valid sections: task, model, data, peft, train, distributed, output, hub, track, sweep." in message
    assert str((tmp_path / "recipe.toml").resolve()) in message  # names the file


def test_unknown_key_did_you_mean_and_valid_keys(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"train": "lerning_rate = 1e-4"}))
    assert "train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in message
    valid = message.split("Valid keys in [train]:", 1)[1]
    for key in ("epochs", "batch_size", "learning_rate", "seed"):
        assert key in valid


def test_unknown_key_without_close_match_still_lists_keys(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"peft": "zzzz = 1"}))
    assert "peft.zzzz: unknown key." in message
    assert "did you mean" not in message
    assert "Valid keys in [peft]: method, r, alpha, dropout" in message


@pytest.mark.parametrize(("section", "line", "key", "shown", "expectation"), [
    ("train", 'epochs = "three"', "train.epochs", "'three' (str)", "valid integer"),
    ("peft", "r = -1", "peft.r", "-1 (int)", "greater than 0"),
    ("data", 'train = "t.csv"\nsplit = 1.5', "data.split", "1.5 (float)", "less than 1"),
    ("train", 'mixed_precision = "fp8"', "train.mixed_precision", "'fp8' (str)", "'bf16'"),
    ("train", "learning_rate = 0", "train.learning_rate", "0 (int)", "greater than 0"),
    ("track", "wandb_mode = \"cloud\"", "track.wandb_mode", "'cloud' (str)", "'offline'"),
    ("peft", "target_modules = 5", "peft.target_modules", "5 (int)", "string"),
    ("model", "backbone = 3", "model.backbone", "3 (int)", "string"),
])
def test_wrong_types_name_key_path_and_value(tmp_path, section, line, key, shown, expectation):
    message = recipe_error(write_recipe(tmp_path, {section: line}))
    assert message.startswith("invalid recipe:")
    assert f"{key}: invalid value {shown}" in message
    assert expectation in message
    assert message.count(f"{key}:") == 1  # one line per key even for union types


def test_all_invalid_values_are_reported_at_once(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"train": 'epochs = "three"', "peft": "r = -1"}))
    assert "train.epochs" in message and "peft.r" in message


def test_section_that_is_not_a_table(tmp_path):
    path = write_recipe(tmp_path, raw='train = 3\n[task]\nname = "text-classification"\n'
                                      '[model]\nbackbone = "x"\n[data]\ntrain = "t.csv"\n')
    message = recipe_error(path)
    assert "train: expected a [train] table, got int 3" in message


def test_missing_required_key(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"data": 'split = 0.3'}))
    assert "data.train: required key is missing" in message
    assert "add it under [data]" in message
    assert "Training table: a .csv" in message  # says what the key is for, for this task


def test_missing_required_section(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"model": None}))
    assert message.startswith("[model]: required section is missing")
    assert "backbone" in message


def test_missing_task_name(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"task": "baseline = true"}))
    assert message.startswith("task.name: required key is missing")
    assert 'name = "text-classification"' in message
    assert "finetune tasks" in message


def test_task_name_of_wrong_type(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"task": "name = 1"}))
    assert "task.name: invalid value 1 (int)" in message
    assert "required key is missing" not in message


def test_unknown_task_lists_available_with_did_you_mean(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"task": 'name = "text-clasification"'}))
    assert "task.name: unknown task 'text-clasification' (did you mean 'text-classification'?)" in message
    assert re.search(r"Available tasks: [^.]*\btext-classification\b", message)  # other plugins may add more
    assert "finetune tasks" in message


def test_unknown_task_without_close_match(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"task": 'name = "quantum-knitting"'}))
    assert "unknown task 'quantum-knitting'." in message
    assert "did you mean" not in message
    assert "Available tasks: " in message and "text-classification" in message.split("Available tasks: ")[1]


# ---------------------------------------------------------------------------
# plugin-declared options get the same treatment

def test_plugin_data_option_typo_did_you_mean(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"data": 'train = "t.csv"\ntext_colum = "sentence"'}))
    assert "data.text_colum: unknown key (did you mean 'text_column'?)" in message
    valid = message.split("Valid keys in [data]:", 1)[1]
    for key in ("train", "eval", "split", "text_column", "label_column", "max_length", "text_pair_column"):
        assert key in valid


def test_plugin_task_option_typo_did_you_mean(tmp_path):
    message = recipe_error(write_recipe(tmp_path, {"task": 'name = "text-classification"\nbasline = false'}))
    assert "task.basline: unknown key (did you mean 'baseline'?)" in message
    assert "Valid keys in [task]: name, baseline, cache_frozen_layers, last_layer_cls_only, pooling." in message


@pytest.mark.parametrize(("section", "line", "key", "expectation"), [
    ("data", 'train = "t.csv"\nmax_length = 0', "data.max_length: invalid value 0 (int)", "greater than 0"),
    ("data", 'train = "t.csv"\nmax_length = 100000', "data.max_length: invalid value 100000 (int)",
     "less than or equal to 8192"),
    ("data", 'train = "t.csv"\nmax_length = "long"', "data.max_length: invalid value 'long' (str)", "integer"),
    ("data", 'train = "t.csv"\ntext_column = 3', "data.text_column: invalid value 3 (int)", "string"),
    ("task", 'name = "text-classification"\nbaseline = "maybe"', "task.baseline: invalid value 'maybe' (str)",
     "boolean"),
])
def test_plugin_option_wrong_values(tmp_path, section, line, key, expectation):
    message = recipe_error(write_recipe(tmp_path, {section: line}))
    assert key in message
    assert expectation in message


def test_plugin_option_via_set_is_validated(tmp_path):
    message = recipe_error(write_recipe(tmp_path), ["data.text_colum=sentence"])
    assert "data.text_colum: unknown key (did you mean 'text_column'?)" in message


# ---------------------------------------------------------------------------
# through the CLI: clean message, exit code 2, no run folder

def test_cli_recipe_error_is_clean_and_writes_nothing(tmp_path):
    path = write_recipe(tmp_path, {"train": "lerning_rate = 1e-4", "output": 'dir = "out"'})
    result = run_cli("run", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid recipe:")
    assert "did you mean 'learning_rate'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]


def test_cli_bad_set_is_clean(tmp_path):
    path = write_recipe(tmp_path, {"output": 'dir = "out"'})
    for args, expected in ((["--set", "foo"], "expected KEY=VALUE"),
                           (["--set", "train.lerning_rate=1"], "did you mean 'learning_rate'")):
        result = run_cli("validate", str(path), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error:") and expected in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_malformed_toml(tmp_path):
    path = write_recipe(tmp_path, raw="[task]\nname = text-classification\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "line 2" in result.stderr and "column" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
