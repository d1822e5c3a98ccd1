"""Build recipes/data/vader_sentiment.csv from the VADER lexicon (vaderSentiment package, MIT).

The VADER lexicon holds ~7,500 English words, emoticons and slang, each rated
for sentiment by ten people (mean valence -4..4). We keep the clearly polar
items (|mean valence| >= 1) and label them positive/negative. Word variants
("beauteous", "beauteously") would leak across a random split, so each row gets
a ``group`` (the first five characters of the lower-cased item) for the recipe's
``data.group_column``: variants always land on the same side of the split.

Run: pip install vaderSentiment && python recipes/data/make_vader_sentiment.py
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path


def main() -> None:
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vaderSentiment is not installed: pip install vaderSentiment")
    lexicon = Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"
    rows = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        text, valence = parts[0], float(parts[1])
        if abs(valence) < 1.0:
            continue
        rows.append({"text": text, "label": "positive" if valence > 0 else "negative",
                     "group": text.lower()[:5]})
    out = Path(__file__).with_name("vader_sentiment.csv")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
