"""Build the multi-label image quickstart's tables from the BCCD blood-cell data in ``recipes/data/bccd/``.

Each image's labels are the cell types with at least one box in its Pascal VOC annotation (RBC, WBC,
Platelets; an image with no box would get an empty label cell). One table per split of the source's own
``ImageSets/Main`` lists, the split the detection quickstart uses too:

* ``bccd_multilabel_train.csv`` (train.txt, 205 images), ``bccd_multilabel_eval.csv`` (val.txt, 87),
  ``bccd_multilabel_test.csv`` (test.txt, 72);
* columns ``file`` (the image path relative to this folder, e.g. ``bccd/JPEGImages/BloodImage_00000.jpg``)
  and ``labels`` (the types present, comma-separated, in the order RBC, WBC, Platelets).

    python recipes/data/make_bccd_multilabel.py
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
BCCD = HERE / "bccd"
TYPES = ("RBC", "WBC", "Platelets")
SPLITS = {"train": "train", "eval": "val", "test": "test"}


def labels_of(annotation: Path) -> list[str]:
    names = {obj.findtext("name") for obj in ET.parse(annotation).getroot().iter("object")}
    unknown = names - set(TYPES)
    if unknown:
        raise SystemExit(f"{annotation}: unknown cell type(s) {sorted(unknown)}")
    return [t for t in TYPES if t in names]


def build(bccd: Path = BCCD, out: Path = HERE) -> dict[str, Path]:
    written = {}
    for name, source in SPLITS.items():
        ids = (bccd / "ImageSets" / "Main" / f"{source}.txt").read_text().split()
        path = out / f"bccd_multilabel_{name}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["file", "labels"])
            for image_id in ids:
                image = bccd / "JPEGImages" / f"{image_id}.jpg"
                if not image.is_file():
                    raise SystemExit(f"{image}: missing (listed in ImageSets/Main/{source}.txt)")
                writer.writerow([image.relative_to(out).as_posix(),
                                 ",".join(labels_of(bccd / "Annotations" / f"{image_id}.xml"))])
        written[name] = path
    return written


if __name__ == "__main__":
    for name, path in build().items():
        print(f"{name}: {path}")
