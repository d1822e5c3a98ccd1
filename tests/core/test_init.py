"""`finetune init DATA`: the probe, claim collection, ambiguity, --task, overwriting, a third-party claim,
the CLI, and the written recipe (it loads as a recipe; through the CLI it validates with a tiny backbone)."""

from __future__ import annotations

import tomllib

import pytest
from conftest import run_cli, write_csv
from fake_plugins import install_tagger, tagging_rows, write_jsonl

from finetune import Claim, DataError, DataProbe, PluginError, RecipeError, hookimpl
from finetune.engine.plugins import PluginRegistry, get_registry
from finetune.engine.recipe_file import load_recipe
from finetune.run.init import choose, init_recipe, sibling_splits, toml_value


def review_rows(n: int = 40, with_score: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        good = i % 2 == 0
        row = {"review": f"{'a lovely' if good else 'an awful'} stay number {i} with view of the harbour",
               "label": "pos" if good else "neg", "user": f"u{i // 4}"}
        if with_score:
            row["score"] = round(4.5 - (i % 7) * 0.61, 2)
        rows.append(row)
    return rows


# -- the probe ----------------------------------------------------------------------------------------------
def test_probe_summarises_a_table_once(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", review_rows())
    probe = DataProbe(path)
    table = probe.table
    assert table is probe.table  # cached: read once
    assert table.rows == 40 and not table.truncated
    review, label, user = (table.columns[c] for c in ("review", "label", "user"))
    assert review.kind == "text" and review.distinct == 40 and 9 <= review.mean_words <= 11
    assert "40 distinct values, mean" in review.describe()
    assert label.kind == "category" and label.distinct == 2
    assert probe.group_column(exclude=["review", "label"])[0] == "user"
    assert DataProbe(path, max_rows=10).table.truncated


def test_probe_columns_kinds(tmp_path):
    rows = [{"text": f"some words here {i}", "tags": "a,b" if i % 3 else "c", "value": i * 0.37,
             "file": f"img/{i}.jpg"} for i in range(30)]
    table = DataProbe(write_csv(tmp_path / "t.csv", rows)).table
    assert table.columns["tags"].multi_label_separator == ","
    assert table.columns["tags"].parts[","] == 3  # a, b, c
    assert table.columns["value"].kind == "number"
    assert DataProbe(write_csv(tmp_path / "i.csv", [{"row": i, "x": "a"} for i in range(30)])).table \
        .columns["row"].kind == "index"  # row numbers are no regression target
    assert table.columns["file"].kind == "path" and table.columns["file"].extensions == {".jpg": 30}
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}] * 3)
    assert DataProbe(chat).table.columns["messages"].kind == "chat"
    import pandas as pd

    pd.DataFrame({"text": [f"words {i} here" for i in range(6)], "labels": [["a", "b"], ["c"]] * 3}).to_parquet(
        tmp_path / "t.parquet")
    labels = DataProbe(tmp_path / "t.parquet").table.columns["labels"]  # numpy array cells read as lists
    assert labels.kind == "list" and labels.list_items == 3


def test_probe_tree_of_a_folder(tmp_path):
    for cls, n in (("cats", 3), ("dogs", 2)):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "pics" / cls / f"{i}.png").write_bytes(b"x")
    probe = DataProbe(tmp_path / "pics")
    assert probe.tree[""].subfolders == ["cats", "dogs"]
    assert probe.tree["cats"].files == {".png": 3}
    assert probe.files_under("", {".png"}) == 5 and probe.files_under("dogs", {".png"}) == 2
    assert probe.child("cats") is probe.child("cats")
    assert any("2 sub-folders, 5 files" in line for line in probe.describe())


# -- choosing among claims ----------------------------------------------------------------------------------
def _claim(task, score, plugin="p"):
    return Claim(task=task, score=score, reasons=[f"{task} reason"], plugin=plugin)


def test_choose_best_and_ambiguity(tmp_path):
    tasks = ["a", "b", "c"]
    best, others = choose([_claim("a", 0.9), _claim("b", 0.6)], None, tmp_path, tasks)
    assert best.task == "a" and [o.task for o in others] == ["b"]
    with pytest.raises(DataError) as err:
        choose([_claim("a", 0.75), _claim("b", 0.7)], None, tmp_path, tasks)
    assert "ambiguous" in str(err.value) and "--task a" in str(err.value) and "--task b" in str(err.value)
    with pytest.raises(DataError, match="no claim is sure"):
        choose([_claim("a", 0.45)], None, tmp_path, tasks)
    # --task picks among claims, even a weaker or ambiguous one
    assert choose([_claim("a", 0.75), _claim("b", 0.7)], "b", tmp_path, tasks)[0].task == "b"
    with pytest.raises(DataError, match="does not recognise"):
        choose([_claim("a", 0.9)], "c", tmp_path, tasks)
    with pytest.raises(RecipeError, match="did you mean 'text-classification'"):
        choose([_claim("a", 0.9)], "text-clasification", tmp_path, tasks + ["text-classification"])
    with pytest.raises(DataError, match="no installed plugin recognises"):
        choose([], None, tmp_path, tasks)


def test_claims_from_plugins_are_attributed_and_checked():
    class Good:
        @hookimpl
        def finetune_claim_data(self, probe):
            return [Claim(task="text-classification", score=1.7)]

    class Broken:
        @hookimpl
        def finetune_claim_data(self, probe):
            raise RuntimeError("boom")

    class Wrong:
        @hookimpl
        def finetune_claim_data(self, probe):
            return {"task": "x"}

    registry = PluginRegistry()
    registry.load_entry_points()
    registry.register_module(Good(), "good")
    probe = DataProbe("nowhere.csv")
    mine = [c for c in registry.claims(probe) if c.plugin == "good"]
    assert mine[0].score == 1.0  # clamped to 0..1
    registry.register_module(Broken(), "broken")
    with pytest.raises(PluginError, match="plugin 'broken' raised in finetune_claim_data: RuntimeError: boom"):
        registry.claims(probe)
    registry = PluginRegistry()
    registry.register_module(Wrong(), "wrong")
    with pytest.raises(PluginError, match="plugin 'wrong', finetune_claim_data: returned"):
        registry.claims(probe)


# -- writing the recipe -------------------------------------------------------------------------------------
def test_init_writes_a_recipe_that_loads_with_relative_paths(tmp_path):
    data = write_csv(tmp_path / "data" / "reviews_train.csv", review_rows())
    write_csv(tmp_path / "data" / "reviews_val.csv", review_rows(10))
    out = tmp_path / "recipes" / "reviews.toml"
    said = []
    path = init_recipe(data, out, echo=said.append)
    text = out.read_text()
    recipe = tomllib.loads(text)
    assert recipe["task"]["name"] == "text-classification"
    assert recipe["data"]["train"] == "../data/reviews_train.csv"
    assert recipe["data"]["eval"] == "../data/reviews_val.csv"  # the sibling file, not a split
    assert "split" not in recipe["data"] and recipe["data"]["text_column"] == "review"
    assert "# " in text and "looks like text" in text
    assert any("column `review` looks like text: 40 distinct values" in line for line in said)
    loaded = load_recipe(path, [], get_registry().get_task)  # the schema accepts every key written
    assert loaded.data.label_column == "label"
    # never overwritten without --force
    with pytest.raises(RecipeError, match="exists; finetune init never overwrites"):
        init_recipe(data, out, echo=said.append)
    out.write_text("# mine\n")
    init_recipe(data, out, force=True, echo=said.append)
    assert out.read_text().startswith("# Written by `finetune init")


def test_init_grouped_split_and_task_choice(tmp_path):
    data = write_csv(tmp_path / "reviews.csv", review_rows(with_score=True))
    with pytest.raises(DataError) as err:  # a label and a numeric target: which one?
        init_recipe(data, tmp_path / "r.toml", echo=lambda _: None)
    assert "--task text-classification" in str(err.value) and "--task text-regression" in str(err.value)
    assert not (tmp_path / "r.toml").exists()
    init_recipe(data, tmp_path / "r.toml", task="text-regression", echo=lambda _: None)
    recipe = tomllib.loads((tmp_path / "r.toml").read_text())
    assert recipe["data"]["target_column"] == "score" and recipe["data"]["group_column"] == "user"
    assert recipe["data"]["split"] == 0.2


def test_sibling_splits_and_toml_values(tmp_path):
    for name in ("x_train.csv", "x_dev.csv", "x_test.csv"):
        (tmp_path / name).write_text("a\n1\n")
    assert sibling_splits(tmp_path / "x_train.csv") == {"eval": tmp_path / "x_dev.csv", "test": tmp_path / "x_test.csv"}
    assert sibling_splits(tmp_path / "x_dev.csv") == {}
    assert toml_value({"exact-number": 1.0, "a b": [1, "q\""]}) == '{ exact-number = 1.0, "a b" = [1, "q\\""] }'
    assert toml_value(0.0005) == "5e-4" and toml_value(2.5e-5) == "2.5e-5" and toml_value(0.2) == "0.2"
    assert tomllib.loads(f"v = {toml_value(0.0005)}")["v"] == 0.0005


# -- the CLI ------------------------------------------------------------------------------------------------
def test_cli_init_third_party_task_validates(tmp_path, tiny_bert):
    """A plugin installed as a third party claims its own made-up format; init writes and validates it."""
    site = install_tagger(tmp_path / "site")
    data = write_jsonl(tmp_path / "words.wtag", tagging_rows(24))
    out = tmp_path / "made" / "tagging.toml"
    env = {"PYTHONPATH": f"{site}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    result = run_cli("init", str(data), "-o", str(out), "--backbone", str(tiny_bert), env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "task: word-tagging (plugin tagger, score 0.95)" in result.stdout
    assert "recipe is valid" in result.stdout + result.stderr
    assert f"next: finetune run {out}" in result.stdout
    assert tomllib.loads(out.read_text())["data"]["train"] == "../words.wtag"
    again = run_cli("init", str(data), "-o", str(out), "--no-validate", env=env)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_cli_init_refuses_ambiguous_and_unknown(tmp_path):
    data = write_csv(tmp_path / "reviews.csv", review_rows(with_score=True))
    result = run_cli("init", str(data), "-o", str(tmp_path / "r.toml"), "--no-validate")
    assert result.returncode == 2 and "ambiguous data" in result.stderr and "--task text-regression" in result.stderr
    missing = run_cli("init", str(tmp_path / "nope.csv"), "--no-validate")
    assert missing.returncode == 2 and "DATA: not found" in missing.stderr
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")
    unknown = run_cli("init", str(tmp_path / "notes.bin"), "--no-validate", cwd=tmp_path)
    assert unknown.returncode == 2 and "no installed plugin recognises" in unknown.stderr
    assert not list(tmp_path.glob("*.toml"))
