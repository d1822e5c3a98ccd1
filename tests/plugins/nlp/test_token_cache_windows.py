"""Cached tokenization for the windowed NLP tasks (token-classification, question-answering; finetune_nlp.windows
through finetune.cached_encode): the windows read back equal the tokenizer's, a second build reuses them without
calling the tokenizer, and another max length, tokenizer, doc stride or an edited word, tag or answer rebuilds them;
a second run reuses every split and ends with the same metrics as a run with the cache off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_plugins import write_jsonl
from qa_fixtures import qa_rows
from test_question_answering import make_recipe as make_qa_recipe
from test_token_cache import entries, session_task
from test_token_classification import make_recipe as make_ner_recipe
from test_token_classification import ner_rows


@pytest.fixture
def token_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "tokens"
    monkeypatch.setenv("FINETUNE_TOKEN_CACHE", str(folder))
    return folder


@pytest.fixture
def tokenized(monkeypatch) -> list:
    """Every input any transformers tokenizer is asked to tokenize (a spy on PreTrainedTokenizerBase.__call__)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    seen: list = []
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    return seen


def items(dataset) -> list[dict]:
    return [dict(dataset[i]) for i in range(len(dataset))]


def test_token_classification_windows_reuse_and_invalidation(tmp_path, tiny_bert, token_cache, tokenized):
    from transformers import AutoTokenizer

    from finetune.testing import tiny_text_backbone

    rows = ner_rows(40, max_chunks=8)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = make_ner_recipe(tmp_path, tiny_bert, train, data={"max_length": 8})
    task, splits, tok = session_task(recipe)
    built = task.build_dataset(splits.eval, tok, training=False)
    assert not built.reused and len(entries(token_cache)) == 1
    tokens, tags = list(splits.eval["tokens"]), list(splits.eval["tags"])
    expected = task._windows(tokens, tok, tags)
    assert len(expected) > len(tokens)  # some sentences need several windows at 8 sub-tokens
    assert items(built) == expected  # the windows read back are the tokenizer's
    assert built.lengths() == [len(w["input_ids"]) for w in expected] == task.example_lengths(built)
    assert built[1:3] == expected[1:3] and built[-1] == expected[-1]

    tokenized.clear()
    again = task.build_dataset(splits.eval, tok, training=False)  # same data, tokenizer, max length
    assert again.reused and again.path == built.path and tokenized == [], "the cached windows were tokenized again"
    training = task.build_dataset(splits.eval, tok, training=True)  # the same entry, without the placement fields
    assert training.reused and tokenized == []
    assert items(training) == [{k: v for k, v in w.items() if k not in ("sentence", "word_start")} for w in expected]

    # max_length changed
    task16, splits16, _ = session_task(recipe, "data.max_length=16")
    longer = task16.build_dataset(splits16.eval, tok, training=False)
    assert not longer.reused and len(entries(token_cache)) == 2 and len(longer) < len(built)

    # another tokenizer (another vocabulary) on the same sentences
    other = AutoTokenizer.from_pretrained(tiny_text_backbone(tmp_path / "other-bert", ["good", "bad", "day"]),
                                          local_files_only=True)
    tokenized.clear()
    by_other = task.build_dataset(splits.eval, other, training=False)
    assert not by_other.reused and tokenized and len(entries(token_cache)) == 3
    assert items(by_other) == task._windows(tokens, other, tags)

    # the data changed: one tag of one eval sentence (O -> B-LOC, valid in IOB2), then one word
    eval_tokens = [list(t) for t in splits.eval["tokens"]]
    i = next(i for i, r in enumerate(rows) if r["tokens"] in eval_tokens and "O" in r["tags"]
             and sum(other["tokens"] == r["tokens"] for other in rows) == 1)
    j = rows[i]["tags"].index("O")
    for field, value in (("tags", "B-LOC"), ("tokens", "zebra")):
        edited = [{"tokens": list(r["tokens"]), "tags": list(r["tags"])} for r in rows]
        edited[i][field][j] = value
        write_jsonl(train, edited)
        task_e, splits_e, _ = session_task(recipe)
        assert edited[i]["tokens"] in [list(t) for t in splits_e.eval["tokens"]]  # the same split
        changed = task_e.build_dataset(splits_e.eval, tok, training=False)
        assert not changed.reused, f"an edited {field[:-1]} must not reuse the old windows"
        assert items(changed) == task_e._windows(list(splits_e.eval["tokens"]), tok, list(splits_e.eval["tags"]))
    assert len(entries(token_cache)) == 5


def test_question_answering_windows_reuse_and_invalidation(tmp_path, tiny_bert, token_cache, tokenized):
    rows = qa_rows(12, words=(20, 40))  # longer than a window (24 tokens, question included)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = make_qa_recipe(tmp_path, tiny_bert, train)
    task, splits, tok = session_task(recipe)
    ev = splits.eval
    built = task.build_dataset(ev, tok, training=False)
    first = min(w["example"] for w in items(built))
    expected = task._features(list(ev["context"]), list(ev["question"]), tok, [list(a) for a in ev["answers"]])
    for w in expected:
        w["example"] += first
    assert len(expected) > len(ev) and items(built) == expected  # long contexts: several windows each
    assert not built.reused and len(entries(token_cache)) == 1

    tokenized.clear()
    again = task.build_dataset(ev, tok, training=False)
    assert again.reused and tokenized == [], "the cached windows were tokenized again"
    assert [w["example"] - first - len(ev) for w in items(again)] == [w["example"] - first for w in expected]
    training = task.build_dataset(ev, tok, training=True)
    assert training.reused
    dropped = ("example", "offsets", "cls_index")
    assert items(training) == [{k: v for k, v in w.items() if k not in dropped} for w in expected]

    for setting in ("data.doc_stride=2", "data.max_length=32"):
        task_s, splits_s, _ = session_task(recipe, setting)
        assert not task_s.build_dataset(splits_s.eval, tok, training=False).reused, setting
    # the data changed: one question reworded, then every question given a second (equal) gold answer
    reworded = [dict(r) for r in rows]
    reworded[next(i for i, r in enumerate(rows) if r["context"] in set(ev["context"]))]["question"] = "what is good"
    two_answers = [dict(r, answers={k: v * 2 for k, v in r["answers"].items()}) for r in rows]
    for edited in (reworded, two_answers):
        write_jsonl(train, edited)
        task_e, splits_e, _ = session_task(recipe)
        assert not task_e.build_dataset(splits_e.eval, tok, training=False).reused
    assert len(entries(token_cache)) == 5


@pytest.fixture(scope="module")
def ner_runs(tmp_path_factory, tiny_bert):
    """Three tiny token-classification runs on the same data: cold cache, warm cache, cache off (which of
    their datasets were read back from the cache recorded)."""
    from finetune.engine.console import Console
    from finetune.run.training import run_recipe
    from finetune_nlp.token_classification import TokenClassification

    base = tmp_path_factory.mktemp("ner-cache-runs")
    train = write_jsonl(base / "train.jsonl", ner_rows(48, max_chunks=8))
    reused: dict[str, list[bool]] = {}
    original = TokenClassification.build_dataset
    current: list[str] = []

    def recording(self, examples, processor, training):
        dataset = original(self, examples, processor, training=training)
        reused.setdefault(current[0], []).append(bool(getattr(dataset, "reused", False)))
        return dataset

    saved = os.environ.get("FINETUNE_TOKEN_CACHE")
    TokenClassification.build_dataset = recording
    out = {}
    try:
        for name, cache in (("cold", base / "tokens"), ("warm", base / "tokens"), ("off", "off")):
            os.environ["FINETUNE_TOKEN_CACHE"] = str(cache)
            current[:] = [name]
            (base / name).mkdir()
            recipe = make_ner_recipe(base / name, tiny_bert, train, data={"max_length": 8}, train_opts={"epochs": 1})
            out[name] = json.loads(run_recipe(recipe, [], console=Console(quiet=True)).metrics_file.read_text())
    finally:
        TokenClassification.build_dataset = original
        if saved is None:
            os.environ.pop("FINETUNE_TOKEN_CACHE", None)
        else:
            os.environ["FINETUNE_TOKEN_CACHE"] = saved
    out["reused"] = reused
    out["entries"] = entries(base / "tokens")
    return out


def test_a_second_ner_run_reuses_every_split_with_the_same_results(ner_runs):
    reused = ner_runs["reused"]
    assert reused["cold"] and not any(reused["cold"])  # train and eval tokenized once, written
    assert reused["warm"] == [True] * len(reused["cold"])  # the second run reads every split back
    assert reused["off"] == [False] * len(reused["cold"])
    assert len(ner_runs["entries"]) == 2  # train and eval
    for name in ("warm", "off"):
        assert ner_runs[name]["best"] == ner_runs["cold"]["best"] and ner_runs[name]["last"] == ner_runs["cold"]["last"]
