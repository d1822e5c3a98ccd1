"""The test split (data.test / data.test_split: scored once, with the selected adapter, never used for
selection) and `finetune evaluate RUN --input FILE` (finetune.run.evaluate)."""

from __future__ import annotations

import json

import pytest
from conftest import make_sentiment_rows, run_cli, write_csv
from fake_plugins import install_tagger, tagging_rows, write_jsonl

from finetune.engine.run_folder import RunDir
from finetune.errors import DataError, RecipeError
from finetune.run.session import open_session


@pytest.fixture
def test_csv(tmp_path):
    return write_csv(tmp_path / "data" / "test.csv", make_sentiment_rows(40, seed=7))


def test_the_test_file_is_scored_once_with_the_selected_adapter_and_evaluate_agrees(make_recipe, tmp_path,
                                                                                   test_csv):
    # eval_loss with "max" selects the worst evaluation: an early adapter, not the last one
    recipe = make_recipe(data=f'test = "{test_csv}"',
                         train='epochs = 3\nmetric = "eval_loss"\nmetric_mode = "max"\ncheckpoint_every_steps = 0')
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["best"]["step"] != metrics["last"]["step"], "precondition: the selected adapter is not the last"
    assert metrics["data"]["test_examples"] == 40
    tests = [r for r in run.read_metrics_log() if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["step"] == metrics["best"]["step"] == metrics["test"]["step"]
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "eval_loss"}
    assert "test (the selected adapter, scored once): " in result.stdout
    # the card says which split each number comes from
    card = run.card_file.read_text()
    header = next(line for line in card.splitlines() if line.startswith("| metric |"))
    assert "test" in header and "eval" in header
    assert f"| accuracy | {metrics['before']['accuracy']:.4f} | {metrics['best']['accuracy']:.4f} |" in card
    assert f"| {metrics['test']['accuracy']:.4f} |" in card
    assert "never used to select" in card and "selects the best checkpoint" in card
    # evaluate scores the run folder's adapter (the selected one) on the same file: the same numbers
    out = tmp_path / "scores.json"
    scored = run_cli("evaluate", str(run.path), "--input", str(test_csv), "--output", str(out))
    assert scored.returncode == 0, scored.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["examples"] == 40 and got["adapter_step"] == metrics["best"]["step"]
    for key in ("accuracy", "macro_f1", "eval_loss"):
        assert got["metrics"][key] == pytest.approx(metrics["test"][key], abs=1e-5), key
    assert set(got["details"]["per_class"]) == {"neg", "pos"}
    assert "accuracy" in scored.stdout and f"adapter of step {metrics['best']['step']}" in scored.stdout


def test_a_test_fraction_is_held_out_before_eval_and_never_overlaps(make_recipe, tmp_path):
    session = open_session(make_recipe(data="test_split = 0.25"), [])
    splits = session.splits
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (90, 30, 40)  # 160 -> 40 test, 30 eval
    assert splits.info["test_examples"] == 40
    train, eval_, test = (set(map(tuple, s[["text", "label"]].values.tolist()))
                          for s in (splits.train, splits.eval, splits.test))
    rows = {(r["text"], r["label"]) for r in make_sentiment_rows(160)}
    assert train | eval_ | test == rows and not (train & test) and not (eval_ & test)
    # the same seed holds out the same rows; another eval fraction leaves the test rows as they were
    again = open_session(make_recipe(data="test_split = 0.25\nsplit = 0.5", name="again.toml"), []).splits
    assert set(map(tuple, again.test[["text", "label"]].values.tolist())) == test


def test_test_keys_are_checked_before_anything_runs(make_recipe, tmp_path, test_csv):
    with pytest.raises(RecipeError, match=r"data.test_split is set together with data.test; keep one test split"):
        open_session(make_recipe(data=f'test = "{test_csv}"\ntest_split = 0.2'), [])
    with pytest.raises(RecipeError, match=r"data.test cannot be combined with data.dataset; name the test split "
                                          r"with data.dataset_test_split"):
        open_session(make_recipe(data=f'test = "{test_csv}"\ndataset = "{tmp_path}/x.csv"\ntrain = ""'), [])
    bad = write_csv(tmp_path / "data" / "bad.csv", [{"text": "great movie", "label": "pos"},
                                                   {"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=r"data.test: labels \['neutral'\] appear in .*bad.csv but never in training"):
        open_session(make_recipe(data=f'test = "{bad}"'), [])
    with pytest.raises(DataError, match=r"data.test: .*not found|data.test: .*does not exist"):
        open_session(make_recipe(data=f'test = "{tmp_path}/missing.csv"'), [])


def test_evaluate_reports_bad_input_clearly(make_recipe, tmp_path):
    recipe = make_recipe(train="epochs = 1")
    assert run_cli("run", str(recipe)).returncode == 0
    missing = run_cli("evaluate", str(tmp_path / "run"), "--input", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "--input: " in missing.stderr and "nope.csv not found" in missing.stderr
    unknown = write_csv(tmp_path / "u.csv", [{"text": "great", "label": "maybe"}])
    bad = run_cli("evaluate", str(tmp_path / "run"), "--input", str(unknown))
    assert bad.returncode == 2 and "--input: labels ['maybe'] appear in" in bad.stderr, bad.stderr
    no_label = write_csv(tmp_path / "n.csv", [{"text": "great"}])
    bad = run_cli("evaluate", str(tmp_path / "run"), "--input", str(no_label))
    assert bad.returncode == 2 and "column 'label' not found" in bad.stderr, bad.stderr
    assert "Traceback" not in missing.stderr + bad.stderr


def test_a_task_without_a_test_split_is_refused_not_silently_ignored(tmp_path, tiny_bert):
    site = install_tagger(tmp_path / "site")
    data = write_jsonl(tmp_path / "tags.jsonl", tagging_rows(32))
    recipe = tmp_path / "tag.toml"
    recipe.write_text(f'[task]\nname = "word-tagging"\n[model]\nbackbone = "{tiny_bert}"\n'
                      f'[data]\ntrain = "{data}"\ntest_split = 0.2\n')
    result = run_cli("validate", str(recipe), env={"PYTHONPATH": str(site)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.test_split: task 'word-tagging' (plugin 'tagger'" in result.stderr
    assert "does not read a test split" in result.stderr and "finetune evaluate RUN --input FILE" in result.stderr


def test_with_the_frozen_layer_cache_the_test_split_never_reads_the_eval_splits_cache(make_recipe, tmp_path):
    from transformers import AutoTokenizer

    recipe = make_recipe(data="test_split = 0.25")
    overrides = ["task.cache_frozen_layers=true", "peft.layers=[-1]"]
    session = open_session(recipe, overrides)
    tokenizer = AutoTokenizer.from_pretrained(session.backbone.path)
    eval_ds = session.task.build_dataset(session.splits.eval, tokenizer, training=False)
    test_ds = session.task.build_dataset(session.splits.test, tokenizer, training=False)
    eval_ids = {eval_ds[i]["example_id"] for i in range(len(eval_ds))}
    test_ids = {test_ds[i]["example_id"] for i in range(len(test_ds))}
    assert len(eval_ids) == len(eval_ds) and len(test_ids) == len(test_ds) and not eval_ids & test_ids
    # end to end: the test numbers equal a fresh evaluation of the same rows with the selected adapter
    result = run_cli("run", str(recipe), *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test_csv = tmp_path / "held-out.csv"
    session.splits.test.to_csv(test_csv, index=False)
    scored = run_cli("evaluate", str(tmp_path / "run"), "--input", str(test_csv), "--output", str(tmp_path / "s.json"))
    assert scored.returncode == 0, scored.stderr[-3000:]
    got = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert got["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-9)
    assert got["eval_loss"] == pytest.approx(metrics["test"]["eval_loss"], abs=1e-5)
