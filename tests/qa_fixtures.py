"""Question-answering test data: contexts of words from the tiny BERT's vocabulary, answers found by position."""

from __future__ import annotations

import random

from conftest import NEUTRAL, POSITIVE


def qa_rows(n: int, seed: int = 0, unanswerable: float = 0.0, words: tuple[int, int] = (4, 12)) -> list[dict]:
    """Contexts of neutral words with one positive word (the answer to "which is good") or, for a fraction
    ``unanswerable``, none (no answer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        context = [rng.choice(NEUTRAL) for _ in range(rng.randint(*words))]
        answers = {"text": [], "answer_start": []}
        if rng.random() >= unanswerable:
            at = rng.randrange(len(context) + 1)
            answer = rng.choice(POSITIVE)
            context.insert(at, answer)
            answers = {"text": [answer], "answer_start": [len(" ".join(context[:at])) + (1 if at else 0)]}
        rows.append({"id": f"q{seed}-{i}", "context": " ".join(context), "question": "which is good",
                     "answers": answers})
    return rows


def to_squad(rows: list[dict], title: str = "words") -> dict:
    paragraphs = [{"context": r["context"], "qas": [
        {"id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
         "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"],
                                                                      r["answers"]["answer_start"])]}]}
                  for r in rows]
    return {"version": "v2.0", "data": [{"title": title, "paragraphs": paragraphs}]}
