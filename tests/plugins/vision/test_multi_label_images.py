"""multi-label-image-classification on the tiny random timm CNN: table data (delimited, JSON text, JSONL lists,
parquet), thresholds tuned on eval and saved with the selected adapter, predict / evaluate / the test split
using them, the card's plain timm + peft snippet, prediction pictures, bad input, 2 processes + Hub round trip."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import run_cli
from vision_fixtures import *  # noqa: F403 - the vision fixtures

from finetune.engine.console import Console
from finetune.errors import DataError, RecipeError
from finetune.run.inference import load_run
from finetune.run.session import open_session
from finetune.run.training import run_recipe

PALETTE = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def write_multilabel_images(folder, n: int, seed: int = 0, size: int = 32) -> list[dict]:
    """``n`` images of two vertical halves; an image's labels are the palette colours it shows (grey halves are no
    label: every sixth image has none). Rows: ``{"file": path relative to folder's parent, "labels": [...]}``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [*PALETTE, None]
    rows = []
    for i in range(n):
        halves = [names[rng.integers(len(names))] for _ in range(2)] if i % 6 != 5 else [None, None]
        pixels = np.zeros((size, size, 3))
        for h, name in enumerate(halves):
            rgb = PALETTE[name] if name else (128, 128, 128)
            pixels[:, h * size // 2:(h + 1) * size // 2] = rgb
        pixels = np.clip(pixels + rng.integers(-30, 30, size=pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img_{i:03d}.png")
        labels = [name for name in PALETTE if name in halves]
        rows.append({"file": f"{folder.name}/img_{i:03d}.png", "labels": labels})
    return rows


def write_table(path, rows, form: str = "delimited"):
    """``rows`` as a CSV (labels ``a,b``, or a JSON list as text with form="json"), JSONL or parquet file."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "labels"])
            for r in rows:
                writer.writerow([r["file"], json.dumps(r["labels"]) if form == "json" else ",".join(r["labels"])])
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    return path


def write_recipe(folder, backbone, train, *, data: str = "", epochs: int = 3, name: str = "recipe.toml"):
    recipe = folder / name
    recipe.write_text(f'[task]\nname = "multi-label-image-classification"\n[model]\nbackbone = "{backbone}"\n'
                      f'[data]\ntrain = "{train}"\nimage_column = "file"\nimage_size = 32\n{data}\n'
                      '[peft]\nr = 4\nalpha = 8\ndropout = 0.0\n'
                      f'[train]\nepochs = {epochs}\nbatch_size = 8\nlearning_rate = 3e-2\nmixed_precision = "no"\n'
                      f'eval_every_steps = 4\nseed = 0\n[output]\ndir = "{folder / "run"}"\n')
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_timm_cnn):
    folder = tmp_path_factory.mktemp("ml-images")
    rows = write_multilabel_images(folder / "images", 48)
    train = write_table(folder / "train.csv", rows[:40])
    test = write_table(folder / "test.csv", rows[40:], form="json")
    recipe = write_recipe(folder, tiny_timm_cnn, train, data=f'test = "{test}"\nsplit = 0.3')
    return folder, recipe, test, run_recipe(recipe, [], console=Console(quiet=True))


def test_run_tunes_thresholds_saves_the_selected_ones_and_scores_the_test_file_with_them(trained):
    _, _, _, run = trained
    metrics = json.loads(run.metrics_file.read_text())
    for key in ("micro_f1", "macro_f1", "map", "subset_accuracy", "micro_f1_at05", "macro_f1_at05",
                "subset_accuracy_at05", "eval_loss"):
        assert key in metrics["best"] and key in metrics["test"] and key in metrics["before"], key
    assert metrics["data"]["test_examples"] == 8
    assert metrics["baseline"]["name"].startswith("label frequencies") and "map" in metrics["baseline"]
    data = run.info()["data"]
    assert data["labels"] == ["blue", "green", "red"] and data["train_images_without_label"] > 0  # grey images
    saved = json.loads((run.adapter_dir / "finetune_task.json").read_text())
    assert saved["task"] == "multi-label-image-classification" and saved["state"]["backend"] == "timm"
    best = metrics["best_details"]["per_label"]
    # the thresholds saved with the adapter are those tuned at the selected evaluation
    assert saved["state"]["thresholds"] == {label: best[label]["threshold"] for label in best}
    assert set(best["red"]) == {"precision", "recall", "f1", "support", "average_precision", "threshold"}
    assert metrics["best"]["map"] > metrics["before"]["map"]  # it learned something about the colours
    card = run.card_file.read_text()
    assert "pipeline_tag: image-classification" in card and "thresholds = [" in card and ".sigmoid()" in card


def test_predict_uses_the_saved_thresholds_keeps_the_columns_and_reports_unreadable_images(trained, tmp_path):
    folder, _, test, run = trained
    table = tmp_path / "inputs.csv"
    shutil.copy(folder / "images" / "img_040.png", tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    table.write_text("file,note\na.png,first\nbroken.png,second\n")
    out = tmp_path / "preds.jsonl"
    result = run_cli("predict", str(run.path), "--input", str(table), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    good, bad = [json.loads(line) for line in out.read_text().splitlines()]
    assert good["note"] == "first" and list(good)[-4:] == ["pred_labels", "prob_blue", "prob_green", "prob_red"]
    thresholds = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]["thresholds"]
    assert good["pred_labels"] == [n for n in ("blue", "green", "red") if good[f"prob_{n}"] >= thresholds[n]]
    assert bad["pred_labels"] is None and "UnidentifiedImageError" in bad["pred_error"]
    # other thresholds in the saved state change the predictions: predict reads them
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    state_file = copy / "adapter" / "finetune_task.json"
    saved = json.loads(state_file.read_text())
    saved["state"]["thresholds"] = {"blue": 0.0, "green": 1.01, "red": 0.0}
    state_file.write_text(json.dumps(saved))
    task, model, processor, _ = load_run(copy)
    with torch.no_grad():
        rows = task.predict(model, processor, [{"file": str(tmp_path / "a.png")}])
    assert rows[0]["pred_labels"] == ["blue", "red"]


def test_evaluate_agrees_with_the_runs_test_scores(trained, tmp_path):
    _, _, test, run = trained
    metrics = json.loads(run.metrics_file.read_text())
    out = tmp_path / "scores.json"
    scored = run_cli("evaluate", str(run.path), "--input", str(test), "--output", str(out))
    assert scored.returncode == 0, scored.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["examples"] == 8 and got["adapter_step"] == metrics["best"]["step"]
    for key in ("micro_f1", "macro_f1", "map", "subset_accuracy", "micro_f1_at05", "eval_loss"):
        assert got["metrics"][key] == pytest.approx(metrics["test"][key], abs=1e-5), key
    saved = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]["thresholds"]
    assert {k: v["threshold"] for k, v in got["details"]["per_label"].items()} == saved


def test_the_cards_usage_snippet_runs_with_plain_timm_and_peft_and_agrees_with_predict(trained, tmp_path):
    import contextlib
    import io

    folder, _, _, run = trained
    card = run.card_file.read_text()
    code = card.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    image = folder / "images" / "img_041.png"
    code = code.replace("'adapter'", repr(str(run.adapter_dir))).replace("'image.jpg'", repr(str(image)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "card-snippet", "exec"), {})  # noqa: S102 - the card's own code, as a user runs it
    task, model, processor, _ = load_run(run.path)
    with torch.no_grad():
        (row,) = task.predict(model, processor, [{"file": str(image)}])
    assert printed.getvalue().strip() == repr(row["pred_labels"])


def test_predict_draw_writes_one_picture_per_readable_image(trained, tmp_path):
    folder, _, _, run = trained
    inputs = tmp_path / "inputs"
    (inputs / "b").mkdir(parents=True)
    for i in range(2):
        shutil.copy(folder / "images" / f"img_04{i}.png", inputs / f"img_04{i}.png")
    shutil.copy(folder / "images" / "img_042.png", inputs / "b" / "img_040.png")  # the same name in a subfolder
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pictures"
    result = run_cli("predict", str(run.path), "--input", str(inputs), "--draw", str(out), "--format", "jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "drew 3 picture(s)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img_040.png", "img_040_2.png", "img_041.png"]
    from PIL import Image

    with Image.open(out / "img_041.png") as picture:
        assert picture.width == 256 and picture.height == 256 + 8 + 14 * 3  # scaled up; a line per label below


@pytest.mark.parametrize("form", ["json-text csv", "jsonl lists", "parquet lists"])
def test_label_forms_read_the_same(tmp_path, tiny_timm_cnn, form):
    rows = write_multilabel_images(tmp_path / "images", 12)
    delimited = write_table(tmp_path / "delimited.csv", rows)
    other = {"json-text csv": lambda: write_table(tmp_path / "json.csv", rows, form="json"),
             "jsonl lists": lambda: write_table(tmp_path / "rows.jsonl", rows),
             "parquet lists": lambda: write_table(tmp_path / "rows.parquet", rows)}[form]()
    splits = [open_session(write_recipe(tmp_path, tiny_timm_cnn, path, name=f"{i}.toml")).splits
              for i, path in enumerate((delimited, other))]
    assert splits[0].train["labels"].tolist() == splits[1].train["labels"].tolist()
    assert splits[0].train["image"].tolist() == splits[1].train["image"].tolist()
    assert any(labels == [] for labels in splits[0].train["labels"].tolist() + splits[0].eval["labels"].tolist())


def test_the_delimiter_option(tmp_path, tiny_timm_cnn):
    rows = write_multilabel_images(tmp_path / "images", 12)
    table = tmp_path / "pipes.csv"
    table.write_text("file,labels\n" + "".join(f"{r['file']},{'|'.join(r['labels'])}\n" for r in rows))
    session = open_session(write_recipe(tmp_path, tiny_timm_cnn, table, data='label_delimiter = "|"'))
    assert sorted(map(sorted, session.splits.train["labels"].tolist() + session.splits.eval["labels"].tolist())) \
        == sorted(sorted(r["labels"]) for r in rows)


def _error(tmp_path, backbone, train, data: str = "", kind=DataError) -> str:
    with pytest.raises(kind) as err:
        open_session(write_recipe(tmp_path, backbone, train, data=data))
    assert not (tmp_path / "run").exists()  # refused before the run folder is written
    return str(err.value)


def test_bad_input_names_the_key_file_and_row(tmp_path, tiny_timm_cnn):
    rows = write_multilabel_images(tmp_path / "images", 12)
    good = write_table(tmp_path / "train.csv", rows)
    # a label in the eval table never seen in training
    eval_rows = [dict(r) for r in rows[:4]]
    eval_rows[2] = {**eval_rows[2], "labels": ["purple"]}
    message = _error(tmp_path, tiny_timm_cnn, good, f'eval = "{write_table(tmp_path / "eval.csv", eval_rows)}"')
    assert "data.eval" in message and "['purple']" in message and "eval.csv line 4" in message
    # a missing image file and an unreadable one: named with their rows
    (tmp_path / "images" / "img_003.png").unlink()
    (tmp_path / "images" / "img_005.png").write_bytes(b"garbage")
    message = _error(tmp_path, tiny_timm_cnn, good)
    assert "data.train: 2 of 12 image(s)" in message and "train.csv line 5" in message
    assert "img_003.png (file not found)" in message and "train.csv line 7" in message and "on_bad_image" in message
    # ... or skipped when asked
    session = open_session(write_recipe(tmp_path, tiny_timm_cnn, good, data='on_bad_image = "skip"'))
    assert len(session.splits.train) + len(session.splits.eval) == 10
    write_multilabel_images(tmp_path / "images", 12)  # restored
    # no image path
    table = tmp_path / "no-path.csv"
    table.write_text("file,labels\nimages/img_000.png,red\n,blue\n")
    assert "no-path.csv line 3: no image path" in _error(tmp_path, tiny_timm_cnn, table)
    # a cell that starts like a JSON list but is not one
    table = tmp_path / "bad-json.csv"
    table.write_text('file,labels\nimages/img_000.png,red\nimages/img_001.png,"[red, blue"\n')
    message = _error(tmp_path, tiny_timm_cnn, table)
    assert "bad-json.csv line 3" in message and "data.label_column" in message and "JSON list" in message
    # no label anywhere (an empty label column)
    table = tmp_path / "no-labels.csv"
    table.write_text("file,labels\n" + "".join(f"{r['file']},\n" for r in rows))
    assert "no image of the training data" in _error(tmp_path, tiny_timm_cnn, table)
    # a missing label column, a folder instead of a table, data.dataset
    table = tmp_path / "no-column.csv"
    table.write_text("file,tags\nimages/img_000.png,red\n")
    assert "data.label_column: column 'labels' not found" in _error(tmp_path, tiny_timm_cnn, table)
    assert "is a folder" in _error(tmp_path, tiny_timm_cnn, tmp_path / "images")
    assert "data.dataset" in _error(tmp_path, tiny_timm_cnn, good, 'dataset = "someone/tiny"', kind=RecipeError)


def test_compute_metrics_tunes_on_the_eval_split_only(trained):
    import numpy as np

    _, recipe, _, _ = trained
    session = open_session(recipe)
    task = session.task
    probs = np.array([[0.3, 0.9, 0.1], [0.35, 0.2, 0.1], [0.1, 0.1, 0.1]])
    refs = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    task.evaluating = "test"  # as the core sets it: not the eval split, no tuning
    test = task.compute_metrics(probs, refs)
    assert task.state["thresholds"] == {"blue": 0.5, "green": 0.5, "red": 0.5} and test["micro_f1"] < 1
    task.evaluating = "eval"
    tuned = task.compute_metrics(probs, refs)
    assert tuned["micro_f1"] == 1.0 and task.state["thresholds"]["blue"] == 0.3
    assert tuned["micro_f1_at05"] == test["micro_f1_at05"]


def test_two_processes_train_and_the_run_round_trips_through_the_hub(tmp_path, tiny_timm_cnn, monkeypatch):
    from hub_server import HubServer

    from finetune.engine.run_folder import RunDir
    from finetune.run.hub import parse_front_matter, push_run

    rows = write_multilabel_images(tmp_path / "images", 32)
    recipe = write_recipe(tmp_path, tiny_timm_cnn, write_table(tmp_path / "train.csv", rows),
                          data="split = 0.25", epochs=1)
    token = "hf_test_token_ml_images"
    with HubServer(token) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token}
        for key, value in {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            monkeypatch.setenv(key, value)
        trained = run_cli("run", str(recipe), "--num-processes", "2", env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        run = RunDir(tmp_path / "run")
        assert run.info()["processes"] == 2
        metrics = json.loads(run.metrics_file.read_text())
        assert metrics["data"]["eval_examples"] == 8 and "map" in metrics["best"]
        push_run(run.path, "me/colours")
        card = hub.state.repos["me/colours"].branches["main"][-1]["files"]["README.md"].decode()
        assert parse_front_matter(card)["pipeline_tag"] == "image-classification"
        image = str(tmp_path / "images" / "img_000.png")
        from_hub = run_cli("predict", "me/colours", "--text", image, env=env)
        from_run = run_cli("predict", str(run.path), "--text", image)
        assert from_hub.returncode == 0, from_hub.stderr[-2000:]
        row = json.loads(from_hub.stdout.splitlines()[-1])
        assert row == json.loads(from_run.stdout.splitlines()[-1]) and isinstance(row["pred_labels"], list)
