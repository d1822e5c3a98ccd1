"""Cached tokenization (finetune.cached_encode, used by the NLP encoder tasks): reused by the next run and by
resume without calling the tokenizer, rebuilt when the data, the tokenizer, max_length or the text column
change, a damaged entry rebuilt rather than trusted, concurrent writers safe, results the same without it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, write_csv


@pytest.fixture
def token_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "tokens"
    monkeypatch.setenv("FINETUNE_TOKEN_CACHE", str(folder))
    return folder


@pytest.fixture
def tokenized(monkeypatch) -> list[str]:
    """Every text any transformers tokenizer is asked to tokenize (a spy on PreTrainedTokenizerBase.__call__)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    seen: list[str] = []
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    return seen


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.arrow")) if folder.exists() else []


def session_task(recipe: Path, *overrides: str):
    """The recipe's task with its data prepared, and the backbone's tokenizer (no model loaded)."""
    from transformers import AutoTokenizer

    from finetune.run.session import open_session

    session = open_session(recipe, list(overrides))
    tokenizer = AutoTokenizer.from_pretrained(session.backbone.path, local_files_only=True)
    return session.task.task, session.splits, tokenizer


def as_lists(columns) -> dict[str, list[list[int]]]:
    return {name: [list(row) for row in column] for name, column in columns.items()}


def test_invalidation_data_tokenizer_max_length_text_column(make_recipe, sentiment_csv, tmp_path, tiny_bert,
                                                           token_cache, tokenized):
    from finetune.testing import tiny_text_backbone

    recipe = make_recipe()
    task, splits, tok = session_task(recipe)
    first = task.encode(splits.train, tok)
    assert not first.reused and len(entries(token_cache)) == 1
    expected = dict(tok(splits.train["text"].tolist(), truncation=True, max_length=16))
    assert as_lists(first) == {k: [list(v) for v in rows] for k, rows in expected.items()}  # same as without it
    tokenized.clear()

    again = task.encode(splits.train, tok)  # same data, tokenizer, max length: read back, tokenizer not called
    assert again.reused and again.path == first.path and tokenized == []
    assert as_lists(again) == as_lists(first)

    # max_length changed
    task8, splits8, _ = session_task(recipe, "data.max_length=4")
    short = task8.encode(splits8.train, tok)
    assert not short.reused and len(entries(token_cache)) == 2
    assert max(short["input_ids"].lengths()) == 4

    # another tokenizer (other vocabulary) on the same texts
    other = tiny_text_backbone(tmp_path / "other-bert", ["good", "bad", "movie"])
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(other, local_files_only=True)
    tokenized.clear()
    by_other = task.encode(splits.train, tok2)
    assert not by_other.reused and tokenized and len(entries(token_cache)) == 3
    assert as_lists(by_other) != as_lists(first)

    # the data file changed (one row): its split is tokenized again
    rows = make_sentiment_rows(160)
    rows[5]["text"] = "good good good day"
    write_csv(sentiment_csv, rows)
    task_c, splits_c, _ = session_task(recipe)
    changed = task_c.encode(splits_c.train, tok)
    assert not changed.reused and len(entries(token_cache)) == 4

    # another text column with the same texts in another order
    rows = [{"text": r["text"], "other": rows[-1 - i]["text"], "label": r["label"]} for i, r in enumerate(rows)]
    two = write_csv(tmp_path / "data" / "two.csv", rows)
    task_t, splits_t, _ = session_task(recipe, f"data.train={two}")
    by_text = task_t.encode(splits_t.train, tok)
    task_o, splits_o, _ = session_task(recipe, f"data.train={two}", "data.text_column=other")
    by_other_column = task_o.encode(splits_o.train, tok)
    assert by_text.path != by_other_column.path and not by_other_column.reused


def test_damaged_entry_is_rebuilt_not_trusted(make_recipe, token_cache, tokenized, capsys):
    task, splits, tok = session_task(make_recipe())
    good = as_lists(task.encode(splits.eval, tok))
    [entry] = entries(token_cache)
    data = entry.read_bytes()
    for damaged in (data[: len(data) // 2], b"not an arrow file", b""):  # cut short, garbage, empty
        entry.write_bytes(damaged)
        tokenized.clear()
        rebuilt = task.encode(splits.eval, tok)
        assert not rebuilt.reused and tokenized, "a damaged entry must not be trusted"
        assert as_lists(rebuilt) == good
        assert "damaged" in capsys.readouterr().err
        assert task.encode(splits.eval, tok).reused  # the rebuilt entry is good


def test_an_entry_of_another_key_or_row_count_is_not_trusted(token_cache):
    from finetune import cached_encode

    chunks = lambda: iter([{"input_ids": [[1, 2], [3]]}])  # noqa: E731
    first = cached_encode({"k": 1}, 2, chunks)
    other = cached_encode({"k": 2}, 2, lambda: iter([{"input_ids": [[7], [8, 9]]}]))
    os.replace(other.path, first.path)  # an entry renamed by hand: holds the key of {"k": 2}
    again = cached_encode({"k": 1}, 2, chunks)
    assert not again.reused and as_lists(again) == {"input_ids": [[1, 2], [3]]}
    with pytest.raises(ValueError, match="3 rows"):
        cached_encode({"k": 3}, 3, chunks)  # a tokenizer that drops rows is an error, never cached
    assert len(entries(token_cache)) == 1 and not list(token_cache.glob("*.tmp-*"))


def test_concurrent_writers_do_not_corrupt_the_entry(token_cache):
    from finetune import cached_encode

    rows = [[i % 97, i % 13, 5] for i in range(3000)]
    barrier = threading.Barrier(4)

    def chunks():
        barrier.wait(timeout=30)  # all writers build at the same time
        for start in range(0, len(rows), 500):
            part = rows[start:start + 500]
            yield {"input_ids": part, "attention_mask": [[1] * len(r) for r in part]}

    results, errors = [], []

    def write():
        try:
            results.append(cached_encode({"concurrent": True}, len(rows), chunks))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4
    for columns in results:
        assert [list(r) for r in columns["input_ids"]] == rows
    assert len(entries(token_cache)) == 1 and not list(token_cache.glob("*.tmp-*"))
    assert cached_encode({"concurrent": True}, len(rows), lambda: iter(())).reused


def test_cache_off_builds_the_same_arrays_in_memory(token_cache, monkeypatch):
    from finetune import cached_encode

    chunks = lambda: iter([{"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]},  # noqa: E731
                           {"input_ids": [[4]], "attention_mask": [[1]]}])
    cached = cached_encode({"x": 1}, 2, chunks)
    monkeypatch.setenv("FINETUNE_TOKEN_CACHE", "off")
    plain = cached_encode({"x": 1}, 2, chunks)
    assert plain.path is None and as_lists(plain) == as_lists(cached) == {"input_ids": [[1, 2, 3], [4]],
                                                                            "attention_mask": [[1, 1, 1], [1]]}
    assert plain["input_ids"].lengths() == [3, 1] and plain["input_ids"][-1] == [4]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    """A run Ctrl-C'd at step 2 then resumed, a second run on the same data, a third with the cache off
    (the texts each run tokenized recorded)."""
    import signal

    import tomli_w
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from finetune import hookimpl
    from finetune.engine.console import Console
    from finetune.engine.plugins import get_registry
    from finetune.engine.stop import Interrupted
    from finetune.run.training import run_recipe

    base = tmp_path_factory.mktemp("token-cache-runs")
    cache = base / "tokens"
    train = write_csv(base / "train.csv", make_sentiment_rows(96))

    def recipe(name: str) -> Path:
        path = base / f"{name}.toml"
        path.write_text(tomli_w.dumps({
            "task": {"name": "text-classification", "baseline": False},
            "model": {"backbone": str(tiny_bert)},
            "data": {"train": str(train), "split": 0.25, "max_length": 16},
            "peft": {"r": 4, "alpha": 8},
            "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no",
                      "log_every_steps": 1, "checkpoint_every_steps": 1, "seed": 0},
            "output": {"dir": str(base / name)}}))
        return path

    seen: list[str] = []
    original = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    class CtrlC:
        def on_log(self, run, state, logs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    class Plugin:
        @hookimpl
        def finetune_register_callbacks(self, register):
            register(CtrlC())

    saved = os.environ.get("FINETUNE_TOKEN_CACHE")
    os.environ["FINETUNE_TOKEN_CACHE"] = str(cache)
    PreTrainedTokenizerBase.__call__ = spy
    quiet, texts, out = Console(quiet=True), {}, {}
    registry = get_registry()
    try:
        registry.pm.register(Plugin(), name="test-token-cache-ctrl-c")
        try:
            with pytest.raises(Interrupted):
                run_recipe(recipe("cut"), [], console=quiet)
        finally:
            registry.pm.unregister(name="test-token-cache-ctrl-c")
        texts["cold"], seen[:] = list(seen), []
        out["entries_after_cold"] = entries(cache)
        out["resumed"] = run_recipe(recipe("cut"), [], resume=True, console=quiet)
        texts["resume"], seen[:] = list(seen), []
        out["second"] = run_recipe(recipe("second"), [], console=quiet)
        texts["second"], seen[:] = list(seen), []
        os.environ["FINETUNE_TOKEN_CACHE"] = "off"
        out["off"] = run_recipe(recipe("off"), [], console=quiet)
        texts["off"], seen[:] = list(seen), []
    finally:
        PreTrainedTokenizerBase.__call__ = original
        if saved is None:
            os.environ.pop("FINETUNE_TOKEN_CACHE", None)
        else:
            os.environ["FINETUNE_TOKEN_CACHE"] = saved
    from finetune.run.session import open_session

    # The training split's texts: only build_dataset tokenizes them (the report's samples are eval rows).
    out["texts"], out["train_texts"] = texts, set(open_session(base / "second.toml").splits.train["text"])
    out["entries"] = entries(cache)
    return out


def test_the_next_run_and_resume_reuse_the_cache_without_tokenizing(runs):
    train_texts = runs["train_texts"]
    assert len(runs["entries_after_cold"]) == 2  # train and eval split, written by the first run
    assert train_texts & set(runs["texts"]["cold"])
    for name in ("resume", "second"):
        assert not train_texts & set(runs["texts"][name]), f"the {name} run tokenized the data again"
    assert runs["entries"] == runs["entries_after_cold"]
    assert runs["resumed"].is_finished() and runs["second"].is_finished()


def test_results_are_the_same_with_and_without_the_cache(runs):
    assert train_texts_tokenized(runs, "off")
    metrics = [json.loads(runs[name].metrics_file.read_text()) for name in ("resumed", "second", "off")]
    assert metrics[1]["last"] == metrics[2]["last"] and metrics[1]["best"] == metrics[2]["best"]
    assert metrics[0]["last"] == metrics[1]["last"]


def train_texts_tokenized(runs, name: str) -> bool:
    return bool(runs["train_texts"] & set(runs["texts"][name]))


def test_the_baseline_fits_on_a_sample_of_a_big_table(make_recipe, monkeypatch, capsys):
    import finetune_nlp.text_shared as shared

    task, splits, _ = session_task(make_recipe())
    monkeypatch.setattr(shared, "BASELINE_MAX_ROWS", 30)
    sampled = task.baseline_splits(splits)
    assert len(sampled.train) == 30 and len(sampled.eval) == 30 and len(splits.train) == 120
    assert set(sampled.train.index) <= set(splits.train.index)
    assert "sample of 30 of the 120 train rows" in capsys.readouterr().err
    result = task.baseline(splits)
    assert 0.0 <= result["accuracy"] <= 1.0
