"""Build recipes/data/snli_pairs.csv: premise/hypothesis pairs from SNLI 1.0 with their gold labels.

Source: the Stanford Natural Language Inference corpus 1.0 (Bowman, Angeli, Potts and Manning, EMNLP
2015), https://nlp.stanford.edu/projects/snli/, licensed CC BY-SA 4.0
(https://creativecommons.org/licenses/by-sa/4.0/); so is this derived file. Premises are Flickr30k
image captions; crowd workers wrote a hypothesis that is entailed by, neutral to, or contradicts it.

The machine that built this file is offline; the copy used is the one committed to
github.com/Deltaus/sBiMPM (``snli_1.0/``, commit 8f1b040), which holds the first 1,289 lines of
``snli_1.0_dev.jsonl`` and the first 1,288 of ``snli_1.0_test.jsonl`` unchanged (the full files have
10,000 each):

    snli_1.0_dev.jsonl   sha256 d28f65fc66b8943787b53ff1db0a8e69a9ca86ebafd1a140c741323402f3cf34
    snli_1.0_test.jsonl  sha256 032b2d5720d402c7c521fb92363ba0d435839ad1bb822308ddec5b247be0482e

Subset (deterministic): the pairs of both files whose ``gold_label`` is not "-" (no majority among the
annotators), up to 2,000: the images (the caption id before "#") are shuffled with
``random.Random(0)`` and all pairs of each image are taken in that order until there are at least 2,000
(with those two files: 2,001 of their 2,527 labelled pairs, 650 images), then written in source order. Each
row keeps its ``image`` id: the recipe holds out whole images (``data.group_column``), so a premise and
its captions' near-duplicates never sit on both sides of the split.

Run (offline, given a folder holding those files, or the full ones from the SNLI zip):

    python recipes/data/make_snli_pairs.py path/to/snli_1.0
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

MAX_PAIRS = 2000
SEED = 0
FILES = ("snli_1.0_dev.jsonl", "snli_1.0_test.jsonl")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    source = Path(sys.argv[1])
    rows = []
    for name in FILES:
        for line in (source / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["gold_label"] == "-":
                continue
            rows.append({"premise": record["sentence1"].strip(), "hypothesis": record["sentence2"].strip(),
                         "label": record["gold_label"], "image": record["captionID"].split("#")[0],
                         "pair_id": record["pairID"]})
    images = sorted({row["image"] for row in rows})
    random.Random(SEED).shuffle(images)
    per_image = {image: [] for image in images}
    for i, row in enumerate(rows):
        per_image[row["image"]].append(i)
    chosen: list[int] = []
    for image in images:
        if len(chosen) >= MAX_PAIRS:
            break
        chosen.extend(per_image[image])
    rows = [rows[i] for i in sorted(chosen)]
    out = Path(__file__).with_name("snli_pairs.csv")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["premise", "hypothesis", "label", "image", "pair_id"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {label: sum(row["label"] == label for row in rows) for label in ("entailment", "neutral",
                                                                               "contradiction")}
    print(f"wrote {len(rows)} pairs of {len({row['image'] for row in rows})} images to {out}: {counts}")


if __name__ == "__main__":
    main()
