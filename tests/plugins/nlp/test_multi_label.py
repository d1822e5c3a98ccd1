"""multi-label-classification (finetune_nlp.multi_label): label formats, errors naming file and row,
threshold tuning, metrics, and a tiny run through the CLI (run, predict, evaluate, plain peft)."""

from __future__ import annotations

import csv
import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import NEGATIVE, NEUTRAL, POSITIVE, assert_resume_equals_uninterrupted, run_cli, write_csv

from finetune import multilabel_metrics, parse_labels, tune_thresholds
from finetune.engine.run_folder import RunDir
from finetune.errors import DataError
from finetune.run.inference import load_run
from finetune.run.session import open_session


def tagged_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts with 0-2 positive and 0-2 negative words: labels "pos" and/or "neg" (or none)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos, neg = i % 2, (i // 2) % 2  # every combination, none included
        words = rng.sample(POSITIVE, pos * 2) + rng.sample(NEGATIVE, neg * 2) + rng.sample(NEUTRAL, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": ["pos"] * pos + ["neg"] * neg})
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path




def recipe_file(tmp_path, tiny_bert, train, *, data="", train_section="", name="recipe.toml", out="run", epochs=2):
    path = tmp_path / name
    path.write_text(f"""
[task]
name = "multi-label-classification"
[model]
backbone = "{tiny_bert}"
[data]
train = "{train}"
split = 0.25
max_length = 16
{data}
[peft]
r = 4
alpha = 8
[train]
epochs = {epochs}
batch_size = 16
learning_rate = 1e-2
mixed_precision = "no"
log_every_steps = 2
checkpoint_every_steps = 0
seed = 0
{train_section}
[output]
dir = "{tmp_path / out}"
""")
    return path


# -- data --------------------------------------------------------------
def test_parse_labels_takes_lists_json_text_and_delimited_strings():
    assert parse_labels(["b", "a", "b"], ",") == ["b", "a"]
    assert parse_labels([], ",") == []
    assert parse_labels('["sports", "politics"]', ",") == ["sports", "politics"]
    assert parse_labels("[]", ",") == []
    assert parse_labels("sports, politics", ",") == ["sports", "politics"]
    assert parse_labels("sports|politics", "|") == ["sports", "politics"]
    assert parse_labels("sports", ",") == ["sports"]
    assert parse_labels([1, 2.0], ",") == ["1", "2"]
    assert parse_labels(3, ",") == ["3"]
    for bad in ("", "  ", None, float("nan"), "[1, 2", "[[1]]", [["a"]]):
        with pytest.raises(ValueError):
            parse_labels(bad, ",")


def test_jsonl_lists_and_csv_json_strings_read_the_same(tmp_path, tiny_bert):
    rows = tagged_rows(40)
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    as_csv = write_csv(tmp_path / "train.csv", [{"text": r["text"], "labels": json.dumps(r["labels"])}
                                                   for r in rows])
    a = open_session(recipe_file(tmp_path, tiny_bert, jsonl, name="a.toml"), []).splits
    b = open_session(recipe_file(tmp_path, tiny_bert, as_csv, name="b.toml"), []).splits
    assert a.info["labels"] == b.info["labels"] == ["neg", "pos"]
    assert a.info["train_label_counts"] == b.info["train_label_counts"]
    assert a.train["labels"].tolist() == b.train["labels"].tolist()
    assert [] in a.train["labels"].tolist() and ["pos", "neg"] in a.train["labels"].tolist()
    assert a.info["train_rows_without_label"] > 0
    assert (len(a.train), len(a.eval)) == (30, 10)


def test_delimited_labels_and_the_delimiter_option(tmp_path, tiny_bert):
    rows = tagged_rows(40)
    comma = write_csv(tmp_path / "comma.csv", [{"text": r["text"], "labels": ",".join(r["labels"]) or "[]"}
                                                 for r in rows])
    pipe = write_csv(tmp_path / "pipe.csv", [{"text": r["text"], "labels": " | ".join(r["labels"]) or "[]"}
                                               for r in rows])
    a = open_session(recipe_file(tmp_path, tiny_bert, comma, name="a.toml"), []).splits
    b = open_session(recipe_file(tmp_path, tiny_bert, pipe, data='label_delimiter = "|"', name="b.toml"), []).splits
    assert a.train["labels"].tolist() == b.train["labels"].tolist()
    assert a.info["labels"] == b.info["labels"] == ["neg", "pos"]
    # with the default delimiter the pipe-separated string is one label of its own
    c = open_session(recipe_file(tmp_path, tiny_bert, pipe, name="c.toml"), []).splits
    assert "pos | neg" in c.info["labels"]


def test_unknown_labels_empty_texts_and_bad_label_cells_name_the_file_and_row(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", tagged_rows(40))
    eval_rows = tagged_rows(8, seed=1)
    eval_rows[5]["labels"] = ["pos", "sports"]
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    with pytest.raises(DataError, match=r"data.eval: labels \['sports'\] appear in .*eval.jsonl .*line\(s\) 6"):
        open_session(recipe_file(tmp_path, tiny_bert, train, data=f'eval = "{bad_eval}"'), [])
    bad_test = write_jsonl(tmp_path / "test.jsonl", eval_rows)
    with pytest.raises(DataError, match=r"data.test: labels \['sports'\] appear in .*test.jsonl .*line\(s\) 6"):
        open_session(recipe_file(tmp_path, tiny_bert, train, data=f'test = "{bad_test}"', name="t.toml"), [])
    rows = tagged_rows(40)
    rows[3]["text"] = " "
    empty = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataError, match=r"data.train: .*empty.jsonl: 1 row\(s\) have an empty data.text_column "
                                        r".*line\(s\) 4"):
        open_session(recipe_file(tmp_path, tiny_bert, empty, name="e.toml"), [])
    table = [{"text": r["text"], "labels": json.dumps(r["labels"])} for r in tagged_rows(40)]
    table[6]["labels"] = '["pos", '
    broken = write_csv(tmp_path / "broken.csv", table)
    with pytest.raises(DataError, match=r"data.train: .*broken.csv: data.label_column \('labels'\) on line\(s\) 8: "
                                        r".*not one"):
        open_session(recipe_file(tmp_path, tiny_bert, broken, name="b.toml"), [])
    nothing = write_jsonl(tmp_path / "none.jsonl", [{"text": r["text"], "labels": []} for r in tagged_rows(20)])
    with pytest.raises(DataError, match="no row of the training data"):
        open_session(recipe_file(tmp_path, tiny_bert, nothing, name="n.toml"), [])


# -- thresholds and metrics ---------------------------------------------
def test_metrics_on_a_hand_computed_case():
    refs = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]])
    m = multilabel_metrics(pred, refs, ["a", "b", "c"])
    # a: tp 2; b: tp 1, fn 1; c: fp 1, fn 1  -> micro: tp 3, fp 1, fn 2 -> 6 / 9
    assert m["micro_f1"] == pytest.approx(6 / 9)
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert m["subset_accuracy"] == pytest.approx(2 / 4)  # rows 2 and 4 exactly right
    assert m["per_label"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_label"]["c"]["f1"] == 0.0 and m["per_label"]["c"]["support"] == 1


def test_threshold_tuning_finds_a_better_threshold_than_one_half():
    # label 0: positives score 0.3-0.4, negatives 0.1-0.2 -> 0.5 finds none, 0.25 finds all
    # label 1: well separated around 0.5 -> stays at 0.5 (ties go to the threshold nearest 0.5)
    # label 2: no positive at all -> a threshold that predicts nothing
    probs = np.array([[0.3, 0.9, 0.6], [0.4, 0.8, 0.2], [0.1, 0.1, 0.3], [0.2, 0.2, 0.1]])
    refs = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=bool)
    t = tune_thresholds(probs, refs)
    assert 0.2 < t[0] <= 0.3
    assert t[1] == 0.5
    assert t[2] > 0.6
    tuned = multilabel_metrics(probs >= np.array(t), refs, ["a", "b", "c"])
    fixed = multilabel_metrics(probs >= 0.5, refs, ["a", "b", "c"])
    assert tuned["micro_f1"] == 1.0 and tuned["subset_accuracy"] == 1.0
    assert fixed["micro_f1"] < tuned["micro_f1"]


def test_compute_metrics_tunes_on_the_eval_split_only(tmp_path, tiny_bert):
    """The eval split's predictions (``task.evaluating == "eval"``, as the core sets it) tune the thresholds
    (kept in state); others (the test split, `finetune evaluate --input`) are scored with those already chosen."""
    train = write_jsonl(tmp_path / "train.jsonl", tagged_rows(40))
    task = open_session(recipe_file(tmp_path, tiny_bert, train), []).task
    probs = np.array([[0.3, 0.9], [0.4, 0.8], [0.1, 0.1], [0.2, 0.2]])
    refs = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=float)
    task.evaluating = "test"
    other = task.compute_metrics(probs, refs)
    assert other["micro_f1_at05"] == other["micro_f1"] == pytest.approx(2 / 3)  # label neg never reaches 0.5
    assert task.state["thresholds"] == {"neg": 0.5, "pos": 0.5}
    task.evaluating = "eval"
    tuned = task.compute_metrics(probs, refs)
    assert tuned["micro_f1"] == 1.0 and tuned["micro_f1_at05"] == pytest.approx(2 / 3)
    assert 0.2 < task.state["thresholds"]["neg"] <= 0.3 and task.state["thresholds"]["pos"] == 0.5
    assert tuned["per_label"]["neg"]["threshold"] == task.state["thresholds"]["neg"]
    # in a run, the test split is scored with the thresholds saved beside the selected adapter, not with the
    # last evaluation's: the core puts the selected adapter's state back before scoring it
    from finetune.run.adapter import restore_selected_state

    adapter = RunDir(task.recipe.output.dir).adapter_dir
    adapter.mkdir(parents=True)
    (adapter / "finetune_task.json").write_text(json.dumps({"task": task.name, "state": {
        **task.state, "thresholds": {"neg": 0.05, "pos": 0.95}}}))
    restore_selected_state(RunDir(task.recipe.output.dir), task)
    task.evaluating = "input"
    scored = task.compute_metrics(probs, refs)
    assert {k: v["threshold"] for k, v in scored["per_label"].items()} == {"neg": 0.05, "pos": 0.95}
    assert scored["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))  # neg: 4 predicted, 2 right; pos: none


# -- a tiny run through the CLI -----------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("multilabel")
    train = write_jsonl(tmp / "data" / "train.jsonl", tagged_rows(120))
    test = write_csv(tmp / "data" / "test.csv", [{"id": f"r{i}", "text": r["text"],
                                                    "labels": ",".join(r["labels"]) or "[]"}
                                                   for i, r in enumerate(tagged_rows(24, seed=5))])
    # eval_loss with "max" selects the worst evaluation: an early adapter, not the last one
    recipe = recipe_file(tmp, tiny_bert, train, data=f'test = "{test}"',
                         epochs=3, train_section='metric = "eval_loss"\nmetric_mode = "max"\neval_every_steps = 2')
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, RunDir(tmp / "run"), test, result


def test_run_saves_the_selected_checkpoints_thresholds_and_scores_the_test_file_with_them(trained):
    _, run, _, result = trained
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["best"]["step"] != metrics["last"]["step"], "precondition: the selected adapter is not the last"
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "map", "micro_f1_at05", "eval_loss"):
        assert key in metrics["best"] and key in metrics["test"] and key in metrics["before"]
    assert set(metrics["baseline"]) >= {"name", "micro_f1", "macro_f1", "subset_accuracy"}
    saved = json.loads((run.adapter_dir / "finetune_task.json").read_text())
    assert saved["task"] == "multi-label-classification" and saved["state"]["labels"] == ["neg", "pos"]
    # the thresholds saved with the adapter are those tuned at the selected evaluation, not the last one
    best = metrics["best_details"]["per_label"]
    assert saved["state"]["thresholds"] == {label: best[label]["threshold"] for label in ("neg", "pos")}
    assert saved["state"]["thresholds"] != {"neg": 0.5, "pos": 0.5}  # tuned: this tiny model's scores are low
    assert metrics["test"]["micro_f1"] != metrics["test"]["micro_f1_at05"]  # the test file used them
    evals = [r for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert len(evals) > 2
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert "micro_f1" in result.stdout


def test_predict_keeps_the_labels_column_and_uses_the_saved_thresholds(trained, tmp_path):
    tmp, run, test, _ = trained
    out = tmp_path / "preds.jsonl"
    result = run_cli("predict", str(run.path), "--input", str(test), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gold = list(csv.DictReader(test.open()))
    assert [{k: r[k] for k in ("id", "text", "labels")} for r in rows] == gold  # the gold labels, kept as written
    assert list(rows[0]) == ["id", "text", "labels", "pred_labels", "prob_neg", "prob_pos"]
    thresholds = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]["thresholds"]
    for r in rows:
        assert r["pred_labels"] == [name for name in ("neg", "pos") if r[f"prob_{name}"] >= thresholds[name]]
    # other thresholds in the saved state change the predictions: predict reads them
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    state_file = copy / "adapter" / "finetune_task.json"
    saved = json.loads(state_file.read_text())
    saved["state"]["thresholds"] = {"neg": 0.0, "pos": 1.01}
    state_file.write_text(json.dumps(saved))
    forced = run_cli("predict", str(copy), "-t", "good great day", "-t", "awful bad food", "--format", "jsonl")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert [json.loads(line)["pred_labels"] for line in forced.stdout.splitlines()] == [["neg"], ["neg"]]


def test_evaluate_on_the_test_file_agrees_with_the_runs_test_scores(trained, tmp_path):
    _, run, test, _ = trained
    metrics = json.loads(run.metrics_file.read_text())
    out = tmp_path / "scores.json"
    scored = run_cli("evaluate", str(run.path), "--input", str(test), "--output", str(out))
    assert scored.returncode == 0, scored.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["examples"] == 24 and got["adapter_step"] == metrics["best"]["step"]
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "micro_f1_at05", "eval_loss"):
        assert got["metrics"][key] == pytest.approx(metrics["test"][key], abs=1e-5), key
    saved = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]["thresholds"]
    assert {k: v["threshold"] for k, v in got["details"]["per_label"].items()} == saved


def test_plain_peft_reloads_the_adapter_with_the_same_logits(trained, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, run, _, _ = trained
    task, ours, _, _ = load_run(run.path)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2,
                                                              problem_type="multi_label_classification")
    plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    batch = tokenizer(["good day", "awful food", "the good movie was so evil"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)
        fresh = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
        assert not torch.allclose(fresh(**batch).logits, ours(**batch).logits, atol=1e-3)
    assert ours.config.problem_type == "multi_label_classification"


def test_validate_and_the_frozen_prefix_cache_give_eval_and_test_ids_of_their_own(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", tagged_rows(40))
    recipe = recipe_file(tmp_path, tiny_bert, train, data="test_split = 0.2",
                         train_section="").read_text().replace("[task]\n", "[task]\ncache_frozen_layers = true\n")
    recipe = recipe.replace("[peft]\n", "[peft]\nlayers = [-1]\n")
    path = tmp_path / "cache.toml"
    path.write_text(recipe)
    session = open_session(path, [])
    task, splits = session.task, session.splits
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (24, 8, 8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    eval_ds = task.build_dataset(splits.eval, tokenizer, training=False)
    test_ds = task.build_dataset(splits.test, tokenizer, training=False)
    eval_ids = {eval_ds[i]["example_id"] for i in range(len(eval_ds))}
    test_ids = {test_ds[i]["example_id"] for i in range(len(test_ds))}
    assert len(eval_ids) == len(test_ids) == 8 and not eval_ids & test_ids
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "multi-label-classification" in result.stdout and "task.cache_frozen_layers" in result.stdout
    trained = run_cli("run", str(path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads(RunDir(tmp_path / "run").metrics_file.read_text())
    assert "micro_f1" in metrics["best"] and "micro_f1" in metrics["test"]


def test_a_data_set_with_class_label_lists_reads_like_a_file(tmp_path, tiny_bert):
    import datasets

    names = ["neg", "pos"]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "labels": datasets.List(datasets.ClassLabel(names=names))})

    def split(rows):  # labels as ClassLabel ids, as in go_emotions
        return datasets.Dataset.from_dict({"text": [r["text"] for r in rows],
                                           "labels": [[names.index(x) for x in r["labels"]] for r in rows]},
                                          features=features)

    folder = tmp_path / "emotions"
    datasets.DatasetDict({"train": split(tagged_rows(24)), "validation": split(tagged_rows(8, seed=1)),
                          "test": split(tagged_rows(6, seed=2))}).save_to_disk(str(folder))
    recipe = recipe_file(tmp_path, tiny_bert, tmp_path / "unused.jsonl")
    dataset = ["data.train=", f"data.dataset={folder}", "data.dataset_eval_split=validation"]
    session = open_session(recipe, [*dataset, "data.dataset_test_split=test"])
    splits = session.splits
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (24, 8, 6)
    assert splits.train["labels"].tolist() == [r["labels"] for r in tagged_rows(24)]
    assert session.task.state["labels"] == ["neg", "pos"] and splits.info["dataset"] == str(folder)

    # a label the training split never has: the data set split and its row are named
    strings = datasets.Dataset.from_dict({"text": ["good day", "bad day", "so so"],
                                          "labels": [["pos"], ["neg"], ["sports"]]})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [r["text"] for r in tagged_rows(8)],
                                                               "labels": [r["labels"] for r in tagged_rows(8)]}),
                          "validation": strings}).save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(DataError, match=r"data.dataset_eval_split: labels \['sports'\] appear in "
                                        r".*strings\[validation\] \(e.g. on row\(s\) 3\)"):
        open_session(recipe, ["data.train=", f"data.dataset={tmp_path / 'strings'}",
                              "data.dataset_eval_split=validation"])


def test_ctrl_c_then_resume_equals_the_uninterrupted_run_thresholds_included(tmp_path, tiny_bert, callback_plugin):
    train = write_jsonl(tmp_path / "data" / "train.jsonl", tagged_rows(64))
    section = "eval_every_steps = 2"
    full = recipe_file(tmp_path, tiny_bert, train, train_section=section, name="full.toml", out="full", epochs=3)
    cut = recipe_file(tmp_path, tiny_bert, train, train_section=section, name="cut.toml", out="cut", epochs=3)
    full_run, _ = assert_resume_equals_uninterrupted(callback_plugin, full, cut, stop_at=4)
    assert "thresholds" in json.loads((full_run.adapter_dir / "finetune_task.json").read_text())["state"]
