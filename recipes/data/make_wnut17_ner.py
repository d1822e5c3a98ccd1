"""Build recipes/data/wnut17_train.conll and wnut17_eval.conll: a subset of WNUT-17 emerging entities.

Source: the WNUT 2017 shared task on novel and emerging entities (Derczynski, Nichols, van Erp and
Limsopatham, 2017), https://github.com/leondz/emerging_entities_17, licensed CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/). English tweets (training), YouTube comments
(development), tagged in IOB2 with six types: person, location, group, creative-work, corporation,
product. The task is hard on purpose: entities rarely repeat between training and evaluation.

Subset (deterministic): 1,000 sentences drawn at random (``random.Random(0)``) from ``wnut17train.conll``
(3,394 sentences) for training and 300 from ``emerging.dev.conll`` (1,009) for evaluation, each kept
in file order. Words and tags are copied unchanged, written one ``word<TAB>tag`` per line with a blank
line between sentences. Built from the files at commit e52a2d2 of that repository:

    wnut17train.conll   sha256 731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5
    emerging.dev.conll  sha256 e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8

Run (offline, given a copy of that repository):

    git clone https://github.com/leondz/emerging_entities_17
    python recipes/data/make_wnut17_ner.py emerging_entities_17
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

TRAIN_SENTENCES = 1000
EVAL_SENTENCES = 300
SEED = 0


def read_conll(path: Path) -> list[list[tuple[str, str]]]:
    """Sentences of a two-column (word, tag) file; a line of only whitespace ends a sentence."""
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        columns = line.split("\t")
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
            continue
        if len(columns) != 2 or not columns[0].strip() or not columns[1].strip():
            raise SystemExit(f"{path}: unexpected line {line!r}")
        current.append((columns[0].strip(), columns[1].strip()))
    if current:
        sentences.append(current)
    return sentences


def subset(sentences: list, n: int, rng: random.Random) -> list:
    chosen = sorted(rng.sample(range(len(sentences)), n))
    return [sentences[i] for i in chosen]


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for sentence in sentences:
            fh.write("".join(f"{word}\t{tag}\n" for word, tag in sentence) + "\n")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    source = Path(sys.argv[1])
    rng = random.Random(SEED)
    out = Path(__file__).parent
    for name, target, n in (("wnut17train.conll", "wnut17_train.conll", TRAIN_SENTENCES),
                            ("emerging.dev.conll", "wnut17_eval.conll", EVAL_SENTENCES)):
        sentences = subset(read_conll(source / name), n, rng)
        write_conll(out / target, sentences)
        entities = sum(tag.startswith("B-") for sentence in sentences for _, tag in sentence)
        print(f"wrote {len(sentences)} sentences ({entities} entities) to {out / target}")


if __name__ == "__main__":
    main()
