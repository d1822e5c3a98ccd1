"""Fixtures of the object-detection tests: tiny images with bright squares, written as COCO, YOLO and VOC."""

from __future__ import annotations

import json
from pathlib import Path

SQUARE_COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230)}


def square_scenes(n: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[dict]:
    """``n`` scenes: a dark noisy ``size`` image with 0-2 coloured squares; every 5th scene has none (a
    negative). Each: {"name", "pixels" (H x W x 3 uint8), "boxes" [[x1, y1, x2, y2]], "labels" [name]}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    width, height = size
    scenes = []
    for i in range(n):
        pixels = rng.integers(0, 50, size=(height, width, 3)).astype(np.uint8)
        boxes, labels = [], []
        for k in range(0 if i % 5 == 4 else 1 + i % 2):
            side = int(rng.integers(12, 20))
            x = int(rng.integers(0, width - side)) if k == 0 else min(width - side, int(rng.integers(0, width // 2)))
            y = int(rng.integers(0, height - side))
            if any(not (x + side <= b[0] or b[2] <= x or y + side <= b[1] or b[3] <= y) for b in boxes):
                continue
            name = list(SQUARE_COLOURS)[(i + k) % 2]
            pixels[y:y + side, x:x + side] = SQUARE_COLOURS[name]
            boxes.append([x, y, x + side, y + side])
            labels.append(name)
        scenes.append({"name": f"scene_{i:03d}", "pixels": pixels, "boxes": boxes, "labels": labels})
    return scenes


def _save(pixels, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def write_coco(folder: Path, scenes: list[dict], classes=("red", "blue"), image_dir: str = "images") -> Path:
    """``folder/annotations.json`` (category ids 1..K in ``classes`` order) + ``folder/<image_dir>/*.png``."""
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        _save(scene["pixels"], folder / image_dir / f"{scene['name']}.png")
        h, w = scene["pixels"].shape[:2]
        images.append({"id": i + 1, "file_name": f"{image_dir}/{scene['name']}.png", "width": w, "height": h})
        for box, label in zip(scene["boxes"], scene["labels"]):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": list(classes).index(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": c + 1, "name": name} for c, name in enumerate(classes)]}
    (folder / "annotations.json").write_text(json.dumps(doc))
    return folder / "annotations.json"


def write_yolo(folder: Path, scenes: list[dict], classes=("red", "blue"), names_file: str = "data.yaml") -> Path:
    for scene in scenes:
        _save(scene["pixels"], folder / "images" / f"{scene['name']}.png")
        h, w = scene["pixels"].shape[:2]
        lines = [f"{list(classes).index(label)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} "
                 f"{(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}"
                 for b, label in zip(scene["boxes"], scene["labels"])]
        if lines:  # an image without boxes has no label file (the YOLO convention)
            (folder / "labels").mkdir(parents=True, exist_ok=True)
            (folder / "labels" / f"{scene['name']}.txt").write_text("\n".join(lines) + "\n")
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    if names_file == "data.yaml":
        (folder / "data.yaml").write_text("names: [" + ", ".join(classes) + "]\n")
    elif names_file == "classes.txt":
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    return folder


def write_voc(folder: Path, scenes: list[dict], lists: dict[str, list[int]] | None = None) -> Path:
    for scene in scenes:
        _save(scene["pixels"], folder / "JPEGImages" / f"{scene['name']}.png")
        h, w = scene["pixels"].shape[:2]
        objects = "".join(
            f"<object><name>{label}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b, label in zip(scene["boxes"], scene["labels"]))
        (folder / "Annotations").mkdir(parents=True, exist_ok=True)
        (folder / "Annotations" / f"{scene['name']}.xml").write_text(
            f"<annotation><filename>{scene['name']}.png</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")
    for name, indices in (lists or {}).items():
        (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (folder / "ImageSets" / "Main" / f"{name}.txt").write_text(
            "".join(scenes[i]["name"] + "\n" for i in indices))
    return folder


def detection_recipe(path: Path, backbone: Path | str, train: Path | str, out: Path, *, data: str = "",
                     task: str = "", train_opts: str = "", peft: str = "") -> Path:
    path.write_text(f'[task]\nname = "object-detection"\nfpn_channels = 64\nhead_convs = 1\n{task}\n'
                    f'[model]\nbackbone = "{backbone}"\n'
                    f'[data]\ntrain = "{train}"\nsplit = 0.25\nimage_size = 64\n{data}\n'
                    f'[peft]\nr = 4\nalpha = 8\ndropout = 0.0\n{peft}\n'
                    '[train]\nepochs = 1\nbatch_size = 8\nlearning_rate = 1e-2\nmixed_precision = "no"\nseed = 0\n'
                    f'{train_opts}\n[output]\ndir = "{out}"\n')
    return path
