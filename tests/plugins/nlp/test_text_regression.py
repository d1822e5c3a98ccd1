"""text-regression (finetune_nlp.text_regression): numeric targets from texts or text pairs; metrics by
hand, errors naming file and line, data sets, a tiny run through the CLI (run, predict, evaluate, plain
peft), and resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import NEGATIVE, NEUTRAL, POSITIVE, assert_resume_equals_uninterrupted, run_cli, write_csv

from finetune.errors import DataError
from finetune.run.session import open_session
from finetune_nlp.text_regression import regression_metrics


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Two short texts; the target counts the positive words in both (0-4), as a similarity score would."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 2), rng.randint(0, 2)
        first = rng.sample(POSITIVE, a) + rng.sample(NEUTRAL, 3 - a)
        second = rng.sample(POSITIVE, b) + rng.sample(NEGATIVE, 1) + rng.sample(NEUTRAL, 2 - b)
        rng.shuffle(first)
        rng.shuffle(second)
        rows.append({"first": " ".join(first), "second": " ".join(second), "score": float(a + b)})
    return rows


def recipe_file(tmp_path, tiny_bert, train, *, data: str = "", train_section: str = "", name: str = "recipe.toml",
                out: str = "run", epochs: int = 4):
    path = tmp_path / name
    path.write_text(f"""
[task]
name = "text-regression"
[model]
backbone = "{tiny_bert}"
[data]
train = "{train}"
text_column = "first"
text_pair_column = "second"
target_column = "score"
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


def test_metrics_by_hand():
    pred, ref = np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 3.0])
    m = regression_metrics(pred, ref)
    assert m["rmse"] == pytest.approx(np.sqrt(2 / 3)) and m["mae"] == pytest.approx(2 / 3)
    assert m["r2"] == pytest.approx(1 - 2 / (8 / 3))  # squared errors 2; squares around the mean 7/3: 8/3
    assert m["spearman"] == pytest.approx(0.8660254)  # ranks (1,2,3) vs (1,2.5,2.5)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, ref)[0, 1])
    flat = regression_metrics(np.array([2.0, 2.0]), np.array([1.0, 3.0]))
    assert flat["pearson"] == 0.0 and flat["spearman"] == 0.0 and flat["r2"] == pytest.approx(0.0)


def test_non_numeric_targets_empty_pair_texts_and_a_constant_target_name_the_file_and_line(tmp_path, tiny_bert):
    rows = pair_rows(12)
    rows[4]["score"] = "high"
    bad = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"data.train: .*bad.csv: data.target_column \('score'\) must hold finite "
                                        r"numbers; 1 row\(s\) do not, e.g. line\(s\) 6 \('high'\)"):
        open_session(recipe_file(tmp_path, tiny_bert, bad))
    rows = pair_rows(12)
    rows[2]["second"] = ""
    empty = write_csv(tmp_path / "empty.csv", rows)
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty data.text_pair_column \('second'\), e.g. on "
                                        r"line\(s\) 4"):
        open_session(recipe_file(tmp_path, tiny_bert, empty))
    flat = write_csv(tmp_path / "flat.csv", [{**r, "score": 2.0} for r in pair_rows(12)])
    with pytest.raises(DataError, match="must vary across at least two rows"):
        open_session(recipe_file(tmp_path, tiny_bert, flat))


def test_a_data_set_with_a_float_label_column(tmp_path, tiny_bert):
    import datasets

    def split(rows):  # as STS-B on the Hub: sentence1, sentence2, a float label
        return datasets.Dataset.from_dict({"sentence1": [r["first"] for r in rows],
                                           "sentence2": [r["second"] for r in rows],
                                           "label": [r["score"] for r in rows]})

    folder = tmp_path / "stsb"
    datasets.DatasetDict({"train": split(pair_rows(24)), "validation": split(pair_rows(8, seed=1))}) \
        .save_to_disk(str(folder))
    session = open_session(recipe_file(tmp_path, tiny_bert, tmp_path / "unused.csv"),
                           ["data.train=", f"data.dataset={folder}", "data.dataset_eval_split=validation",
                            "data.text_column=sentence1", "data.text_pair_column=sentence2",
                            "data.target_column=label"])
    assert (len(session.splits.train), len(session.splits.eval)) == (24, 8)
    assert session.task.state["mean"] == pytest.approx(np.mean([r["score"] for r in pair_rows(24)]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("regression")
    train = write_csv(tmp / "data" / "train.csv", pair_rows(160))
    test = write_csv(tmp / "data" / "test.csv", pair_rows(24, seed=5))
    recipe = recipe_file(tmp, tiny_bert, train, data=f'test = "{test}"')
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, tmp / "run", test


def test_run_learns_the_pair_score_and_writes_its_card(trained):
    _, run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("best", "before", "test"):
        assert {"rmse", "mae", "r2", "pearson", "spearman"} <= set(metrics[split]), split
    assert metrics["best"]["rmse"] < metrics["before"]["rmse"]
    assert metrics["best"]["rmse"] < metrics["baseline"]["mean_rmse"]  # beyond predicting the mean
    assert metrics["baseline"]["name"] == "char n-gram TF-IDF + ridge regression"
    card = (run / "README.md").read_text()
    assert "num_labels=1" in card and "pipeline_tag: text-classification" in card


def test_predict_evaluate_and_plain_peft_reload_agree(trained, tmp_path, tiny_bert):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp, run, test = trained
    out = tmp_path / "preds.csv"
    result = run_cli("predict", str(run), "--input", str(test), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd

    preds = pd.read_csv(out)
    assert list(preds.columns) == ["first", "second", "score", "pred_value"]
    rmse = float(np.sqrt(np.mean((preds["pred_value"] - preds["score"]) ** 2)))
    metrics = json.loads((run / "metrics.json").read_text())
    assert rmse == pytest.approx(metrics["test"]["rmse"], abs=1e-3)
    scores = tmp_path / "scores.json"
    scored = run_cli("evaluate", str(run), "--input", str(test), "--output", str(scores))
    assert scored.returncode == 0, scored.stderr[-3000:]
    for key in ("rmse", "mae", "spearman"):
        assert json.loads(scores.read_text())["metrics"][key] == pytest.approx(metrics["test"][key], abs=1e-4), key

    state = json.loads((run / "adapter" / "finetune_task.json").read_text())["state"]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=1)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    with torch.no_grad():
        enc = tokenizer([preds["first"][0]], [preds["second"][0]], return_tensors="pt")
        value = model(**enc).logits[0, 0].item() * state["scale"] + state["center"]
    assert value == pytest.approx(preds["pred_value"][0], abs=1e-4)


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_bert, callback_plugin):
    train = write_csv(tmp_path / "data" / "train.csv", pair_rows(64))
    full = recipe_file(tmp_path, tiny_bert, train, name="full.toml", out="full", epochs=2)
    cut = recipe_file(tmp_path, tiny_bert, train, name="cut.toml", out="cut", epochs=2)
    assert_resume_equals_uninterrupted(callback_plugin, full, cut, stop_at=4)


def test_a_pair_run_refuses_a_single_text_input_clearly(trained):
    _, run, _ = trained
    result = run_cli("predict", str(run), "--text", "good day")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "reads the columns ['first', 'second']" in result.stderr and "--input file" in result.stderr
