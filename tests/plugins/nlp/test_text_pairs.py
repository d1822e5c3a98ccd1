"""text-classification on sentence pairs (data.text_pair_column: entailment, paraphrase): both texts reach
the model as one pair input in training, prediction and a plain peft reload."""

from __future__ import annotations

import json
import random

import pytest
from conftest import NEGATIVE, NEUTRAL, POSITIVE, run_cli, write_csv


def same_or_not_rows(n: int, seed: int = 0) -> list[dict]:
    """Two short texts; "same" when both carry the same sentiment, else "different" (needs both texts)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(["pos", "neg"]), rng.choice(["pos", "neg"])
        words = {"pos": POSITIVE, "neg": NEGATIVE}
        first = " ".join(rng.sample(words[a], 1) + rng.sample(NEUTRAL, 2))
        second = " ".join(rng.sample(NEUTRAL, 2) + rng.sample(words[b], 1))
        rows.append({"id": i, "premise": first, "hypothesis": second, "relation": "same" if a == b else "different"})
    return rows


def test_pairs_train_predict_and_reload_as_pairs(tmp_path, tiny_bert):
    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = write_csv(tmp_path / "train.csv", same_or_not_rows(200))
    recipe = tmp_path / "pairs.toml"
    recipe.write_text(f"""
[task]
name = "text-classification"
[model]
backbone = "{tiny_bert}"
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
epochs = 6
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
    # neither text alone tells the relation: learning it means the model reads the pair
    assert metrics["best"]["accuracy"] > max(0.6, metrics["before"]["accuracy"]), metrics["best"]

    new = write_csv(tmp_path / "new.csv", same_or_not_rows(6, seed=3))
    out = tmp_path / "preds.csv"
    result = run_cli("predict", str(tmp_path / "run"), "--input", str(new), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    preds = pd.read_csv(out)
    assert list(preds.columns[:4]) == ["id", "premise", "hypothesis", "relation"]
    assert {"pred_label", "pred_score", "prob_same", "prob_different"} <= set(preds.columns)

    labels = json.loads((tmp_path / "run" / "adapter" / "finetune_task.json").read_text())["state"]["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "adapter"))
    with torch.no_grad():
        enc = tokenizer(preds["premise"].tolist(), preds["hypothesis"].tolist(), padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, -1)
    for i, row in preds.iterrows():
        assert probs[i, labels.index(row["pred_label"])].item() == pytest.approx(row["pred_score"], abs=1e-4)
