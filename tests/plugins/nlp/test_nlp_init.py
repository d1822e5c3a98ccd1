"""`finetune init` on text data: the NLP plugin's claims (tables, CoNLL, token/tag JSONL, SQuAD JSON)."""

from __future__ import annotations

import json

import pytest
from conftest import write_csv
from fake_plugins import write_jsonl
from init_fixtures import init_and_read

from finetune import DataError, DataProbe


def rows(n: int = 30) -> list[dict]:
    return [{"sentence": f"the food was {'great' if i % 2 else 'bad'} at place {i} tonight", "other": f"x {i} y z w",
             "label": "pos" if i % 2 else "neg", "doc_id": f"d{i // 3}"} for i in range(n)]


def test_text_and_label_is_text_classification_grouped(tmp_path):
    data = write_csv(tmp_path / "t.csv", [{k: r[k] for k in ("sentence", "label", "doc_id")} for r in rows()])
    recipe, said = init_and_read(data, tmp_path / "r.toml")
    assert recipe["task"]["name"] == "text-classification"
    assert recipe["data"]["text_column"] == "sentence" and recipe["data"]["label_column"] == "label"
    assert recipe["data"]["group_column"] == "doc_id"  # an id that repeats: related rows cannot leak
    assert recipe["model"]["backbone"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert any("column `sentence` looks like text: 30 distinct values, mean 8.0 words" in s for s in said)


def test_two_texts_and_a_label_is_a_pair(tmp_path):
    pairs = [{"premise": r["sentence"], "hypothesis": f"someone ate {i} meals in a row", "label": r["label"]}
             for i, r in enumerate(rows())]
    recipe, _ = init_and_read(write_csv(tmp_path / "p.csv", pairs), tmp_path / "r.toml")
    assert recipe["task"]["name"] == "text-classification"
    assert (recipe["data"]["text_column"], recipe["data"]["text_pair_column"]) == ("premise", "hypothesis")


def test_several_labels_per_row_is_multi_label(tmp_path):
    data = write_csv(tmp_path / "m.csv", [{"text": r["sentence"], "topics": "food;price" if i % 3 else "service"}
                                          for i, r in enumerate(rows())])
    recipe, _ = init_and_read(data, tmp_path / "r.toml")
    assert recipe["task"]["name"] == "multi-label-classification"
    assert recipe["data"]["label_column"] == "topics" and recipe["data"]["label_delimiter"] == ";"


def test_numeric_target_is_regression_and_both_targets_are_ambiguous(tmp_path):
    data = write_csv(tmp_path / "v.csv", [{"text": r["sentence"], "valence": (i % 9) * 0.45 - 2}
                                          for i, r in enumerate(rows())])
    recipe, _ = init_and_read(data, tmp_path / "r.toml")
    assert recipe["task"]["name"] == "text-regression" and recipe["data"]["target_column"] == "valence"
    both = write_csv(tmp_path / "b.csv", [{"text": r["sentence"], "label": r["label"], "valence": (i % 9) * 0.45}
                                          for i, r in enumerate(rows())])
    with pytest.raises(DataError, match="ambiguous data") as err:
        init_and_read(both, tmp_path / "b.toml")
    assert "--task text-classification" in str(err.value) and "--task text-regression" in str(err.value)


def test_two_texts_and_no_label_are_refused(tmp_path):
    data = write_csv(tmp_path / "q.csv", [{"sentence": r["sentence"], "other": f"a reply number {i} to it, long"}
                                          for i, r in enumerate(rows())])
    with pytest.raises(DataError, match="no claim is sure of it") as err:
        init_and_read(data, tmp_path / "r.toml")
    assert "--task causal-lm" in str(err.value)


def test_conll_and_token_jsonl_are_token_classification(tmp_path):
    from finetune_nlp import claims, token_classification

    assert claims.CONLL_SUFFIXES == token_classification.CONLL_SUFFIXES  # init claims what the task reads
    conll = tmp_path / "ner.conll"
    conll.write_text("John\tB-PER\nlives\tO\nin\tO\nParis\tB-LOC\n\nMary\tB-PER\nsmiled\tO\n")
    recipe, said = init_and_read(conll, tmp_path / "a.toml")
    assert recipe["task"]["name"] == "token-classification" and recipe["data"]["train"] == "ner.conll"
    assert any("entity types LOC, PER" in s for s in said)
    words = write_jsonl(tmp_path / "w.jsonl", [{"words": ["John", "lives", str(i)], "ner": ["B-PER", "O", "O"]}
                                               for i in range(10)])
    recipe, _ = init_and_read(words, tmp_path / "b.toml")
    assert recipe["task"]["name"] == "token-classification"
    assert (recipe["data"]["tokens_column"], recipe["data"]["tags_column"]) == ("words", "ner")


def test_squad_json_is_question_answering(tmp_path):
    def article(title):
        context = f"{title} is a city. It has a river."
        answer = {"text": "a city", "answer_start": len(title) + 4}
        return {"title": title, "paragraphs": [{"context": context, "qas": [
            {"id": f"{title}1", "question": "What is it?", "answers": [answer]}]}]}

    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [article("Rome"), article("Oslo")]}))
    assert DataProbe(path).table is None  # one JSON object, not a list of records
    recipe, _ = init_and_read(path, tmp_path / "r.toml")
    assert recipe["task"]["name"] == "question-answering" and recipe["data"]["group_column"] == "title"
