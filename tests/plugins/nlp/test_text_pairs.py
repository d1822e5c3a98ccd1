"""text-classification on sentence pairs (data.text_pair_column: entailment, paraphrase): both texts reach
the model as one pair input in training, prediction and a plain peft reload."""

from __future__ import annotations

import json
import random

import pytest
from conftest import NEGATIVE, NEUTRAL, POSITIVE, run_cli, write_csv


def two_sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Two short texts, each with one sentiment word; the relation names both sentiments ("pos-neg": a positive
    premise, a negative hypothesis). The premise draws its sentiment words from the first half of each list, the
    hypothesis from the second, so which text said what is plain even to a bag of words; one text alone tells
    half of the relation (accuracy <= 0.5)."""
    rng = random.Random(seed)
    half = len(POSITIVE) // 2
    premise_words = {"pos": POSITIVE[:half], "neg": NEGATIVE[:half]}
    hypothesis_words = {"pos": POSITIVE[half:], "neg": NEGATIVE[half:]}
    rows = []
    for i in range(n):
        a, b = rng.choice(["pos", "neg"]), rng.choice(["pos", "neg"])
        first = " ".join(rng.sample(premise_words[a], 1) + rng.sample(NEUTRAL, 2))
        second = " ".join(rng.sample(NEUTRAL, 2) + rng.sample(hypothesis_words[b], 1))
        rows.append({"id": i, "premise": first, "hypothesis": second, "relation": f"{a}-{b}"})
    return rows


@pytest.fixture(scope="module")
def steady_bert(tmp_path_factory):
    """The tiny BERT without dropout: with dropout its 60-step runs learned this task at some seeds and not at
    others (0.45-0.93 best accuracy over seeds 0-3); without, 15 epochs reach 0.78-1.0 over seeds 0-7."""
    from finetune.testing import tiny_text_backbone

    return tiny_text_backbone(tmp_path_factory.mktemp("steady-bert"), POSITIVE + NEGATIVE + NEUTRAL,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_pairs_train_predict_and_reload_as_pairs(tmp_path, steady_bert):
    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_csv(tmp_path / "train.csv", two_sentiment_rows(200))
    recipe = tmp_path / "pairs.toml"
    recipe.write_text(f"""
[task]
name = "text-classification"
[model]
backbone = "{steady_bert}"
[data]
train = "{train}"
text_column = "premise"
text_pair_column = "hypothesis"
label_column = "relation"
split = 0.2
max_length = 16
[peft]
r = 4
alpha = 8
[train]
epochs = 15
batch_size = 16
learning_rate = 1e-2
mixed_precision = "no"
seed = 0
[output]
dir = "{tmp_path / 'run'}"
""")
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # one text alone tells half the relation (accuracy 0.5 at best): above 0.7 the model reads the pair
    assert metrics["best"]["accuracy"] > max(0.7, metrics["before"]["accuracy"]), metrics["best"]

    new = write_csv(tmp_path / "new.csv", two_sentiment_rows(6, seed=3))
    out = tmp_path / "preds.csv"
    result = run_cli("predict", str(tmp_path / "run"), "--input", str(new), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    preds = pd.read_csv(out)
    assert list(preds.columns[:4]) == ["id", "premise", "hypothesis", "relation"]
    probability_columns = {f"prob_{a}-{b}" for a in ("pos", "neg") for b in ("pos", "neg")}
    assert {"pred_label", "pred_score"} | probability_columns <= set(preds.columns)

    labels = json.loads((tmp_path / "run" / "adapter" / "finetune_task.json").read_text())["state"]["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(str(steady_bert), num_labels=len(labels))
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "adapter"))
    with torch.no_grad():
        enc = tokenizer(preds["premise"].tolist(), preds["hypothesis"].tolist(), padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, -1)
    for i, row in preds.iterrows():
        assert probs[i, labels.index(row["pred_label"])].item() == pytest.approx(row["pred_score"], abs=1e-4)
