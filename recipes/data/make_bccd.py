"""Build ``recipes/data/bccd/`` (the detection quickstart's data) from the BCCD blood-cell dataset.

Source: https://github.com/Shenggan/BCCD_Dataset, commit d272fb1 (MIT licence; images and annotations from
https://github.com/cosmicad/dataset and https://github.com/akshaylamba/all_CELL_data, re-organised in the
Pascal VOC layout by the repository's authors). 364 light-microscopy images of blood smears, 640x480 JPEG,
with boxes for three cell types: RBC (red blood cells, 4,155 boxes), WBC (white, 372), Platelets (361).

What this script changes, nothing else:
* every image is downscaled to 320x240 (Lanczos, JPEG quality 90) and every box coordinate halved and rounded,
  so the quickstart trains in minutes on a CPU;
* the two zero-size boxes of the source (BloodImage_00338 and BloodImage_00343, both a single point) are
  dropped, as a detector cannot learn from them;
* the XML keeps only folder, filename, size and each object's name, difficult flag and box.
The source's own split (ImageSets/Main/train.txt 205, val.txt 87, test.txt 72 images) is copied unchanged.

    git clone https://github.com/Shenggan/BCCD_Dataset && git -C BCCD_Dataset checkout d272fb1
    python recipes/data/make_bccd.py BCCD_Dataset
"""

from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

SCALE = 2
OUT = Path(__file__).resolve().parent / "bccd"


def convert(source: Path, out: Path = OUT) -> None:
    src = source / "BCCD"
    if out.exists():
        shutil.rmtree(out)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    dropped = 0
    for xml in sorted((src / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        name = root.findtext("filename").strip()
        image = Image.open(src / "JPEGImages" / name).convert("RGB")
        width, height = image.width // SCALE, image.height // SCALE
        image.resize((width, height), Image.Resampling.LANCZOS).save(out / "JPEGImages" / name, quality=90)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "JPEGImages"
        ET.SubElement(ann, "filename").text = name
        size = ET.SubElement(ann, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for obj in root.findall("object"):
            box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            if box[2] <= box[0] or box[3] <= box[1]:
                dropped += 1
                continue
            x1, y1, x2, y2 = (round(v / SCALE) for v in box)
            x2, y2 = min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)
            o = ET.SubElement(ann, "object")
            ET.SubElement(o, "name").text = obj.findtext("name").strip()
            ET.SubElement(o, "difficult").text = (obj.findtext("difficult") or "0").strip()
            b = ET.SubElement(o, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(b, tag).text = str(value)
        ET.indent(ann)
        ET.ElementTree(ann).write(out / "Annotations" / xml.name, encoding="unicode")
    for split in ("train", "val", "test"):
        shutil.copy(src / "ImageSets" / "Main" / f"{split}.txt", out / "ImageSets" / "Main" / f"{split}.txt")
    shutil.copy(source / "LICENSE", out / "LICENSE")
    print(f"wrote {out} (dropped {dropped} zero-size boxes)")


if __name__ == "__main__":
    convert(Path(sys.argv[1]))
