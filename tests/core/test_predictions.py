"""Adapters saved in the run folder reload (with finetune and with plain peft) and predict."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_cli, write_csv

from finetune.contract.task import Task
from finetune.engine.console import Console
from finetune.errors import DataError, RunError
from finetune.run.inference import load_run
from finetune.run.session import open_session
from finetune.run.training import run_recipe


@pytest.fixture
def trained_run(make_recipe):
    recipe = make_recipe(train="epochs = 3")
    return recipe, run_recipe(recipe, [], console=Console(quiet=True))


def test_reloaded_adapter_reproduces_the_best_eval_accuracy(trained_run):
    recipe, run = trained_run
    splits = open_session(recipe).splits
    task, model, processor, _ = load_run(run.path)
    records = splits.eval.to_dict(orient="records")
    with torch.no_grad():
        rows = task.predict(model, processor, records)
    assert [r["label"] for r in rows] == [rec["label"] for rec in records]  # the gold labels, kept
    accuracy = sum(r["pred_label"] == r["label"] for r in rows) / len(records)
    best = json.loads(run.metrics_file.read_text())["best"]["accuracy"]
    assert accuracy == pytest.approx(best, abs=1e-9)


def test_plain_peft_and_transformers_load_the_adapter(trained_run, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, run = trained_run
    task, ours, processor, _ = load_run(run.path)
    labels = task.state["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
    plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    batch = tokenizer(["good day", "awful food", "the movie was so evil"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)
        # and the adapter really changed the model: the head is not the freshly initialised one
        fresh = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
        assert not torch.allclose(fresh(**batch).logits, ours(**batch).logits, atol=1e-3)


def test_predict_cli_file_and_stdin(trained_run, tmp_path):
    _, run = trained_run
    inp = write_csv(tmp_path / "new.csv", [{"text": "good great day"}, {"text": "awful bad food"}])
    out = tmp_path / "preds.csv"
    result = run_cli("predict", str(run.path), "--input", str(inp), "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["text"] for r in rows] == ["good great day", "awful bad food"]
    for row in rows:
        assert row["pred_label"] in ("neg", "pos")
        assert float(row["prob_neg"]) + float(row["prob_pos"]) == pytest.approx(1.0, abs=1e-5)
    result = run_cli("predict", str(run.path), input="good great day\nawful bad food\n")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["pred_label"] for line in lines] == [r["pred_label"] for r in rows]


def test_predict_errors_are_clear(tmp_path, trained_run):
    with pytest.raises(RunError, match="nowhere: no such run folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a finetune run folder"):
        load_run(tmp_path / "empty")
    _, run = trained_run
    result = run_cli("predict", str(run.path), "--input", str(tmp_path / "missing.csv"))
    assert result.returncode == 2 and "missing.csv" in result.stderr and "Traceback" not in result.stderr
    bad = write_csv(tmp_path / "bad.csv", [{"sentence": "x", "label": "pos"}])
    result = run_cli("predict", str(run.path), "--input", str(bad))
    assert result.returncode == 2 and "has no column 'text'" in result.stderr and "'sentence', 'label'" in result.stderr
    # the fix it names is a real option, with this task's key: and it works
    assert "--set data.text_column=<column>" in result.stderr and "--input column" not in result.stderr
    result = run_cli("predict", str(run.path), "--input", str(bad), "--set", "data.text_column=sentence")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) >= {"sentence", "label", "pred_label"}
    one = write_csv(tmp_path / "one.csv", [{"review": "good day"}])  # one column: the guess is that one
    result = run_cli("predict", str(run.path), "--input", str(one))
    assert result.returncode == 2 and "`finetune predict RUN --set data.text_column=review`" in result.stderr


def test_predicting_on_labelled_data_keeps_its_label_column_and_adds_pred_fields(trained_run, tmp_path):
    """The user's gold labels are data: predictions go beside them, never over them."""
    _, run = trained_run
    gold = [{"id": "a", "text": "good great day", "label": "yes"}, {"id": "b", "text": "awful bad food", "label": "no"}]
    inp = write_csv(tmp_path / "labelled.csv", gold)
    out = tmp_path / "preds.csv"
    result = run_cli("predict", str(run.path), "--input", str(inp), "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "text", "label", "pred_label", "pred_score", "prob_neg", "prob_pos"]
    assert [{k: r[k] for k in ("id", "text", "label")} for r in rows] == gold
    assert all(r["pred_label"] in ("neg", "pos") for r in rows)
    # an earlier output fed back in: its pred_ columns would be overwritten, so it is refused, clearly
    again = run_cli("predict", str(run.path), "--input", str(out))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "has the column(s) 'pred_label', 'pred_score', 'prob_neg', 'prob_pos'" in again.stderr
    assert "Rename or drop those columns" in again.stderr


def test_output_is_written_as_its_suffix_says_or_refused_before_the_model_loads(trained_run, tmp_path):
    _, run = trained_run
    text = run_cli("predict", str(run.path), "-t", "good great day", "--output", str(tmp_path / "p.txt"))
    assert text.returncode == 2 and not (tmp_path / "p.txt").exists() and "Traceback" not in text.stderr
    assert "p.txt: the suffix '.txt' names no format" in text.stderr
    assert ".jsonl (JSON lines)" in text.stderr and ".csv (a CSV table)" in text.stderr
    assert "--format jsonl|json|csv|tsv" in text.stderr
    missing = run_cli("predict", str(run.path), "-t", "x", "--output", str(tmp_path / "no" / "p.csv"))
    assert missing.returncode == 2 and "the folder" in missing.stderr and "does not exist" in missing.stderr
    array = run_cli("predict", str(run.path), "-t", "good great day", "-t", "awful bad food",
                    "--output", str(tmp_path / "p.json"))
    assert array.returncode == 0, array.stderr
    rows = json.loads((tmp_path / "p.json").read_text())  # one JSON array, as .json says
    assert [r["text"] for r in rows] == ["good great day", "awful bad food"] and rows[0]["pred_label"] in ("neg", "pos")
    table = run_cli("predict", str(run.path), "-t", "good great day", "--format", "csv")  # stdout, as asked
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == "text,pred_label,pred_score,prob_neg,prob_pos"


def test_predict_help_lists_every_tasks_prediction_fields_and_a_predict_example():
    result = run_cli("predict", "--help")
    assert result.returncode == 0
    listing = result.stdout.split("Prediction fields")[1]
    for task, fields in (("text-classification", ("pred_label", "pred_score", "prob_<label>")),
                         ("image-classification", ("pred_label_<k>", "pred_error")),
                         ("audio-classification", ("pred_label",)), ("speech-recognition", ("pred_text",)),
                         ("causal-lm", ("pred_text", "pred_finish_reason", "pred_new_tokens"))):
        section = listing.split(f"{task}:")[1]
        assert all(field in section for field in fields), (task, section)
    shown = " ".join(result.stdout.split())  # as one line: help text wraps
    assert "--set data.text_column=review" in shown and "learning_rate" not in shown
    assert ".json: one JSON array" in shown


def test_a_mistyped_run_folder_is_a_missing_folder_not_a_hub_id(tmp_path):
    """`runs/sentt` for `runs/sent`: runs/ is here, so it is a local path that does not exist (no Hub involved)."""
    for name in ("sent", "sentiment-big", "vision"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "recipe.toml").write_text("")
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_cli("predict", "runs/sentt", "-t", "x", cwd=tmp_path, env=unreachable)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runs/sentt: no such run folder. Did you mean runs/sent?" in result.stderr
    assert "Hub" not in result.stderr and "reach" not in result.stderr
    far = run_cli("predict", "runs/zzz", "-t", "x", cwd=tmp_path, env=unreachable)
    assert "The run folders in runs: sent, sentiment-big, vision." in far.stderr
    push = run_cli("push", "runs/sentt", "--repo-id", "me/sent", cwd=tmp_path, env=unreachable)
    assert push.returncode == 2 and "Did you mean runs/sent?" in push.stderr and "reach" not in push.stderr


def test_predict_text_option(trained_run, tmp_path):
    _, run = trained_run
    result = run_cli("predict", str(run.path), "--text", "good great day", "-t", "awful bad food")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == ["good great day", "awful bad food"]
    out = tmp_path / "preds.txt"  # no telling suffix: --format decides
    result = run_cli("predict", str(run.path), "-t", "good great day", "--output", str(out), "--format", "jsonl")
    assert result.returncode == 0 and json.loads(out.read_text())["text"] == "good great day"


def test_list_and_dict_values_are_json_in_csv_cells_and_json_lines(tmp_path, capsys):
    from finetune.run.predictions import write_predictions

    rows = [{"tokens": ["Paris", "is"], "tags": ["B-LOC", "O"], "spans": [{"text": "Paris", "start": 0}],
             "score": 0.5}, {"tokens": ["é"], "tags": ["O"], "spans": [], "score": 1.0}]
    write_predictions(rows, tmp_path / "p.csv")
    read = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert read[0]["tags"] == '["B-LOC", "O"]' and json.loads(read[0]["spans"]) == rows[0]["spans"]
    assert json.loads(read[1]["tokens"]) == ["é"] and read[1]["spans"] == "[]"
    write_predictions(rows, tmp_path / "p.jsonl")
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()] == rows
    write_predictions(rows, tmp_path / "p.tsv")
    assert (tmp_path / "p.tsv").read_text(encoding="utf-8").splitlines()[0] == "tokens\ttags\tspans\tscore"
    write_predictions(rows, None)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


@pytest.mark.parametrize("method", ["none", "full"])
def test_linear_probe_and_full_finetuning_save_and_reload(make_recipe, method):
    recipe = make_recipe(train="epochs = 2")
    text = recipe.read_text().replace("[peft]\n", f'[peft]\nmethod = "{method}"\n')
    recipe.write_text(text)
    run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads(run.metrics_file.read_text())
    if method == "none":
        assert metrics["params"]["trainable"] == 32 * 2 + 2 + 32 * 32 + 32  # classifier + pooler
    else:
        assert metrics["params"]["trainable"] == metrics["params"]["total"]
    splits = open_session(recipe).splits
    task, model, processor, _ = load_run(run.path)
    records = splits.eval.to_dict(orient="records")
    with torch.no_grad():
        rows = task.predict(model, processor, records)
    accuracy = sum(r["pred_label"] == r["label"] for r in rows) / len(records)
    assert accuracy == pytest.approx(metrics["best"]["accuracy"], abs=1e-9)


def test_integer_labels_come_back_as_integers(make_recipe, tmp_path):
    from conftest import make_sentiment_rows

    rows = [{"text": r["text"], "label": 1 if r["label"] == "pos" else 0} for r in make_sentiment_rows(80)]
    train = write_csv(tmp_path / "int.csv", rows)
    recipe = make_recipe(data=f'train = "{train}"', train="epochs = 1")
    run = run_recipe(recipe, [], console=Console(quiet=True))
    assert run.info()["data"]["labels"] == ["0", "1"]
    task, model, processor, _ = load_run(run.path)
    with torch.no_grad():
        out = task.predict(model, processor, [{"text": "good day"}])
    assert isinstance(out[0]["pred_label"], int) and out[0]["pred_label"] in (0, 1)
    assert set(out[0]) == {"text", "pred_label", "pred_score", "prob_0", "prob_1"}


def test_draw_is_refused_for_a_task_that_draws_nothing(trained_run, tmp_path):
    _, run = trained_run
    result = run_cli("predict", str(run.path), "--text", "good day", "--draw", str(tmp_path / "pictures"))
    assert result.returncode != 0
    assert "--draw: the task 'text-classification' draws no pictures" in result.stderr
    assert "object-detection" in result.stderr or "no installed task does" in result.stderr
    assert not (tmp_path / "pictures").exists()  # refused before anything was predicted or created


class _Drawing(Task):
    name = "drawing-test"

    def __init__(self, paths_returned=None) -> None:
        self.paths_returned = paths_returned

    def draw_predictions(self, rows, folder):
        written = []
        for row in rows:
            path = folder / f"{row['id']}.txt"
            path.write_text(str(row["pred_label"]))
            written.append(path)
        return written if self.paths_returned is None else self.paths_returned


def test_draw_predictions_writes_in_the_folder_and_checks_what_the_task_returns(tmp_path):
    from finetune.engine.guard import GuardedTask
    from finetune.errors import PluginError
    from finetune.run.predictions import check_draw, draw_predictions

    rows = [{"id": "a", "pred_label": 1}, {"id": "b", "pred_label": 0}]
    task = GuardedTask(_Drawing(), "test-plugin")
    check_draw(task, tmp_path / "new")
    written = draw_predictions(task, rows, tmp_path / "new" / "deeper")
    assert [p.name for p in written] == ["a.txt", "b.txt"] and written[0].read_text() == "1"

    liar = GuardedTask(_Drawing(paths_returned=[tmp_path / "never-written.png"]), "test-plugin")
    with pytest.raises(PluginError, match="test-plugin: _Drawing.draw_predictions returned paths that are not files"):
        draw_predictions(liar, rows, tmp_path / "again")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="is a file; give a folder"):
        check_draw(task, tmp_path / "a-file")
