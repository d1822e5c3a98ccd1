"""Build recipes/data/squad_subset.json: a subset of SQuAD 2.0's answerable questions for the
question-answering quickstart.

Source: SQuAD 2.0 (Rajpurkar, Jia and Liang, 2018), https://rajpurkar.github.io/SQuAD-explorer/, licensed
CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); so is this subset. Its questions are
crowd-sourced on Wikipedia paragraphs.

How the subset is drawn (deterministic, nothing random): from the development set (dev-v2.0.json), the 16
articles named in ARTICLES, and of each article its first PARAGRAPHS paragraphs with their answerable
questions only (SQuAD 2.0's unanswerable questions, ``is_impossible``, are left out: SQuAD v1.1-style, so the
little training the quickstart affords goes into finding spans); a paragraph left with no question is left
out. Every answer of a question is kept (the development set has up to five per question, duplicates
included, as the official evaluation scores them). Whole articles are kept together: the quickstart recipe
splits train/eval by article (``data.group_column = "title"``), so no eval question is about an article
seen in training. The file keeps SQuAD's own nested JSON layout (version, data, title, paragraphs, context,
qas), compact, UTF-8.

The article list is the 16 articles of the copy of dev-v2.0.json in github.com/chrischute/squad
(data/dev-v2.0.json), which holds 16 of the official development set's 35 articles, unchanged; the official
file gives the same subset.

Run: python recipes/data/make_squad_subset.py [path/to/dev-v2.0.json]
(without a path the official file is downloaded from the URL below).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"
PARAGRAPHS = 15
ARTICLES = ["Normans", "Computational_complexity_theory", "Huguenot", "Steam_engine", "1973_oil_crisis",
            "European_Union_law", "Packet_switching", "Harvard_University", "Yuan_dynasty", "Immune_system",
            "Scottish_Parliament", "Islamism", "Imperialism", "Warsaw", "French_and_Indian_War", "Force"]


def main() -> None:
    if len(sys.argv) > 1:
        squad = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    else:
        with urllib.request.urlopen(URL) as response:  # noqa: S310 - a fixed https URL
            squad = json.loads(response.read().decode("utf-8"))
    by_title = {article["title"]: article for article in squad["data"]}
    missing = [t for t in ARTICLES if t not in by_title]
    if missing:
        raise SystemExit(f"articles not in the file: {missing}")
    data = []
    for title in ARTICLES:
        paragraphs = []
        for paragraph in by_title[title]["paragraphs"][:PARAGRAPHS]:
            qas = [{"id": qa["id"], "question": qa["question"],
                    "answers": [{"text": a["text"], "answer_start": a["answer_start"]} for a in qa["answers"]]}
                   for qa in paragraph["qas"] if not qa.get("is_impossible")]
            if qas:
                paragraphs.append({"context": paragraph["context"], "qas": qas})
        data.append({"title": title, "paragraphs": paragraphs})
    out = Path(__file__).with_name("squad_subset.json")
    subset = {"version": "v2.0 (answerable questions only)", "source": URL, "license": "CC BY-SA 4.0",
              "data": data}
    out.write_text(json.dumps(subset, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    questions = [qa for article in data for p in article["paragraphs"] for qa in p["qas"]]
    print(f"wrote {len(questions)} answerable questions on {sum(len(a['paragraphs']) for a in data)} paragraphs "
          f"of {len(data)} articles to {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
