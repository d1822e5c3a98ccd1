"""Hostile and broken input beyond tests/test_bad_input.py: huge and deeply nested TOML, symlinks,
data files that change under a run, wrong encodings, NaN labels. Same contract: a clear `error: ...`,
exit code 2, no traceback, no run folder created or changed."""

from __future__ import annotations

import json
import time

import pytest
from conftest import make_sentiment_rows, run_cli, write_csv
from test_bad_input import assert_no_run_folder, assert_user_error, snapshot

from finetune.engine.recipe_file import load_recipe, parse_override
from finetune.errors import RecipeError

# ---------------------------------------------------------------------------
# recipes


def test_huge_recipe_is_refused_quickly(make_recipe, tmp_path):
    recipe = make_recipe()
    with open(recipe, "a") as fh:  # 50 MB: e.g. a data file saved as .toml
        fh.write(("# " + "x" * 1022 + "\n") * 50_000)
    started = time.perf_counter()
    result = run_cli("run", str(recipe))
    elapsed = time.perf_counter() - started
    assert_user_error(result, f"{recipe}: is 51.", "MB; a recipe is a few KB", "Is this a data file?")
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert_no_run_folder(tmp_path / "run")


def test_table_with_100k_keys_gives_a_short_error(make_recipe, tmp_path):
    recipe = make_recipe()
    with open(recipe, "a") as fh:
        fh.write("[hub]\n" + "".join(f"k{i} = {i}\n" for i in range(100_000)))  # ~1.2 MB: over the limit
    assert_user_error(run_cli("validate", str(recipe)), "MB; a recipe is a few KB")
    # under the size limit, 60,000 unknown keys: the first few errors, then a count, not 60,000 lines
    recipe = make_recipe(extra="[hub]\n" + "".join(f"k{i} = 1\n" for i in range(60_000)))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "hub.k0: unknown key" in message and "... and 59,990 more errors like these." in message
    assert len(message) < 3000, len(message)


@pytest.mark.parametrize("value", ["[" * 10_000 + "]" * 10_000, "{a = " * 10_000 + "1" + "}" * 10_000],
                         ids=["arrays", "inline-tables"])
def test_deeply_nested_values_are_refused_not_a_recursion_error(make_recipe, tmp_path, value):
    recipe = make_recipe(extra=f"[hub]\nrepo_id = {value}\n")
    started = time.perf_counter()
    result = run_cli("run", str(recipe))
    assert_user_error(result, "nested 10000 levels deep (the limit is 50)")
    assert time.perf_counter() - started < 20
    assert_no_run_folder(tmp_path / "run")
    with pytest.raises(RecipeError, match="nested more than 50 levels"):
        parse_override("train.epochs=" + value)


def test_nesting_within_the_limit_gets_a_short_type_error(make_recipe):
    recipe = make_recipe(extra="[hub]\nrepo_id = " + "[" * 40 + '"' + "x" * 200 + '"' + "]" * 40 + "\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "hub.repo_id: invalid value [[[[" in message and "characters)" in message  # repr cut short
    assert len(message) < 600


def test_brackets_inside_strings_and_comments_do_not_count_as_nesting(make_recipe):
    deep = "[" * 200
    recipe = make_recipe(extra=f'# {deep}\n[hub]\nrepo_id = "{deep}"\n')
    assert load_recipe(recipe).hub.repo_id == deep


# ---------------------------------------------------------------------------
# symlinks: followed (an ML data folder is often a farm of links), recorded resolved, dangling named

def test_data_symlink_outside_the_data_folder_is_followed_and_recorded_resolved(make_recipe, tmp_path):
    elsewhere = write_csv(tmp_path / "elsewhere" / "real.csv", make_sentiment_rows(40))
    link = tmp_path / "data" / "linked.csv"
    link.symlink_to(elsewhere)
    recipe = load_recipe(make_recipe(data=f'train = "{link}"'))
    assert recipe.data.train == str(elsewhere)  # the resolved recipe in the run folder says which file


def test_dangling_data_symlink_names_link_and_target(make_recipe, tmp_path):
    link = tmp_path / "data" / "gone.csv"
    link.symlink_to(tmp_path / "nowhere" / "gone.csv")
    result = run_cli("run", str(make_recipe()), "--set", "data.train=data/gone.csv")
    assert_user_error(result, f"data.train: {link} is a symbolic link to {tmp_path / 'nowhere' / 'gone.csv'}, "
                              "which does not exist")
    assert_no_run_folder(tmp_path / "run")


def test_dangling_symlink_read_by_a_plugin_is_named_too(tmp_path):
    from finetune.contract.tables import load_table
    from finetune.errors import DataError

    link = tmp_path / "x.csv"
    link.symlink_to(tmp_path / "missing.csv")
    with pytest.raises(DataError, match=r"data.eval: .*x.csv is a symbolic link to .*missing.csv, which does not"):
        load_table(link, key="data.eval")


# ---------------------------------------------------------------------------
# encodings and labels

def test_utf16_csv_is_named(make_recipe, sentiment_csv, tmp_path):
    sentiment_csv.write_bytes("text,label\ngood day,pos\nbad day,neg\n".encode("utf-16"))
    result = run_cli("run", str(make_recipe()))
    assert_user_error(result, f"data.train: {sentiment_csv} is not UTF-8 text: it starts with a UTF-16 "
                              "byte-order mark", "Save it as UTF-8")
    assert_no_run_folder(tmp_path / "run")


def test_latin1_csv_names_the_line(make_recipe, sentiment_csv, tmp_path):
    rows = make_sentiment_rows(20)
    rows[6]["text"] = "café was good"
    sentiment_csv.write_bytes(("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
                              .encode("latin-1"))
    result = run_cli("run", str(make_recipe()))
    assert_user_error(result, f"data.train: {sentiment_csv} is not UTF-8 text: line 8 has byte 0xe9",
                      "Latin-1", "Save it as UTF-8")
    assert_no_run_folder(tmp_path / "run")


def test_nan_and_null_labels_in_jsonl_name_the_lines(make_recipe, tmp_path):
    rows = [{"text": r["text"], "label": r["label"]} for r in make_sentiment_rows(20)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"text": "good day", "label": NaN}'
    lines[5] = '{"text": "bad day", "label": null}'
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = run_cli("run", str(make_recipe()), "--set", f"data.train={data}")
    assert_user_error(result, "2 row(s) have an empty data.label_column ('label')", "line(s) 3, 6")
    assert_no_run_folder(tmp_path / "run")


def test_float_labels_that_are_whole_numbers_are_integer_classes(make_recipe, sentiment_csv):
    from finetune.run.session import open_session

    rows = [{"text": r["text"], "label": "1.0" if r["label"] == "pos" else "0.0"} for r in make_sentiment_rows(40)]
    write_csv(sentiment_csv, rows)
    session = open_session(make_recipe())
    assert session.splits.info["labels"] == ["0", "1"]  # not the classes '0.0' and '1.0'
    assert session.task.state["integer_labels"] is True  # predictions give 0 / 1 back


# ---------------------------------------------------------------------------
# data files that change under a run

def test_data_changed_during_the_run_is_recorded(make_recipe, sentiment_csv, monkeypatch):
    from finetune.engine import loop
    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    real_train = loop.train

    def train_while_someone_edits_the_data(**kwargs):
        with open(sentiment_csv, "a") as fh:
            fh.write("an added row,pos\n")
        return real_train(**kwargs)

    monkeypatch.setattr(loop, "train", train_while_someone_edits_the_data)
    recorded = sentiment_csv.read_bytes()
    run = run_recipe(make_recipe(train="epochs = 1"), [], console=Console(enabled=False))
    info = run.info()
    assert info["status"] == "finished"
    fingerprint = info["data_files"]["data.train"]
    assert fingerprint["path"] == str(sentiment_csv) and fingerprint["size"] == len(recorded)
    import hashlib

    assert fingerprint["sha256"] == hashlib.sha256(recorded).hexdigest()
    assert info["data_changed_during_run"] == [
        f"data.train: {sentiment_csv} changed (size {len(recorded)} -> {len(recorded) + 17} bytes, different content)"]


def test_resume_on_changed_data_is_refused_naming_the_file(make_recipe, sentiment_csv, tmp_path):
    from finetune.engine.run_folder import RunDir
    from finetune.run.data_files import data_fingerprints

    recipe_path = make_recipe()
    recipe = load_recipe(recipe_path)
    run = RunDir(tmp_path / "run")  # an unfinished run (as a kill leaves it) that started on this data
    run.path.mkdir()
    (run.path / "recipe.toml").write_text(recipe.to_toml())
    (run.path / "run.json").write_text(json.dumps({"status": "interrupted",
                                                   "data_files": data_fingerprints(recipe.data)}))
    write_csv(sentiment_csv, make_sentiment_rows(160, seed=1))  # other rows, the same size
    before = snapshot(run.path)
    result = run_cli("run", str(recipe_path))
    assert_user_error(result, f"output.dir: {run.path} holds an unfinished run that started on other data",
                      f"data.train: {sentiment_csv} changed", "Restore the file(s) to resume", "--overwrite")
    assert snapshot(run.path) == before
