"""``finetune init`` for the NLP tasks: which tables, CoNLL files and SQuAD files they take (the
``finetune_claim_data`` hook). Looks only at the probe; imports nothing heavy."""

from __future__ import annotations

import re
from typing import Any

from finetune import Claim, ColumnStats, DataProbe

BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
_BACKBONE_NOTE = "offline MiniLM-L6 (the quickstarts' encoder); any Hub encoder works online"
_ID_NAME = re.compile(r"(^|[_\s-])(id|ids|uuid|key|index|idx)$|^(id|idx)([_\s-]|$)", re.IGNORECASE)
_GROUPISH = re.compile(r"(^|_)(group|user|patient|doc|document|speaker|subject|session|author|source|image|"
                       r"article|title|family|site|person|customer)s?(_|$)", re.IGNORECASE)
_LABEL_NAMES = ("label", "labels", "class", "classes", "category", "categories", "tag", "tags", "sentiment",
                "target", "y", "intent", "topic", "emotion", "emotions", "stance")
_TEXT_NAMES = ("text", "sentence", "sentence1", "premise", "question", "review", "comment", "body", "content",
               "document", "message", "utterance", "query", "title")
#: Field names of generation data (chat, prompt/completion, Alpaca, preference pairs, KTO).
_GENERATION_NAMES = {"prompt", "completion", "chosen", "rejected", "response", "instruction", "output", "messages"}
_TAG = re.compile(r"^(O|[BIESLU]-\S+)$")
#: The file suffixes token-classification reads as CoNLL columns (as token_classification.CONLL_SUFFIXES).
CONLL_SUFFIXES = (".conll", ".txt", ".iob", ".iob2", ".bio", ".conllu")


def _max_length(words: float) -> int:
    for limit, tokens in ((8, 32), (25, 64), (60, 128)):
        if words <= limit:
            return tokens
    return 256


def _common(train: Any, words: float) -> dict[str, dict[str, Any]]:
    return {"model": {"backbone": BACKBONE},
            "data": {"train": train},
            "peft": {"r": 8, "alpha": 16, "dropout": 0.1},
            "train": {"epochs": 3, "batch_size": 32, "learning_rate": 1e-3, "seed": 0},
            "_max_length": {"value": _max_length(words)}}


def _finish(claim: Claim, probe: DataProbe, used: list[str]) -> Claim:
    """Move the max_length helper into [data]; add a split (grouped when an id column repeats)."""
    max_length = claim.settings.pop("_max_length")["value"]
    data = claim.settings["data"]
    data["split"] = 0.2
    claim.comments["data.split"] = "held out to select the best checkpoint"
    group = probe.group_column(exclude=used)
    if group:
        data["group_column"] = group[0]
        claim.comments["data.group_column"] = "rows sharing it stay on one side of the split"
        claim.reasons.append(group[1])
    data["max_length"] = max_length
    claim.comments["data.max_length"] = "tokens per example (longer ones are cut)"
    claim.comments["model.backbone"] = _BACKBONE_NOTE
    return claim


def _is_text(col: ColumnStats) -> bool:
    if col.kind != "text" or _ID_NAME.search(col.name):
        return False
    return not (_GROUPISH.search(col.name) and col.repeated_share > 0 and col.mean_words <= 2)


def _is_label(col: ColumnStats) -> bool:
    labels = col.kind == "category" or (col.kind == "list" and col.list_items <= 100)
    return labels and not _ID_NAME.search(col.name) \
        and not (_GROUPISH.search(col.name) and col.name.lower() not in _LABEL_NAMES)


def _rank_texts(cols: list[ColumnStats]) -> list[ColumnStats]:
    return sorted(cols, key=lambda c: (c.name.lower() not in _TEXT_NAMES, -c.mean_words))


def _pick(cols: list[ColumnStats]) -> tuple[ColumnStats | None, bool]:
    """The column to use and whether the choice is clear (one column, or one with a label-like name)."""
    if len(cols) == 1:
        return cols[0], True
    named = [c for c in cols if c.name.lower() in _LABEL_NAMES]
    if len(named) == 1:
        return named[0], True
    return (cols[0] if cols else None), False


def _table_claims(probe: DataProbe) -> list[Claim]:
    table = probe.table
    if table is None:
        return []
    cols = list(table.columns.values())
    texts = _rank_texts([c for c in cols if _is_text(c)])
    if not texts:
        return []
    text, pair = texts[0], (texts[1] if len(texts) > 1 else None)
    labels = [c for c in cols if _is_label(c) and c not in texts]
    numbers = [c for c in cols if c.kind == "number" and not _ID_NAME.search(c.name)]
    words = text.mean_words + (pair.mean_words if pair else 0)
    base = [f"column `{text.name}` looks like text: {text.describe()}"]
    if pair:
        base.append(f"column `{pair.name}` looks like a second text ({pair.describe()}): the two are encoded as a "
                    "pair, as the pair quickstart does")
    out: list[Claim] = []
    multi = [c for c in labels if c.kind == "list" or c.multi_label_separator]
    single = [c for c in labels if c not in multi]
    label, clear = _pick(single) if single else (None, True)
    tag_col = multi[0] if multi else None
    number, number_clear = _pick(numbers) if numbers else (None, True)
    both = bool((label or tag_col) and number)
    for col, task, what in ((tag_col, "multi-label-classification", "labels"), (label, "text-classification", "label"),
                            (number, "text-regression", "target")):
        if col is None:
            continue
        sure = clear if col is label else number_clear if col is number else True
        settings = _common(probe.path, words)
        data = settings["data"]
        data["text_column"] = text.name
        if pair:
            data["text_pair_column"] = pair.name
        key = "target_column" if task == "text-regression" else "label_column"
        data[key] = col.name
        comments = {"data.text_column": text.describe(), f"data.{key}": col.describe()}
        if pair:
            comments["data.text_pair_column"] = "the second text of each pair"
        reasons = list(base)
        if task == "multi-label-classification":
            sep = col.multi_label_separator
            reasons.append(f"column `{col.name}` holds several labels per row: {col.describe()}")
            if sep and sep != ",":
                data["label_delimiter"] = sep
                comments["data.label_delimiter"] = "joins the labels of a row"
            settings["train"].update(epochs=5, learning_rate=2e-3)
            score = 0.85
        elif task == "text-classification":
            reasons.append(f"column `{col.name}` looks like the label: {col.describe()}")
            score = 0.8
        else:
            reasons.append(f"column `{col.name}` holds the number to predict: {col.describe()}")
            score = 0.8
        notes = []
        if not sure:
            others = [c.name for c in (single if col is label else numbers) if c is not col]
            reasons.append(f"which column is the {what} is unclear (also possible: {', '.join(others)})")
            score = 0.45
        generation = sorted(_GENERATION_NAMES & {c.name.lower() for c in (text, pair, col) if c is not None})
        if generation:
            score -= 0.15
            reasons.append(f"but columns named {', '.join(generation)} are what generation data uses")
        if both:
            score = min(score, 0.7)
            reasons.append("the table has both a categorical and a numeric column that could be the target")
        used = [text.name, col.name] + ([pair.name] if pair else [])
        out.append(_finish(Claim(task=task, score=score, reasons=reasons, settings=settings, comments=comments,
                                 notes=notes), probe, used))
    if label is not None and label.numeric and number is None:
        # whole numbers with few values (1..5 stars): a class each, or a number to regress on
        settings = _common(probe.path, words)
        settings["data"].update(text_column=text.name, target_column=label.name)
        if pair:
            settings["data"]["text_pair_column"] = pair.name
        out.append(_finish(Claim(task="text-regression", score=0.55, settings=settings,
                                 reasons=base + [f"column `{label.name}` holds whole numbers ({label.describe()}): "
                                                 "ordered values may be predicted as a number"],
                                 comments={"data.text_column": text.describe(),
                                           "data.target_column": label.describe()}),
                           probe, [text.name, label.name]))
    return out


def _conll_claim(probe: DataProbe) -> Claim | None:
    if probe.suffix not in CONLL_SUFFIXES:  # what token-classification reads as CoNLL columns
        return None
    lines = probe.head_lines
    rows = [line.split() for line in lines if line.strip() and not line.startswith("-DOCSTART-")]
    if len(rows) < 3 or not any(not line.strip() for line in lines[:200]) and len(lines) >= 200:
        return None
    tagged = [r for r in rows if len(r) >= 2 and _TAG.match(r[-1])]
    if len(tagged) < 0.8 * len(rows):
        return None
    tags = sorted({r[-1] for r in tagged})
    types = sorted({t.split("-", 1)[1] for t in tags if "-" in t})
    sentences = sum(1 for line in lines if not line.strip()) + 1
    settings = _common(probe.path, 30)
    settings["train"].update(epochs=5, batch_size=16, learning_rate=2e-3)
    settings["_max_length"]["value"] = 128
    claim = Claim(task="token-classification", score=0.9, settings=settings,
                  reasons=[f"a CoNLL-style column file: one word per line, its tag last ({len(tags)} tags, entity "
                           f"types {', '.join(types[:8]) or 'none'}), {sentences}+ sentences in the first "
                           f"{len(lines)} lines"],
                  comments={"data.train": "CoNLL columns, a blank line between sentences"})
    return _finish(claim, probe, [])


def _token_jsonl_claim(probe: DataProbe) -> Claim | None:
    table = probe.table
    if table is None:
        return None
    lists = [c for c in table.columns.values() if c.kind == "list"]
    for tokens in lists:
        for tags in lists:
            if tokens is tags:
                continue
            same = all(isinstance(r.get(tokens.name), list) and isinstance(r.get(tags.name), list)
                       and len(r[tokens.name]) == len(r[tags.name]) for r in table.records)
            if not same or tags.list_items > 200 or tokens.list_items <= tags.list_items:
                continue
            settings = _common(probe.path, 30)
            settings["data"].update(tokens_column=tokens.name, tags_column=tags.name)
            settings["train"].update(epochs=5, batch_size=16, learning_rate=2e-3)
            settings["_max_length"]["value"] = 128
            claim = Claim(task="token-classification", score=0.9, settings=settings,
                          reasons=[f"columns `{tokens.name}` and `{tags.name}` are lists of the same length in every "
                                   f"row: words ({tokens.list_items} distinct) and their tags ({tags.list_items} "
                                   "distinct)"],
                          comments={"data.tokens_column": "the words of a sentence",
                                    "data.tags_column": "one tag per word"})
            return _finish(claim, probe, [tokens.name, tags.name])
    return None


def _qa_claim(probe: DataProbe) -> Claim | None:
    doc = probe.json
    settings = _common(probe.path, 150)
    settings["peft"] = {"r": 16, "alpha": 32, "dropout": 0.1}
    settings["train"].update(epochs=2, batch_size=16, learning_rate=2e-3)
    settings["_max_length"]["value"] = 192
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and doc["data"] \
            and isinstance(doc["data"][0], dict) and "paragraphs" in doc["data"][0]:
        articles = doc["data"]
        questions = sum(len(p.get("qas", [])) for a in articles for p in a.get("paragraphs", []))
        unanswerable = sum(bool(q.get("is_impossible")) for a in articles for p in a.get("paragraphs", [])
                           for q in p.get("qas", []))
        claim = Claim(task="question-answering", score=0.95, settings=settings,
                      reasons=[f"a SQuAD JSON file: {len(articles)} articles, {questions:,} questions"
                               + (f" ({unanswerable} unanswerable)" if unanswerable else "")],
                      comments={"data.train": "SQuAD JSON: data -> paragraphs -> qas"})
        claim = _finish(claim, probe, [])
        if all("title" in a for a in articles) and len(articles) > 1:
            claim.settings["data"]["group_column"] = "title"
            claim.comments["data.group_column"] = "whole articles on one side of the split (no leakage)"
            claim.reasons.append("questions on one article share its context: the split keeps articles whole")
        claim.settings["data"]["doc_stride"] = 48
        claim.comments["data.doc_stride"] = "overlap of the windows a long context is read in"
        return claim
    table = probe.table
    if table is not None and {"context", "question", "answers"} <= set(table.columns):
        claim = Claim(task="question-answering", score=0.9, settings=settings,
                      reasons=["records with `context`, `question` and `answers`: flat SQuAD-style questions"])
        claim = _finish(claim, probe, ["context", "question", "answers"])
        if table.columns["context"].repeated_share > 0 and "group_column" not in claim.settings["data"]:
            claim.settings["data"]["group_column"] = "context"
            claim.comments["data.group_column"] = "questions on one context stay together"
        return claim
    return None


def claim_data(probe: DataProbe) -> list[Claim]:
    """The NLP plugin's claims on ``probe`` (see :func:`finetune.hookspecs.finetune_claim_data`)."""
    if not probe.is_file:
        return []
    for special in (_qa_claim, _conll_claim, _token_jsonl_claim):
        claim = special(probe)
        if claim is not None:
            return [claim]
    return _table_claims(probe)
