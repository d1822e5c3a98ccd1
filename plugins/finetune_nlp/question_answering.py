"""``question-answering``: extractive (SQuAD-style) question answering on any transformers encoder with a
fast tokenizer: the answer is a span of the context.

Data: the official SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``) or flat JSON lines (``context``,
``question``, ``answers`` = ``{"text": [...], "answer_start": [...]}`` as in the Hugging Face ``squad``
data sets, optional ``id``), or ``data.dataset`` in that flat layout. SQuAD v2 questions without an answer
(empty ``answers``, ``is_impossible``) are supported. ``answer_start`` counts characters (Python string
indices) and must point at the answer text, checked for every answer.

A context longer than ``data.max_length`` tokens is read in overlapping windows (``data.doc_stride`` tokens
shared by consecutive windows); the fast tokenizer's offsets map answers from characters to tokens and
predicted spans back to characters, so a prediction is always an exact substring of the context; a span
that starts or ends inside a word (a sub-word token: "Roll" of "Rollo") is widened to the whole word
(runs of letters and digits in the context). The best
span over all windows (``task.n_best`` start and end candidates per window, at most
``task.max_answer_length`` tokens) wins; when unanswerable questions are allowed, "no answer" is predicted
when the null score ([CLS] start + end) beats the best span's by more than the null threshold. With
``task.tune_null_threshold`` (the default) that threshold is tuned on the eval split at every evaluation
(its ``best_f1_thresh``, like the multi-label task's per-label thresholds) and saved with the adapter, so
the selected checkpoint's threshold is the one predict, evaluate and the test split use; otherwise it is
``task.null_threshold``.

Metrics: exact match and F1 with the official SQuAD normalisation (lower case, no punctuation, no
articles, single spaces), the maximum over the gold answers, as the official v2.0 evaluation script
computes them (``exact``, ``f1``; for unanswerable questions the gold is ``""``), as fractions (0-1); with
unanswerable questions also ``HasAns_*``/``NoAns_*`` and ``best_f1`` at ``best_f1_thresh`` (the null
threshold that would have been best on this split). Baseline: the context sentence sharing the most words
with the question.
"""

from __future__ import annotations

import collections
import json
import numbers
import re
import string
from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import (
    DataError,
    DataOptions,
    DataSplits,
    PathStr,
    RecipeError,
    Task,
    TaskOptions,
    attention_projections,
    load_table,
    missing_input_column,
    open_dataset,
    read_jsonl,
    split_frame,
)
from finetune_nlp.text_shared import pad_fields

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class QuestionAnsweringData(DataOptions):
    train: PathStr | None = Field(None, description="Training questions: SQuAD JSON (.json: {\"data\": [{\"title\", "
                                  "\"paragraphs\": [{\"context\", \"qas\": [...]}]}]}), a .json list or .jsonl file "
                                  "of flat records (`context_column`, `question_column`, `answers_column` = "
                                  "{\"text\": [...], \"answer_start\": [...]}), or a .parquet file of them. "
                                  "Or give `dataset` (the flat layout of the Hugging Face `squad` and `squad_v2` "
                                  "data sets).")
    eval: PathStr | None = Field(None, description="Evaluation questions in the same form; if absent, `split` of "
                                 "the training questions is held out (questions on one context, or one "
                                 "`group_column` value, stay together).")
    context_column: str = Field("context", description="Flat records: the field holding the context (passage).")
    question_column: str = Field("question", description="Flat records: the field holding the question.")
    answers_column: str = Field("answers", description="Flat records: the field holding the answers, "
                                "{\"text\": [...], \"answer_start\": [...]} (character offsets) or a list of "
                                "{\"text\", \"answer_start\"}; empty for an unanswerable question.")
    id_column: str = Field("id", description="Flat records: the field holding the question id (optional; the "
                           "line number otherwise).")
    max_length: int = Field(384, gt=8, le=8192, description="Tokens per model input (question + context window); "
                            "longer contexts are read in overlapping windows.")
    doc_stride: int = Field(128, ge=0, description="Context tokens shared by consecutive windows of a long context "
                            "(an answer cut by one window's edge is whole in the next); less than half of "
                            "`max_length`.")


class QuestionAnsweringOptions(TaskOptions):
    baseline: bool = Field(True, description="Also score the sentence-overlap baseline (the context sentence "
                           "sharing the most words with the question) on the split.")
    max_answer_length: int = Field(30, gt=0, description="Longest answer predicted, in tokens.")
    n_best: int = Field(20, gt=0, description="Start and end candidates per window searched for the best span.")
    allow_no_answer: bool | None = Field(
        None, description="Predict \"no answer\" (SQuAD v2.0) when the null score beats the best span; unset: "
        "yes when some training or eval question has no answer.")
    null_threshold: float = Field(
        0.0, description="No answer is predicted when null score - best span score > this (logits; higher: "
        "answers more often). Used when tune_null_threshold is off, and before the first evaluation. Each "
        "evaluation reports best_f1_thresh, the value that was best on its split.")
    tune_null_threshold: bool = Field(
        True, description="With unanswerable questions: at each evaluation set the null threshold to the eval "
        "split's best_f1_thresh (the value that maximises its F1; so eval numbers are optimistic); the selected "
        "checkpoint's threshold is saved with the adapter and used by predict, evaluate and the test split. "
        "Off: null_threshold throughout (e.g. `finetune predict --set task.tune_null_threshold=false --set "
        "task.null_threshold=2`).")


# -- the official SQuAD v2.0 metric ----------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles (a, an, the) and extra whitespace (the official scripts)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_score(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:  # no-answer: 1 when both are empty
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_texts(answers: list[str]) -> list[str]:
    """The gold answers a prediction is scored against: those that normalise to something, else ``[""]``."""
    return [a for a in answers if normalize_answer(a)] or [""]


def _best_thresh(scores: dict[Any, float], na_probs: dict[Any, float], has_ans: dict[Any, bool],
                 preds: dict[Any, str]) -> tuple[float, float]:
    """The official script's ``find_best_thresh``: the best total score over thresholds on ``na_probs``."""
    cur = best = sum(not has for has in has_ans.values())
    thresh = min(na_probs.values(), default=0.0) - 1.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if has_ans[qid]:
            cur += scores[qid]
        else:
            cur += -1 if preds[qid] else 0
        if cur > best:
            best, thresh = cur, na_probs[qid]
    return best / len(scores), thresh


def squad_metrics(golds: dict[Any, list[str]], preds: dict[Any, str], no_answer: bool = False) -> dict[str, Any]:
    """Exact match and F1 (fractions) as the official SQuAD v2.0 script computes them. ``golds``: question
    id -> gold answer texts (empty: unanswerable); ``preds``: id -> predicted text ("" for no answer).
    With ``no_answer`` (or any unanswerable question), ``HasAns_*``/``NoAns_*`` too (see
    :func:`best_threshold_metrics` for ``best_*``)."""
    exact, f1 = {}, {}
    for qid, answers in golds.items():
        gold = gold_texts(answers)
        pred = preds.get(qid, "")
        exact[qid] = max(exact_score(a, pred) for a in gold)
        f1[qid] = max(f1_score(a, pred) for a in gold)
    n = len(golds)
    out: dict[str, Any] = {"exact": sum(exact.values()) / n if n else 0.0, "f1": sum(f1.values()) / n if n else 0.0,
                           "total": n}
    has_ans = {qid: bool(gold_texts(a)[0]) for qid, a in golds.items()}
    if no_answer or not all(has_ans.values()):
        for name, want in (("HasAns", True), ("NoAns", False)):
            ids = [qid for qid in golds if has_ans[qid] == want]
            if ids:
                out[f"{name}_exact"] = sum(exact[q] for q in ids) / len(ids)
                out[f"{name}_f1"] = sum(f1[q] for q in ids) / len(ids)
            out[f"{name}_total"] = len(ids)
    return out


def best_threshold_metrics(golds: dict[Any, list[str]], span_preds: dict[Any, str],
                           na_probs: dict[Any, float]) -> dict[str, float]:
    """``best_exact``/``best_f1`` and their thresholds: each question answered with its best span when its
    na_prob (null - span score) is at most the threshold, else with no answer (the official script)."""
    has_ans = {qid: bool(gold_texts(a)[0]) for qid, a in golds.items()}
    exact = {q: max(exact_score(a, span_preds.get(q, "")) for a in gold_texts(g)) for q, g in golds.items()}
    f1 = {q: max(f1_score(a, span_preds.get(q, "")) for a in gold_texts(g)) for q, g in golds.items()}
    best_exact, exact_thresh = _best_thresh(exact, na_probs, has_ans, span_preds)
    best_f1, f1_thresh = _best_thresh(f1, na_probs, has_ans, span_preds)
    return {"best_exact": best_exact, "best_exact_thresh": float(exact_thresh), "best_f1": best_f1,
            "best_f1_thresh": float(f1_thresh)}


# -- reading ---------------------------------------------------------------------------


def _answer_list(value: Any, where: str, column: str) -> list[dict[str, Any]]:
    """``{"text": [...], "answer_start": [...]}`` or ``[{"text", "answer_start"}, ...]`` -> the list form."""
    if value is None:
        return []
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if texts is None or starts is None:
            raise DataError(f"{where}: {column!r} has keys {sorted(value)}; it needs 'text' and 'answer_start' "
                            "(lists of the same length, empty for an unanswerable question).")
        texts = list(texts) if not isinstance(texts, str) else [texts]
        starts = list(starts) if not isinstance(starts, (int, float)) else [starts]
        if len(texts) != len(starts):
            raise DataError(f"{where}: {column!r} has {len(texts)} texts but {len(starts)} answer_start values; "
                            "give one start per answer text.")
        return [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = list(value)
        if not all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in items):
            raise DataError(f"{where}: {column!r} must be a list of {{\"text\", \"answer_start\"}} objects or "
                            f"{{\"text\": [...], \"answer_start\": [...]}}, not {value!r:.120}.")
        return [{"text": a["text"], "answer_start": a["answer_start"]} for a in items]
    raise DataError(f"{where}: {column!r} must be {{\"text\": [...], \"answer_start\": [...]}} or a list of "
                    f"{{\"text\", \"answer_start\"}} objects, not {value!r:.120}.")


def _check_answer(context: str, text: Any, start: Any, where: str) -> tuple[str, int]:
    """An answer whose ``answer_start`` points at its text, or a DataError saying what is wrong and how to fix it."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: an answer text is {text!r}; give the answer's words, or leave the answers empty "
                        "(an unanswerable question).")
    if isinstance(start, bool) or not isinstance(start, numbers.Real) or int(start) != start:
        raise DataError(f"{where}: answer_start {start!r} of answer {text!r} is not a whole number (the answer's "
                        "first character in the context, counted from 0).")
    start = int(start)
    found = context[start:start + len(text)] if start >= 0 else ""
    if found == text:
        return str(text), start
    at = [m.start() for m in re.finditer(re.escape(text), context)]
    if not at:
        fix = "the text does not occur in the context at all: fix the answer text (it must be copied exactly)."
    else:
        places = ", ".join(map(str, at[:5])) + (" ..." if len(at) > 5 else "")
        byte_at = [i for i in at if len(context[:i].encode("utf-8")) == start]
        fix = (f"the text occurs at character {places}; set answer_start to the one meant"
               + (f" (answer_start {start} is the UTF-8 byte offset of character {byte_at[0]}; count characters, "
                  "not bytes)" if byte_at else "") + ".")
    raise DataError(f"{where}: answer {text!r} does not start at answer_start {start}: the context there reads "
                    f"{found!r}. answer_start counts characters from 0; {fix}")


def _example(record: dict[str, Any], where: str, data: Any, *, labelled: bool = True) -> dict[str, Any]:
    """One checked question from a flat record (the reading of every source but nested SQuAD JSON)."""
    for column, key in ((data.context_column, "data.context_column"), (data.question_column, "data.question_column"),
                        *(((data.answers_column, "data.answers_column"),) if labelled else ())):
        if column not in record:
            raise DataError(f"{where}: no {column!r} field ({key}); the record has {sorted(record)}. Rename the "
                            f"field or set {key}.")
    context, question = record[data.context_column], record[data.question_column]
    if not isinstance(context, str) or not context.strip():
        raise DataError(f"{where}: the context ({data.context_column!r}) is empty; every question needs the "
                        "passage its answer comes from. Fill it in or remove the question.")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: the question ({data.question_column!r}) is empty; fill it in or remove the "
                        "question.")
    answers = _answer_list(record.get(data.answers_column), where, data.answers_column) if labelled else []
    checked = [_check_answer(context, a["text"], a["answer_start"], where) for a in answers]
    impossible = record.get("is_impossible")
    if impossible and checked:
        raise DataError(f"{where}: is_impossible is true but the question has answers; empty its answers (SQuAD "
                        "v2.0 keeps those under 'plausible_answers') or set is_impossible to false.")
    qid = record.get(data.id_column)
    return {"id": str(qid) if qid is not None else where, "context": context, "question": question,
            "answers": [{"text": t, "answer_start": s} for t, s in checked],
            "title": str(record.get("title", "")), "where": where,
            **({} if data.group_column is None or data.group_column not in record
               else {"group": str(record[data.group_column])})}


def _read_squad_json(path: Path, key: str, data: Any, labelled: bool = True) -> list[dict[str, Any]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except ValueError as e:
        raise DataError(f"{key}: {path} is not valid JSON ({e}).") from None
    if isinstance(content, list):  # a list of flat records
        return [_example(r if isinstance(r, dict) else {}, f"{key}: {path}, record {i + 1}", data, labelled=labelled)
                for i, r in enumerate(content)]
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise DataError(f"{key}: {path} is JSON but not SQuAD's layout: expected {{\"data\": [{{\"title\", "
                        "\"paragraphs\": [{\"context\", \"qas\": [...]}]}]} or a list of flat records.")
    flat = data.model_copy(update={"context_column": "context", "question_column": "question",
                                   "answers_column": "answers", "id_column": "id"})
    examples = []
    for a, article in enumerate(content["data"]):
        title = str(article.get("title", a)) if isinstance(article, dict) else str(a)
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{key}: {path}, data[{a}] ({title!r}) has no 'paragraphs' list.")
        for p, paragraph in enumerate(paragraphs):
            place = f"{path}, data[{a}] ({title!r}) paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{key}: {place} has no 'qas' list.")
            if "context" not in paragraph:
                raise DataError(f"{key}: {place} has no 'context'; each paragraph holds its passage and questions.")
            for q, qa in enumerate(paragraph["qas"]):
                if not isinstance(qa, dict):
                    raise DataError(f"{key}: {place} qas[{q}] is not an object.")
                where = f"{place} qas[{q}]" + (f" (id {qa['id']!r})" if "id" in qa else "")
                record = {"context": paragraph["context"], "title": title, **qa}
                if "question" not in qa:
                    raise DataError(f"{key}: {where}: no 'question' field; the question has {sorted(qa)}.")
                if labelled and "answers" not in qa:
                    qa_answers = [] if qa.get("is_impossible") else None
                    if qa_answers is None:
                        raise DataError(f"{key}: {where}: no 'answers' field; give the answers (or "
                                        "\"answers\": [] with \"is_impossible\": true).")
                    record["answers"] = []
                examples.append(_example(record, f"{key}: {where}", flat, labelled=labelled))
    return examples


def read_questions(path: Path, key: str, data: Any, labelled: bool = True) -> list[dict[str, Any]]:
    """The checked questions of a file (SQuAD JSON, a JSON list, JSON lines or parquet)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{key}: file not found: {path}. Check the path (relative paths resolve against the "
                        "recipe's folder).")
    if not path.is_file():
        raise DataError(f"{key}: {path} is a folder; give a SQuAD .json or a .jsonl file.")
    fmt, suffix = data.format, path.suffix.lower()
    if fmt == "jsonl" or (fmt == "auto" and suffix in JSONL_SUFFIXES):
        examples = [_example(r, f"{key}: {path}, line {n}", data, labelled=labelled)
                    for n, r in read_jsonl(path, key)]
    elif fmt == "json" or (fmt == "auto" and suffix == ".json"):
        examples = _read_squad_json(path, key, data, labelled)
    elif fmt == "parquet" or (fmt == "auto" and suffix == ".parquet"):
        df = load_table(path, "parquet", key)
        examples = [_example(r, f"{key}: {path}, row {i + 1}", data, labelled=labelled)
                    for i, r in enumerate(df.to_dict(orient="records"))]
    else:
        raise DataError(f"{key}: {path}: question-answering reads SQuAD JSON (.json), JSON lines (.jsonl) or "
                        f"parquet, not {fmt if fmt != 'auto' else repr(suffix or path.name)} (the answers are "
                        "nested lists, which a CSV cell does not hold).")
    if not examples:
        raise DataError(f"{key}: {path} holds no questions.")
    return examples


def _frame(examples: list[dict[str, Any]], group_column: str | None, key: str) -> Any:
    import pandas as pd

    df = pd.DataFrame(examples)
    if group_column is not None:
        if "group" not in df.columns or df["group"].isna().any():
            raise DataError(f"data.group_column: {key}: some questions have no {group_column!r} field; give it on "
                            "every question (SQuAD JSON: 'title' is the article's title) or unset data.group_column.")
    else:
        df["group"] = df["context"]  # questions on one passage stay on one side of the split
    return df


# -- spans -------------------------------------------------------------------------------


def answer_span(context: str, answer: dict[str, Any]) -> tuple[int, int]:
    """The answer's characters ``[start, end)`` without leading/trailing whitespace."""
    text, start = answer["text"], answer["answer_start"]
    lead = len(text) - len(text.lstrip())
    return start + lead, start + len(text.rstrip())


def snap_to_words(context: str, start: int, end: int) -> tuple[int, int]:
    """The span ``[start, end)`` of ``context`` widened to whole words: a span that starts or ends inside a
    word (a run of letters and digits, e.g. "Roll" of "Rollo" when the span stopped at a sub-word token) is
    extended to that word's first or last character; a span at word boundaries is unchanged."""
    while 0 < start < len(context) and context[start - 1].isalnum() and context[start].isalnum():
        start -= 1
    while 0 < end < len(context) and context[end - 1].isalnum() and context[end].isalnum():
        end += 1
    return start, end


def char_to_tokens(offsets: list[tuple[int, int] | None], start: int, end: int) -> tuple[int, int] | None:
    """The first and last token of the context tokens (``offsets``: ``None`` for non-context tokens) covering
    characters ``[start, end)``, or None when the span is not wholly inside them."""
    context = [(i, o) for i, o in enumerate(offsets) if o is not None and o[1] > o[0]]
    if not context or context[0][1][0] > start or context[-1][1][1] < end:
        return None
    first = next(i for i, o in context if o[1] > start)
    last = max(i for i, o in context if o[0] < end)
    return (first, last) if first <= last else None


# -- the task --------------------------------------------------------------------------------


class QuestionAnswering(Task):
    name = "question-answering"
    description = "Extractive question answering (SQuAD v1/v2): the answer span in a context; exact match and F1."
    task_options = QuestionAnsweringOptions
    data_options = QuestionAnsweringData
    default_metric = "f1"
    metric_names = ("f1", "exact", "total")
    pipeline_tag = "question-answering"
    library_name = "peft"
    prediction_fields = {"pred_answer": "the answer: a substring of the context (\"\" for no answer)",
                         "pred_start": "its first character in the context (null for no answer)",
                         "pred_end": "the character after its last (context[pred_start:pred_end] is pred_answer; "
                                     "null for no answer)",
                         "pred_score": "the probability of the answer (of no answer when there is none) in the "
                                       "window it was found in"}

    # -- data ----------------------------------------------------------
    def _read(self, path: Path | str, key: str) -> Any:
        return _frame(read_questions(Path(path), key, self.recipe.data), self.recipe.data.group_column, key)

    def _from_dataset(self) -> tuple[Any, Any, Any, dict[str, Any]]:
        data = self.recipe.data
        source = open_dataset(data, self.recipe.source.parent if getattr(self.recipe, "source", None) else None)
        train, eval_ = source.train_and_eval(data)
        tables = []
        for split, key in ((train, "data.dataset_split"), (eval_, "data.dataset_eval_split"),
                           (source.test_split(data), "data.dataset_test_split")):
            if split is None:
                tables.append(None)
                continue
            split.require_columns({"data.context_column": data.context_column,
                                   "data.question_column": data.question_column,
                                   "data.answers_column": data.answers_column})
            rows = split.frame().to_dict(orient="records")
            tables.append(_frame([_example(r, f"{key}: {split.where}, row {i + 1}", data) for i, r in enumerate(rows)],
                                 data.group_column, key))
        return *tables, source.info

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled questions (data.test, ``finetune evaluate --input``) in any form ``data.train`` takes."""
        return self._read(path, key)

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        if data.doc_stride * 2 >= data.max_length - 4:
            raise RecipeError(f"data.doc_stride ({data.doc_stride}) must be less than half of data.max_length "
                              f"({data.max_length}) minus 4, so every window moves on; e.g. doc_stride = "
                              f"{max(0, data.max_length // 4)}.")
        seed = self.recipe.train.seed
        train, eval_, test, provenance = self._from_dataset() if data.dataset else \
            (self._read(data.train, "data.train"), None, None, {})
        if data.test_split:  # held out first, so the test questions never depend on the eval settings
            train, test = split_frame(train, data.test_split, seed, group="group", key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=seed).reset_index(drop=True)
        if eval_ is None and data.eval:
            eval_ = self._read(data.eval, "data.eval")
        if eval_ is None:
            if train["group"].nunique() < 2:
                raise DataError(f"data.split: every training question is on one "
                                f"{'context' if data.group_column is None else data.group_column}, so none can "
                                "be held out for evaluation without leaking; give data.eval.")
            train, eval_ = split_frame(train, data.split, seed, group="group")
        allow = self.recipe.task.allow_no_answer
        unanswerable = int(sum(not a for a in train["answers"]))
        if allow is None:
            allow = bool(unanswerable or any(not a for a in eval_["answers"]))
        if not allow and unanswerable:
            raise DataError(f"task.allow_no_answer is false but {unanswerable} training question(s) have no answer "
                            f"(first: {next(w for w, a in zip(train['where'], train['answers']) if not a)}); "
                            "unset it or remove them.")
        self.state = {"allow_no_answer": allow}
        if data.test:
            test = self.read_examples(Path(data.test), "data.test")
        info = {"train_questions": len(train), "eval_questions": len(eval_),
                **({"test_questions": len(test)} if test is not None else {}),
                "train_contexts": int(train["context"].nunique()), "train_unanswerable": unanswerable,
                "eval_unanswerable": int(sum(not a for a in eval_["answers"])), "allow_no_answer": allow,
                **provenance}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    # -- windows -------------------------------------------------------
    def _features(self, contexts: list[str], questions: list[str], tokenizer: Any,
                  answers: list[list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
        """Model inputs: question + one window of the context each, with ``example`` (the index in the lists),
        ``offsets`` (character span of each context token, [-1, -1] elsewhere) and, with ``answers``, the
        first answer's token positions (the [CLS] position when it is not wholly in the window)."""
        data = self.recipe.data
        max_length, stride = data.max_length, data.doc_stride
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        budget = max(1, min((max_length - specials) // 2, max_length - specials - stride - 1))
        cut = []  # questions longer than the budget keep their first tokens
        for question in questions:
            question = question.lstrip()
            enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) > budget:
                question = question[:enc["offset_mapping"][budget - 1][1]]
            cut.append(question)
        enc = tokenizer(cut, list(contexts), truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        items = []
        for i, n in enumerate(enc["overflow_to_sample_mapping"]):
            sequence = enc.sequence_ids(i)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], sequence)]
            ids = list(enc["input_ids"][i])
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            item = {"input_ids": ids, "attention_mask": list(enc["attention_mask"][i])}
            if "token_type_ids" in enc:
                item["token_type_ids"] = list(enc["token_type_ids"][i])
            start = end = cls
            if answers is not None and answers[n]:
                span = char_to_tokens(offsets, *answer_span(contexts[n], answers[n][0]))
                if span is not None:
                    start, end = span
            item.update({"start_positions": start, "end_positions": end, "cls_index": cls, "example": n,
                         "offsets": [list(o) if o is not None else [-1, -1] for o in offsets]})
            items.append(item)
        return items

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        """The windows of ``examples``, tokenized once per (contexts, questions, answers, tokenizer, max length,
        doc stride) fingerprint and kept in the token cache (finetune.cached_encode): the next run on the same
        data and a resumed run read them back instead of tokenizing (finetune_nlp.windows)."""
        import pandas as pd

        from finetune import frame_fingerprint, tokenizer_fingerprint
        from finetune_nlp.windows import cached_windows

        contexts, questions = list(examples["context"]), list(examples["question"])
        answers = [list(a) for a in examples["answers"]]
        data = self.recipe.data
        table = pd.DataFrame({"context": [str(c) for c in contexts], "question": [str(q) for q in questions],
                              "answers": [json.dumps(a, sort_keys=True, default=str) for a in answers]})
        key = {"kind": "finetune_nlp.question-answering-windows", "version": 1,
               "examples": frame_fingerprint(table, ["context", "question", "answers"]),
               "tokenizer": tokenizer_fingerprint(processor), "padding_side": processor.padding_side,
               "max_length": data.max_length, "doc_stride": data.doc_stride}
        registry = self.__dict__.setdefault("_questions", {})
        first = len(registry)
        windows = cached_windows(
            key, len(contexts), lambda a, b: self._features(contexts[a:b], questions[a:b], processor, answers[a:b]),
            token_fields={"input_ids": 1, "attention_mask": 1, "token_type_ids": 1, "offsets": 2},
            window_fields=("start_positions", "end_positions", "cls_index"), example_field="example",
            drop=("example", "offsets", "cls_index") if training else (),  # the loss needs no placement
            example_offset=first)
        if training:
            return windows
        # evaluation: each question gets an id unique in this process (eval, test and evaluate datasets alike),
        # and evaluation_step finds its context and gold answers by it
        for n, (context, gold) in enumerate(zip(contexts, answers)):
            registry[first + n] = {"context": context, "answers": [a["text"] for a in gold]}
        return windows

    def example_lengths(self, dataset: Any) -> list[int]:
        if hasattr(dataset, "lengths"):
            return dataset.lengths()
        return [len(item["input_ids"]) for item in dataset]

    def collate_fn(self, processor: Any):
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else 0

        def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
            batch = pad_fields(items, {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0},
                               same=("start_positions", "end_positions"))
            if "example" in items[0]:
                batch.update(pad_fields(items, {"offsets": [-1, -1]}, same=("example", "cls_index")))
            return batch

        return collate

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
        if not getattr(tokenizer, "is_fast", False):
            raise RecipeError(f"model.backbone: {backbone.name} has no fast tokenizer, which question-answering "
                              "needs to map answers between characters and tokens.")
        if tokenizer.padding_side != "right":
            tokenizer.padding_side = "right"
        model = AutoModelForQuestionAnswering.from_pretrained(backbone.path, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def modules_to_save(self, model: Any) -> list[str]:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        return [n for n in ("qa_outputs",) if n in names]

    def peft_task_type(self) -> str:
        return "QUESTION_ANS"

    # -- evaluation ----------------------------------------------------
    _PLACEMENT = ("example", "offsets", "cls_index")

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(**{k: v for k, v in batch.items() if k not in self._PLACEMENT}).loss

    def _candidates(self, start_logits: Any, end_logits: Any, offsets: Any, cls: int,
                    context: str) -> tuple[list[tuple[float, int, int, float]], float, float]:
        """One window's best spans ``(score, first char, end char, probability)`` (at most task.n_best, each at
        most task.max_answer_length tokens), its null score and the null's probability."""
        import torch

        task = self.recipe.task
        start_logits, end_logits = start_logits.float(), end_logits.float()
        inside = offsets[:, 0] >= 0
        valid = inside.clone()
        valid[cls] = True
        p_start = torch.softmax(start_logits.masked_fill(~valid, float("-inf")), -1)
        p_end = torch.softmax(end_logits.masked_fill(~valid, float("-inf")), -1)
        null = float(start_logits[cls] + end_logits[cls])
        null_prob = float(p_start[cls] * p_end[cls])
        k = min(task.n_best, int(inside.sum()))
        if k == 0:
            return [], null, null_prob
        starts = torch.topk(start_logits.masked_fill(~inside, float("-inf")), k).indices.tolist()
        ends = torch.topk(end_logits.masked_fill(~inside, float("-inf")), k).indices.tolist()
        spans = []
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > task.max_answer_length:
                    continue
                a, b = snap_to_words(context, int(offsets[s][0]), int(offsets[e][1]))
                spans.append((float(start_logits[s] + end_logits[e]), a, b, float(p_start[s] * p_end[e])))
        spans.sort(key=lambda c: -c[0])
        return spans[:task.n_best], null, null_prob

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        out = model(**{k: v for k, v in batch.items() if k not in self._PLACEMENT})
        starts, ends = out.start_logits.detach().cpu(), out.end_logits.detach().cpu()
        offsets, cls = batch["offsets"].cpu(), batch["cls_index"].tolist()
        predictions, references = [], []
        for row, uid in enumerate(batch["example"].tolist()):
            question = self._questions[uid]
            spans, null, _ = self._candidates(starts[row], ends[row], offsets[row], cls[row], question["context"])
            best = [(score, question["context"][a:b]) for score, a, b, _ in spans[:1]]
            predictions.append((uid, null, best))
            references.append((uid, question["answers"]))
        return {"loss": out.loss, "predictions": predictions, "references": references}

    def _decide(self, best: tuple[float, Any] | None, null: float, threshold: float) -> bool:
        """Whether the answer is "no answer": when no span is valid or, only when allowed, when the null score
        beats the best span's by more than ``threshold``."""
        if best is None:
            return True
        return bool(self.state.get("allow_no_answer")) and null - best[0] > threshold

    def _selected_threshold(self) -> float:
        """The null threshold in use: task.null_threshold, or with task.tune_null_threshold the one in the
        state: the selected adapter's after training (the core restores its saved state for the test split)
        and in a loaded run."""
        task = self.recipe.task
        if not task.tune_null_threshold:
            return float(task.null_threshold)
        return float(self.state.get("null_threshold", task.null_threshold))

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        best: dict[int, tuple[float, str]] = {}
        null: dict[int, float] = {}
        for uid, null_score, spans in predictions:
            null[uid] = min(null.get(uid, float("inf")), null_score)  # the window most sure there is an answer
            for score, text in spans:
                if uid not in best or score > best[uid][0]:
                    best[uid] = (score, text)
        golds = {uid: list(answers) for uid, answers in references}
        allow = bool(self.state.get("allow_no_answer"))
        threshold = self._selected_threshold()
        chosen: dict[str, float] = {}
        if allow:
            span_preds = {uid: best[uid][1] if uid in best else "" for uid in golds}
            na = {uid: null[uid] - best[uid][0] if uid in best else 1e9 for uid in golds}
            chosen = best_threshold_metrics(golds, span_preds, na)
            if self.recipe.task.tune_null_threshold and golds and self.evaluating == "eval":
                # the eval split: tune, and keep the threshold in the state the core saves with the adapter
                # when this evaluation is the best so far (so the saved threshold goes with the saved weights)
                threshold = chosen["best_f1_thresh"]
                self.state["null_threshold"] = threshold
        preds = {uid: "" if self._decide(best.get(uid), null[uid], threshold) else best[uid][1] for uid in golds}
        metrics = squad_metrics(golds, preds, no_answer=allow)
        if allow:
            metrics.update(chosen)
            metrics["null_threshold"] = float(threshold)
        return metrics

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        golds, preds = {}, {}
        for n, (context, question, answers) in enumerate(zip(splits.eval["context"], splits.eval["question"],
                                                              splits.eval["answers"])):
            golds[n] = [a["text"] for a in answers]
            preds[n] = overlap_sentence(context, question)
        metrics = squad_metrics(golds, preds, no_answer=bool(self.state.get("allow_no_answer")))
        return {"name": "context sentence with the most question words (always answers)",
                **{k: float(v) for k, v in metrics.items() if not k.endswith("total")}}

    # -- inference -----------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.question_column, self.recipe.data.context_column]

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        """SQuAD JSON (each question with its context, id and title) or, as by default, a table file."""
        path = Path(path)
        if path.suffix.lower() != ".json" or not path.is_file():
            return super().read_predict_input(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"--input: {path} is not valid UTF-8 JSON ({e}).") from None
        if isinstance(content, dict) and isinstance(content.get("data"), list):
            data = self.recipe.data
            records = []
            for e in _read_squad_json(path, "--input", data, labelled=False):
                records.append({"id": e["id"], "title": e["title"], data.question_column: e["question"],
                                data.context_column: e["context"]})
            if not records:
                raise DataError(f"--input: {path} holds no questions.")
            return records
        if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
            raise DataError(f"--input: {path} is neither SQuAD JSON nor a list of records.")
        missing = [c for c in self.predict_input_columns() if any(c not in r for r in content)]
        if missing:
            found = sorted({k for r in content for k in r})
            raise missing_input_column(path, missing[0], found, self.recipe.data)
        return content

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        data = self.recipe.data
        contexts, questions = [], []
        for i, record in enumerate(records):
            context, question = record.get(data.context_column), record.get(data.question_column)
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"prediction input, record {i + 1}: the question ({data.question_column!r}, "
                                f"data.question_column) is missing or empty; give it as text.")
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"prediction input, record {i + 1}: the context ({data.context_column!r}, "
                                "data.context_column) is missing or empty; question-answering needs the passage "
                                "to find the answer in (use --input with a JSON lines file of "
                                f"{{{data.question_column!r}: ..., {data.context_column!r}: ...}}).")
            contexts.append(context)
            questions.append(question)
        features = self._features(contexts, questions, processor)
        collate = self.collate_fn(processor)
        device = next(model.parameters()).device
        best: dict[int, tuple[float, int, int, float]] = {}
        null: dict[int, tuple[float, float]] = {}
        for first in range(0, len(features), batch_size):
            chunk = features[first:first + batch_size]
            batch = collate(chunk)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        **({"token_type_ids": batch["token_type_ids"].to(device)} if "token_type_ids" in batch else {}))
            starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
            for row, item in enumerate(chunk):
                n = item["example"]
                spans, null_score, null_prob = self._candidates(starts[row], ends[row], batch["offsets"][row],
                                                                item["cls_index"], contexts[n])
                if n not in null or null_score < null[n][0]:
                    null[n] = (null_score, null_prob)
                if spans and (n not in best or spans[0][0] > best[n][0]):
                    best[n] = spans[0]
        rows = []
        threshold = self._selected_threshold()
        for n, record in enumerate(records):
            span = best.get(n)
            if self._decide(span, null[n][0], threshold):
                fields = {"pred_answer": "", "pred_start": None, "pred_end": None, "pred_score": null[n][1]}
            else:
                _, a, b, prob = span
                fields = {"pred_answer": contexts[n][a:b], "pred_start": a, "pred_end": b, "pred_score": prob}
            rows.append({**record, **fields})
        return rows

    def usage_snippet(self, base: str) -> str:
        return (
            "import torch\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForQuestionAnswering, AutoTokenizer\n\n"
            f"base = AutoModelForQuestionAnswering.from_pretrained({base!r})\n"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "question, context = 'Where did Ada Lovelace live?', 'Ada Lovelace lived in London.'\n"
            "enc = tokenizer(question, context, return_offsets_mapping=True, return_tensors='pt')\n"
            "offsets = enc.pop('offset_mapping')[0]\n"
            "context_tokens = torch.tensor([s == 1 for s in enc.sequence_ids(0)])\n"
            "with torch.no_grad():\n"
            "    out = model(**enc)\n"
            "start = out.start_logits[0].masked_fill(~context_tokens, -1e9).argmax()\n"
            "end = start + out.end_logits[0][start:].masked_fill(~context_tokens[start:], -1e9)[:30].argmax()\n"
            "print(repr(context[offsets[start][0]:offsets[end][1]]))  # the best span (a full run also weighs "
            "'no answer')")


_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)")


def overlap_sentence(context: str, question: str) -> str:
    """The baseline's answer: the sentence of ``context`` sharing the most (normalised) words with
    ``question``, the first on ties."""
    words = set(_tokens(question))
    best, best_overlap = "", -1
    for match in _SENTENCE.finditer(context):
        sentence = match.group().strip()
        if not sentence:
            continue
        overlap = len(words & set(_tokens(sentence)))
        if overlap > best_overlap:
            best, best_overlap = sentence, overlap
    return best
