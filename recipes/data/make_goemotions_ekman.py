"""Build recipes/data/goemotions_ekman_train.csv and goemotions_ekman_eval.csv: GoEmotions in Ekman's six.

Source: GoEmotions (Demszky et al., ACL 2020), Reddit comments labelled by raters with 27 emotions or
neutral, https://github.com/google-research/google-research/tree/master/goemotions (Apache License
2.0). Comments are English Reddit posts with names masked as ``[NAME]``; some are rude or offensive.

Labels: each of the 27 emotions is mapped to one of Ekman's six (anger, disgust, fear, joy, sadness,
surprise) by the dataset's own ``data/ekman_mapping.json`` (copied below); "neutral" maps to no label,
so a row may carry no label (written ``[]``), one, or several (``joy,surprise``). Ekman's grouping keeps
six labels a 2-core CPU can learn in a minute; the 27 fine emotions need far more data per label.

Subset (deterministic): 2,000 rows drawn at random (``random.Random(0)``) from ``data/train.tsv``
(43,410 rows) and 500 from ``data/dev.tsv`` (5,426), each kept in file order; text unchanged. Built
from the files of google-research at commit 2adf640 (as mirrored unchanged in
github.com/monologg/GoEmotions-pytorch, ``data/original/``):

    train.tsv     sha256 1c254a142be5c00e80d819b9ae1bbd36d94b2eeb8f4b1271846508d57e57d9c5
    dev.tsv       sha256 575489c079c9de1097062a01738f998590d6b7ead66dd1c9fd1d2ba01fd8bc62
    emotions.txt  sha256 45c3ef86782d2a4d7fedcd6d8c111aa0d0e94720689bd164fac94fefb4495a89

Run (offline, given a folder holding those three files):

    python recipes/data/make_goemotions_ekman.py path/to/goemotions/data
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

TRAIN_ROWS = 2000
EVAL_ROWS = 500
SEED = 0
# goemotions/data/ekman_mapping.json
EKMAN = {
    "anger": ["anger", "annoyance", "disapproval"],
    "disgust": ["disgust"],
    "fear": ["fear", "nervousness"],
    "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism", "relief", "pride",
            "admiration", "desire", "caring"],
    "sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"],
    "surprise": ["surprise", "realization", "confusion", "curiosity"],
}
ORDER = list(EKMAN)


def read_rows(path: Path, emotions: list[str]) -> list[dict[str, str]]:
    to_ekman = {fine: coarse for coarse, fines in EKMAN.items() for fine in fines}
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text, ids, comment_id = line.split("\t")
        names = {emotions[int(i)] for i in ids.split(",")}
        coarse = {to_ekman[name] for name in names if name != "neutral"}
        labels = [label for label in ORDER if label in coarse]
        rows.append({"id": comment_id, "text": text, "labels": ",".join(labels) if labels else "[]"})
    return rows


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    source = Path(sys.argv[1])
    emotions = (source / "emotions.txt").read_text(encoding="utf-8").split()
    assert len(emotions) == 28 and emotions[-1] == "neutral", emotions
    rng = random.Random(SEED)
    out = Path(__file__).parent
    for name, target, n in (("train.tsv", "goemotions_ekman_train.csv", TRAIN_ROWS),
                            ("dev.tsv", "goemotions_ekman_eval.csv", EVAL_ROWS)):
        rows = read_rows(source / name, emotions)
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
        with open(out / target, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "labels", "id"])
            writer.writeheader()
            writer.writerows(rows)
        counts = {label: sum(label in row["labels"].split(",") for row in rows) for label in ORDER}
        print(f"wrote {len(rows)} rows to {out / target}: {counts}, "
              f"no label: {sum(row['labels'] == '[]' for row in rows)}")


if __name__ == "__main__":
    main()
