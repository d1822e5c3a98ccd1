"""token-classification (finetune_nlp.token_classification): data formats, tag schemes, windows of whole
words, entity-level metrics (checked by hand and against seqeval), and a tiny run through the CLI."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from conftest import NEGATIVE, NEUTRAL, POSITIVE, assert_resume_equals_uninterrupted, run_cli
from fake_plugins import write_jsonl

from finetune.errors import DataError
from finetune.run.session import open_session
from finetune_nlp.token_classification import (
    check_sequence,
    detect_scheme,
    entity_metrics,
    get_entities,
    to_iob2,
)

HAVE_SEQEVAL = importlib.util.find_spec("seqeval") is not None


def ner_rows(n: int, seed: int = 0, max_chunks: int = 5) -> list[dict]:
    """Sentences of O words (neutral), PER chunks (1-2 positive words) and LOC chunks (one negative word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(1, max_chunks)):
            kind = rng.choice(["O", "O", "PER", "LOC"])
            if kind == "O":
                tokens.append(rng.choice(NEUTRAL))
                tags.append("O")
            elif kind == "PER":
                size = rng.randint(1, 2)
                tokens += [rng.choice(POSITIVE) for _ in range(size)]
                tags += ["B-PER"] + ["I-PER"] * (size - 1)
            else:
                tokens.append(rng.choice(NEGATIVE))
                tags.append("B-LOC")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict], docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for row in rows:
        lines += [f"{word} NN B-NP {tag}" for word, tag in zip(row["tokens"], row["tags"])] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_recipe(tmp_path: Path, backbone: Path, train: Path, *, data: dict | None = None,
                train_opts: dict | None = None, name: str = "ner.toml") -> Path:
    import tomli_w

    recipe = {
        "task": {"name": "token-classification"},
        "model": {"backbone": str(backbone)},
        "data": {"train": str(train), "split": 0.25, "max_length": 16, **(data or {})},
        "peft": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no",
                  "log_every_steps": 2, "checkpoint_every_steps": 0, "seed": 0, **(train_opts or {})},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / name
    path.write_text(tomli_w.dumps(recipe))
    return path


# -- data formats ---------------------------------------------------------------


def test_jsonl_and_conll_with_docstart_read_the_same_sentences(tmp_path, tiny_bert):
    rows = ner_rows(40)
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    conll = write_conll(tmp_path / "train.conll", rows)
    a = open_session(make_recipe(tmp_path, tiny_bert, jsonl)).splits
    b = open_session(make_recipe(tmp_path, tiny_bert, conll)).splits
    for x, y in ((a.train, b.train), (a.eval, b.eval)):
        assert list(x["tokens"]) == list(y["tokens"]) and list(x["tags"]) == list(y["tags"])
    assert len(a.train) + len(a.eval) == 40 and len(a.eval) == 10
    assert a.info["tag_scheme"] == "IOB2" and a.info["entity_types"] == ["LOC", "PER"]
    # limit, eval file and custom column names
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"words": r["tokens"], "ner": r["tags"]} for r in rows])
    ev = write_conll(tmp_path / "eval.txt", ner_rows(7, seed=3), docstart=False)
    c = open_session(make_recipe(tmp_path, tiny_bert, renamed, data={
        "tokens_column": "words", "tags_column": "ner", "limit": 12, "eval": str(ev)})).splits
    assert (len(c.train), len(c.eval)) == (12, 7)


@pytest.mark.parametrize("content,message", [
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', "line 2: 2 tokens but 1 tags"),
    ('{"tokens": [], "tags": []}\n', "line 2: an empty sentence"),
    ('{"words": ["a"], "tags": ["O"]}\n', "line 2: no 'tokens' field (data.tokens_column)"),
    ('{"tokens": ["a"], "tags": ["PER"]}\n', "line 2: tag 'PER' is not O or B-/I-/E-/S-"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, tiny_bert, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"tokens": ["good", "day"], "tags": ["B-PER", "O"]}\n' + content)
    with pytest.raises(DataError) as err:
        open_session(make_recipe(tmp_path, tiny_bert, path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_an_eval_tag_of_a_type_never_trained_is_an_error(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(20))
    ev = write_conll(tmp_path / "eval.conll", [{"tokens": ["good", "day"], "tags": ["B-PER", "O"]},
                                               {"tokens": ["a", "day"], "tags": ["O", "B-MISC"]}])
    with pytest.raises(DataError) as err:
        open_session(make_recipe(tmp_path, tiny_bert, train, data={"eval": str(ev)}))
    assert f"data.eval: {ev}, line 6: tag 'B-MISC'" in str(err.value)  # after -DOCSTART- and a blank line


# -- tag schemes -------------------------------------------------------------------


def test_scheme_detection_and_conversion_to_iob2():
    assert detect_scheme([["B-PER", "I-PER", "O", "B-LOC"]]) == "IOB2"
    assert detect_scheme([["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]) == "IOB1"
    assert detect_scheme([["S-PER", "O", "B-LOC", "E-LOC"]]) == "BIOES"
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC"]]) == "IO"
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-PER"], "IOB1") == \
        ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-PER"]
    assert to_iob2(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], "BIOES") == ["B-PER", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC"], "IO") == ["B-PER", "I-PER", "O", "B-LOC"]
    assert check_sequence(["B-LOC", "I-PER"], "IOB2") == (1, "I-PER after B-LOC (an I- tag must continue a B- "
                                                              "or I- of its type)")
    assert check_sequence(["O", "I-PER"], "IOB2")[0] == 1
    assert check_sequence(["B-PER", "O"], "BIOES")[0] == 1
    assert check_sequence(["B-PER", "I-PER"], "BIOES")[0] == 1  # unfinished chunk
    assert check_sequence(["B-PER", "E-LOC"], "BIOES")[0] == 1
    assert check_sequence(["S-PER", "B-LOC", "E-LOC"], "BIOES") is None


def test_bioes_and_iob1_files_are_converted(tmp_path, tiny_bert):
    rows = [{"tokens": ["good", "great", "day", "bad"], "tags": ["B-PER", "E-PER", "O", "S-LOC"]}] * 8
    splits = open_session(make_recipe(tmp_path, tiny_bert, write_jsonl(tmp_path / "t.jsonl", rows))).splits
    assert splits.info["tag_scheme"] == "BIOES"
    assert list(splits.train["tags"])[0] == ["B-PER", "I-PER", "O", "B-LOC"]
    rows = [{"tokens": ["good", "great", "day", "bad"], "tags": ["I-PER", "B-PER", "O", "I-LOC"]}] * 8
    splits = open_session(make_recipe(tmp_path, tiny_bert, write_jsonl(tmp_path / "t1.jsonl", rows))).splits
    assert splits.info["tag_scheme"] == "IOB1"
    assert list(splits.train["tags"])[0] == ["B-PER", "B-PER", "O", "B-LOC"]


def test_an_invalid_iob2_sequence_names_the_file_and_line(tmp_path, tiny_bert):
    rows = ner_rows(10)
    rows.append({"tokens": ["bad", "good", "day"], "tags": ["B-LOC", "I-PER", "O"]})
    conll = write_conll(tmp_path / "train.conll", rows)
    bad_line = conll.read_text().splitlines().index("good NN B-NP I-PER", -8) + 1
    with pytest.raises(DataError) as err:
        open_session(make_recipe(tmp_path, tiny_bert, conll))
    assert f"data.train: {conll}, line {bad_line}: invalid IOB2 tag sequence" in str(err.value)
    assert "I-PER after B-LOC" in str(err.value)
    # a named strict scheme too
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"tokens": ["good", "day"], "tags": ["B-PER", "O"]}] * 3)
    with pytest.raises(DataError, match=r"b.jsonl, line 1: invalid BIOES tag sequence"):
        open_session(make_recipe(tmp_path, tiny_bert, jsonl, data={"tag_scheme": "BIOES"}))


# -- windows ---------------------------------------------------------------------


def test_a_sentence_longer_than_max_length_gets_a_prediction_for_every_word(tmp_path, tiny_bert):
    import torch

    rows = ner_rows(30, max_chunks=12)
    long_row = {"tokens": ["good", "day"] * 20, "tags": ["B-PER", "O"] * 20}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    ev = write_jsonl(tmp_path / "eval.jsonl", [long_row, *ner_rows(5, seed=9)])
    session = open_session(make_recipe(tmp_path, tiny_bert, train, data={"eval": str(ev), "max_length": 8}))
    task = session.task
    model, tokenizer = task.load_model(session.backbone)
    model.eval()
    dataset = task.build_dataset(session.splits.eval, tokenizer, training=False)
    assert all(len(item["input_ids"]) <= 8 for item in dataset)
    assert sum(item["sentence"] == 0 for item in dataset) == 7  # 40 words, 6 per window
    collate = task.collate_fn(tokenizer)
    predictions, references = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            out = task.evaluation_step(model, collate(dataset[start:start + 4]))
            predictions += out["predictions"]
            references += out["references"]
    metrics = task.compute_metrics(predictions, references)
    assert metrics["sentences"] == 6
    words = sum(len(t) for t in session.splits.eval["tokens"])
    assert sum(len(ids) for _, _, ids in references) == words
    with torch.no_grad():
        [row] = task.predict(model, tokenizer, [{"tokens": long_row["tokens"]}], batch_size=3)
    assert len(row["pred_tags"]) == 40 and all(row["pred_tags"])


# -- metrics ---------------------------------------------------------------------


def test_entity_metrics_by_hand():
    ref = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-LOC"]]
    m = entity_metrics(ref, pred)
    # true: PER(0-1), LOC(3), LOC(0'), PER(2'); predicted: PER(0-1), LOC(0'), LOC(2'); 2 correct
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["token_accuracy"] == pytest.approx(5 / 7)
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_type"]["LOC"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # a boundary error is a miss; an I- without B- starts a chunk (seqeval's default mode)
    assert entity_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    assert get_entities(["O", "I-PER", "I-PER", "B-PER", "I-LOC"]) == [("PER", 1, 2), ("PER", 3, 3), ("LOC", 4, 4)]
    assert entity_metrics([["O"]], [["O"]])["f1"] == 0.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # seqeval's macro average of no types
@pytest.mark.skipif(not HAVE_SEQEVAL, reason="seqeval not installed (pip install seqeval, the dev extra)")
def test_entity_metrics_match_seqeval_on_random_sequences():
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    rng = random.Random(1)
    for trial in range(200):
        ref = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
        pred = [[rng.choice(tags) if rng.random() < 0.5 else t for t in sent] for sent in ref]
        ours = entity_metrics(ref, pred)
        assert ours["f1"] == pytest.approx(f1_score(ref, pred, zero_division=0), abs=1e-12), trial
        assert ours["precision"] == pytest.approx(precision_score(ref, pred, zero_division=0), abs=1e-12), trial
        assert ours["recall"] == pytest.approx(recall_score(ref, pred, zero_division=0), abs=1e-12), trial
        assert ours["token_accuracy"] == pytest.approx(accuracy_score(ref, pred), abs=1e-12), trial
        report = classification_report(ref, pred, output_dict=True, zero_division=0)
        for kind, scores in report.items():
            if kind in ("micro avg", "macro avg", "weighted avg"):
                continue
            for key in ("precision", "recall", "f1-score"):
                assert ours["per_type"][kind][key.replace("-score", "")] == pytest.approx(scores[key]), (trial, kind)
            assert ours["per_type"][kind]["support"] == scores["support"]


# -- end to end ---------------------------------------------------------------------


def test_tiny_run_predict_evaluate_and_plain_peft_reload(tmp_path, tiny_bert, monkeypatch, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from finetune.run.inference import load_run

    train = write_conll(tmp_path / "data" / "train.conll", ner_rows(96, max_chunks=6))
    test = write_jsonl(tmp_path / "data" / "test.jsonl", ner_rows(12, seed=5))
    recipe = make_recipe(tmp_path, tiny_bert, train, data={"test": str(test), "max_length": 8},
                         train_opts={"epochs": 3})
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("best", "before", "test"):
        assert {"f1", "precision", "recall", "token_accuracy"} <= set(metrics[split]), split
    assert metrics["best"]["f1"] > metrics["before"]["f1"]
    assert 0.0 <= metrics["baseline"]["f1"] <= 1.0 and "most frequent" in metrics["baseline"]["name"]
    assert set(metrics["best_details"]["per_type"]) <= {"PER", "LOC"}
    card = (run / "README.md").read_text()
    assert "AutoModelForTokenClassification" in card and "token-classification" in card

    # predict: a JSONL file with lists, and --text split on whitespace
    inp = write_jsonl(tmp_path / "new.jsonl", [{"tokens": ["good", "great", "day", "bad"], "id": 1},
                                               {"tokens": ["the"] * 20, "id": 2}])
    out = tmp_path / "preds.jsonl"
    result = run_cli("predict", str(run), "--input", str(inp), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and rows[0]["tokens"] == ["good", "great", "day", "bad"]
    assert len(rows[0]["pred_tags"]) == 4 and len(rows[1]["pred_tags"]) == 20  # longer than max_length
    for row in rows:
        for entity in row["pred_entities"]:
            assert set(entity) == {"text", "type", "start", "end", "score"}
            assert entity["text"] == " ".join(row["tokens"][entity["start"]:entity["end"]])
            assert row["pred_tags"][entity["start"]] in (f"B-{entity['type']}", f"I-{entity['type']}")
    result = run_cli("predict", str(run), "--text", "good great day bad")
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [json.loads(li) for li in result.stdout.splitlines()]
    assert line["pred_tags"] == rows[0]["pred_tags"]

    # evaluate --input on the test file gives the test numbers
    scores = tmp_path / "scores.json"
    result = run_cli("evaluate", str(run), "--input", str(test), "--output", str(scores))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(scores.read_text())
    for key in ("f1", "precision", "recall", "token_accuracy"):
        assert got["metrics"][key] == pytest.approx(metrics["test"][key], abs=1e-6), key

    # plain peft + transformers load the adapter: the same logits
    task, ours, _, _ = load_run(run)
    labels = task.state["labels"]
    base = AutoModelForTokenClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
    plain = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    batch = tokenizer([["good", "great", "day"], ["bad", "food"]], is_split_into_words=True,
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)
    # the model card's usage snippet runs as written (from the run folder, where adapter/ is)
    monkeypatch.chdir(run)
    capsys.readouterr()
    exec(task.usage_snippet(str(tiny_bert)), {})
    import ast

    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert [w for w, _ in printed] == "Ada Lovelace lived in London".split()
    assert all(tag in labels for _, tag in printed)


def test_only_the_first_sub_token_of_a_word_is_labelled_and_long_words_keep_their_start(tmp_path, tiny_bert):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "##ness", "day"]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # transformers 5: vocab=
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(12))
    task = open_session(make_recipe(tmp_path, tiny_bert, train, data={"max_length": 4})).task
    labels = task.state["labels"]  # O, B-LOC, I-LOC, B-PER, I-PER
    items = task._windows([["goodness", "day"], ["goodnessnessness", "day"]], tokenizer,
                          [["B-PER", "O"], ["B-LOC", "O"]])
    # max_length 4: [CLS] + 2 sub-tokens + [SEP] per window, so each word gets its own window
    assert [(i["sentence"], i["word_start"]) for i in items] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert tokenizer.convert_ids_to_tokens(items[0]["input_ids"]) == ["[CLS]", "good", "##ness", "[SEP]"]
    assert items[0]["labels"] == [-100, labels.index("B-PER"), -100, -100]
    assert items[1]["labels"] == [-100, labels.index("O"), -100]
    # a word of 4 sub-tokens is cut to the window, its first sub-token still carries the tag
    assert tokenizer.convert_ids_to_tokens(items[2]["input_ids"]) == ["[CLS]", "good", "##ness", "[SEP]"]
    assert items[2]["labels"] == [-100, labels.index("B-LOC"), -100, -100]
    # one window when the budget allows: labels only on first sub-tokens
    task.recipe.data.max_length = 16
    [item] = task._windows([["goodness", "day", "good"]], tokenizer, [["B-PER", "I-PER", "O"]])
    assert item["labels"] == [-100, labels.index("B-PER"), -100, labels.index("I-PER"), labels.index("O"), -100]


def test_a_conll_file_is_a_prediction_input_with_or_without_tags(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(12))
    task = open_session(make_recipe(tmp_path, tiny_bert, train)).task
    words = tmp_path / "new.conll"
    words.write_text("-DOCSTART-\n\ngood\nday\n\nbad\n")
    assert task.read_predict_input(words) == [{"tokens": ["good", "day"]}, {"tokens": ["bad"]}]
    tagged = write_conll(tmp_path / "gold.conll", [{"tokens": ["good", "day"], "tags": ["B-PER", "O"]}])
    assert task.read_predict_input(tagged) == [{"tokens": ["good", "day"], "tags": ["B-PER", "O"]}]
    jsonl = write_jsonl(tmp_path / "new.jsonl", [{"tokens": ["good", "day"]}])
    assert task.read_predict_input(jsonl) == [{"tokens": ["good", "day"]}]


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_bert, callback_plugin):
    train = write_conll(tmp_path / "data" / "train.conll", ner_rows(48))
    opts = {"epochs": 2, "checkpoint_every_steps": 3}
    full = make_recipe(tmp_path, tiny_bert, train, train_opts=opts, name="full.toml")
    cut = make_recipe(tmp_path, tiny_bert, train, train_opts=opts, name="cut.toml")
    for path, out in ((full, "full"), (cut, "cut")):
        path.write_text(path.read_text().replace(str(tmp_path / "run"), str(tmp_path / out)))
    assert_resume_equals_uninterrupted(callback_plugin, full, cut, stop_at=4)


def test_a_data_set_with_class_label_tags_reads_like_a_file(tmp_path, tiny_bert):
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=names))})

    def split(rows):  # tags as ClassLabel ids, as in conll2003's ner_tags
        return datasets.Dataset.from_dict({"tokens": [r["tokens"] for r in rows],
                                           "ner_tags": [[names.index(t) for t in r["tags"]] for r in rows]},
                                          features=features)

    folder = tmp_path / "ner-data"
    datasets.DatasetDict({"train": split(ner_rows(24)), "validation": split(ner_rows(8, seed=1)),
                          "test": split(ner_rows(6, seed=2))}).save_to_disk(str(folder))
    recipe = make_recipe(tmp_path, tiny_bert, tmp_path / "unused.jsonl")
    session = open_session(recipe, ["data.train=", f"data.dataset={folder}", "data.tags_column=ner_tags",
                                    "data.dataset_eval_split=validation", "data.dataset_test_split=test"])
    splits = session.splits
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (24, 8, 6)
    assert splits.train["tags"].tolist() == [r["tags"] for r in ner_rows(24)]
    assert splits.test["tokens"].tolist() == [r["tokens"] for r in ner_rows(6, seed=2)]
    assert session.task.state["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert splits.info["dataset"] == str(folder)

    # a row whose words and tags disagree: the data set split and the row are named
    rows = ner_rows(8)
    rows[2]["tags"] = rows[2]["tags"][:-1] if len(rows[2]["tags"]) > 1 else []
    datasets.DatasetDict({"train": split(rows)}).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(DataError, match=r"data.dataset_split: .*broken\[train\], row 3: \d+ tokens but \d+ tags"):
        open_session(recipe, ["data.train=", f"data.dataset={tmp_path / 'broken'}", "data.tags_column=ner_tags"])
