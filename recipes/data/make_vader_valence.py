"""Build recipes/data/vader_valence.csv from the VADER lexicon (vaderSentiment package, MIT licence,
copyright (c) 2016 C.J. Hutto; https://github.com/cjhutto/vaderSentiment).

The VADER lexicon holds ~7,500 English words, emoticons and slang, each rated for sentiment by ten
people on a -4 (most negative) .. +4 (most positive) scale. We keep every item with its mean rating
(``valence``, the regression target), neutral ones included. Word variants ("beauteous",
"beauteously") would leak across a random split, so each row gets a ``group`` (the first five
characters of the lower-cased item) for the recipe's ``data.group_column``.

Run: pip install vaderSentiment && python recipes/data/make_vader_valence.py
(or give the lexicon file: python recipes/data/make_vader_valence.py path/to/vader_lexicon.txt)
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path


def lexicon_path() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vaderSentiment is not installed: pip install vaderSentiment (or pass the lexicon file)")
    return Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"


def main() -> None:
    rows = []
    for line in lexicon_path().read_text(encoding="utf-8").splitlines():
        parts = line.strip("\r").split("\t")
        if len(parts) < 2:
            continue
        text, valence = parts[0], float(parts[1])
        rows.append({"text": text, "valence": valence, "group": text.lower()[:5]})
    out = Path(__file__).with_name("vader_valence.csv")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "valence", "group"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
