"""``finetune init`` for the vision tasks (the ``finetune_claim_data`` hook): class folders, image tables,
detection layouts (COCO / YOLO / Pascal VOC, as :mod:`finetune_vision.detection_data` reads them) and image +
mask folders. Looks at the probe's tree and tables; opens at most one image header (PIL) for its size."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finetune import Claim, DataProbe
from finetune_vision.images import EVAL_FOLDER_NAMES, IMAGE_EXTENSIONS

BACKBONE = "mobilenetv2_100.tv_in1k"
_BACKBONE_NOTE = "offline MobileNetV2 (ImageNet), the vision quickstarts' backbone"
_LABEL_NAMES = ("label", "labels", "class", "classes", "category", "categories", "tags", "target")
_ID_NAME = re.compile(r"(^|[_\s-])(id|ids|uuid|index|idx)$", re.IGNORECASE)


def _settings(train: Any, epochs: int, batch_size: int) -> dict[str, dict[str, Any]]:
    return {"model": {"backbone": BACKBONE},
            "data": {"train": train},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 2e-3, "mixed_precision": "no"}}


def _comments(**extra: str) -> dict[str, str]:
    return {"model.backbone": _BACKBONE_NOTE, "peft.method": "LoRA on the backbone's convs; the new head in full",
            "train.mixed_precision": "fp32, as the vision quickstarts measured", **extra}


def _first_image_size(folder: Path) -> tuple[int, int] | None:
    """Width and height of the first image under ``folder`` (its header only)."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            try:
                from PIL import Image

                with Image.open(path) as image:
                    return image.size
            except Exception:  # noqa: BLE001 - an unreadable image: no size hint, validate will name it
                return None
    return None


def _class_folders(probe: DataProbe, rel: str) -> dict[str, int]:
    """Sub-folders of ``rel`` that hold images (directly or below), with their image counts."""
    info = probe.tree.get(rel)
    if info is None:
        return {}
    out = {}
    for sub in info.subfolders:
        path = f"{rel}/{sub}" if rel else sub
        n = probe.files_under(path, IMAGE_EXTENSIONS)
        if n:
            out[sub] = n
    return out


def _detection(probe: DataProbe) -> Claim | None:
    tree = probe.tree
    root = tree.get("")
    settings = _settings(probe.path, epochs=4, batch_size=8)
    comments = _comments(**{"peft.method": "LoRA on the backbone's convs; FPN and head trained in full"})
    task = {"head": "fcos"}
    if probe.is_file and probe.suffix == ".json" and isinstance(probe.json, dict) \
            and {"images", "annotations", "categories"} <= set(probe.json):
        doc = probe.json
        reasons = [f"a COCO annotations file: {len(doc['images']):,} images, {len(doc['annotations']):,} boxes, "
                   f"{len(doc['categories'])} categories"]
    elif probe.is_file and probe.suffix == ".txt" and probe.path.parent.name == "Main" \
            and probe.path.parent.parent.name == "ImageSets":
        reasons = [f"a Pascal VOC image list (ImageSets/Main/{probe.path.name}): {len(probe.head_lines)}+ image ids"]
    elif root is not None and "Annotations" in root.subfolders:
        xml = tree.get("Annotations")
        lists = tree.get("ImageSets/Main")
        reasons = [f"a Pascal VOC folder: Annotations/ with {xml.count({'.xml'}) if xml else 0:,} XML files"]
        if lists is not None and "train.txt" in lists.names:
            main = probe.path / "ImageSets" / "Main"
            settings["data"]["train"] = main / "train.txt"
            comments["data.train"] = "the data set's own training list"
            for role, names in (("eval", ("val.txt", "eval.txt", "valid.txt")), ("test", ("test.txt",))):
                for name in names:
                    if name in lists.names:
                        settings["data"][role] = main / name
                        comments[f"data.{role}"] = ("selects the best checkpoint" if role == "eval"
                                                    else "scored once at the end")
                        break
            reasons.append("ImageSets/Main/ holds the data set's own train/val/test lists: used as the splits")
    elif root is not None and {"images", "labels"} <= set(root.subfolders):
        labels = tree.get("labels")
        reasons = [f"a YOLO folder: images/ and labels/ ({probe.files_under('labels', {'.txt'}):,} label files)"]
        if not ({"data.yaml", "classes.txt"} & set(root.names)) and labels is not None:
            reasons.append("no data.yaml or classes.txt names the class ids: set data.classes")
            settings["data"]["classes"] = ["class0"]
            comments["data.classes"] = "EDIT: the class names in class-id order"
    else:
        jsons = [n for n in (root.names if root else []) if n.endswith(".json")]
        jsons += [f"annotations/{n}" for n in (tree.get("annotations").names if tree.get("annotations") else [])
                  if n.endswith(".json")]
        doc = probe.child(jsons[0]).json if len(jsons) == 1 else None
        if not (isinstance(doc, dict) and {"images", "annotations", "categories"} <= set(doc)):
            return None
        reasons = [f"a folder with one COCO annotations file ({jsons[0]}): {len(doc['images']):,} images, "
                   f"{len(doc['categories'])} categories"]
    if "eval" not in settings["data"]:
        settings["data"]["split"] = 0.2
        comments["data.split"] = "images held out to select the best checkpoint"
    folder = probe.path if probe.is_dir else probe.path.parent
    if probe.is_file and probe.suffix == ".txt":
        folder = probe.path.parent.parent.parent  # a VOC list: ImageSets/Main/x.txt -> the VOC root
    size = _first_image_size(folder)
    if size:
        settings["data"]["image_size"] = int(min(640, max(size)))
        comments["data.image_size"] = f"longer side of the first image ({size[0]}x{size[1]})"
    settings["task"] = task
    comments["task.head"] = "FCOS (anchor-free); or retinanet"
    return Claim(task="object-detection", score=0.95, reasons=reasons, settings=settings, comments=comments)


def _seg_pairs(probe: DataProbe) -> list[str]:
    """Folders (relative) holding images/ and masks/."""
    return sorted(rel for rel, info in probe.tree.items() if {"images", "masks"} <= set(info.subfolders))


def _segmentation(probe: DataProbe) -> Claim | None:
    if not probe.is_dir:
        return None
    pairs = _seg_pairs(probe)
    if not pairs:
        return None
    train = next((p for p in pairs if p.split("/")[-1] == "train"), pairs[0])
    evals = [p for p in pairs if p.split("/")[-1] in EVAL_FOLDER_NAMES and p != train]
    settings = _settings(probe.path / train if train else probe.path, epochs=6, batch_size=16)
    comments = _comments(**{"peft.method": "LoRA on the backbone's convs; the decoder trained in full",
                            "data.train": "images/ + masks/ (class-index PNGs, same file names)"})
    n_images = probe.files_under(f"{train}/images" if train else "images", IMAGE_EXTENSIONS)
    n_masks = probe.files_under(f"{train}/masks" if train else "masks", IMAGE_EXTENSIONS)
    reasons = [f"image + mask folders: {train or '.'}/images ({n_images:,} images) and {train or '.'}/masks "
               f"({n_masks:,} masks)"]
    if evals:
        settings["data"]["eval"] = probe.path / evals[0]
        comments["data.eval"] = "selects the best checkpoint"
        reasons.append(f"{evals[0]}/ holds held-out images + masks: used as data.eval")
    else:
        settings["data"]["split"] = 0.2
        comments["data.split"] = "images held out to select the best checkpoint"
    size = _first_image_size(probe.path / train / "images" if train else probe.path / "images")
    if size:
        settings["data"]["image_size"] = int(min(512, max(32, round(max(size) / 32) * 32)))
        comments["data.image_size"] = f"square side for training (the first image is {size[0]}x{size[1]})"
    settings["task"] = {"decoder": "fpn"}
    comments["task.decoder"] = "FPN over the stride 4-32 features (or lraspp: faster)"
    return Claim(task="semantic-segmentation", score=0.9, reasons=reasons, settings=settings, comments=comments,
                 notes=["classes are named by their pixel values (0, 1, ...): set data.classes to name them"])


def _class_folder_claim(probe: DataProbe) -> Claim | None:
    if not probe.is_dir or _seg_pairs(probe):
        return None
    root = probe.tree[""]
    if {"Annotations", "labels"} & set(root.subfolders):
        return None
    classes = _class_folders(probe, "")
    inner = None
    if "train" in classes:
        inner = _class_folders(probe, "train")
        if len(inner) >= 2:
            classes = inner
    if len(classes) < 2:
        return None
    total = sum(classes.values())
    settings = _settings(probe.path, epochs=3, batch_size=32)
    comments = _comments(**{"data.train": "one sub-folder per class"})
    reasons = [f"{len(classes)} sub-folders of images ({total:,} images): one class per folder, e.g. "
               + ", ".join(f"{name} ({n})" for name, n in list(classes.items())[:4])]
    if inner is not None and len(inner) >= 2:
        settings["data"]["train"] = probe.path / "train"
        evals = [n for n in root.subfolders if n in EVAL_FOLDER_NAMES]
        if evals:
            settings["data"]["eval"] = probe.path / evals[0]
            comments["data.eval"] = "selects the best checkpoint"
            reasons.append(f"train/ and {evals[0]}/ hold the classes: used as the splits")
    if "eval" not in settings["data"]:
        settings["data"]["split"] = 0.2
        comments["data.split"] = "held out (stratified by class) to select the best checkpoint"
    return Claim(task="image-classification", score=0.85, reasons=reasons, settings=settings, comments=comments)


def _table_claim(probe: DataProbe) -> Claim | None:
    table = probe.table
    if table is None:
        return None
    images = [c for c in table.columns.values()
              if c.kind == "path" and sum(n for e, n in c.extensions.items() if e in IMAGE_EXTENSIONS) >= 0.9 * c.count]
    images = [c for c in images if probe.existing_share(c.name) > 0]
    if not images:
        return None  # file names of images that are not there (e.g. an id column that ends in .jpg)
    image = images[0]
    labels = [c for c in table.columns.values() if c is not image and c.kind in ("category", "list")
              and not _ID_NAME.search(c.name)]
    named = [c for c in labels if c.name.lower() in _LABEL_NAMES]
    label = named[0] if named else labels[0] if len(labels) == 1 else None
    if label is None:
        return None
    multi = label.kind == "list" or bool(label.multi_label_separator)
    task = "multi-label-image-classification" if multi else "image-classification"
    settings = _settings(probe.path, epochs=6 if multi else 3, batch_size=16 if multi else 32)
    settings["data"].update(image_column=image.name, label_column=label.name)
    comments = _comments(**{"data.image_column": image.describe() + " (relative to the table)",
                            "data.label_column": label.describe()})
    reasons = [f"column `{image.name}` holds image files: {image.describe()}"]
    if multi:
        reasons.append(f"column `{label.name}` holds several labels per image: {label.describe()}")
        sep = label.multi_label_separator
        if sep and sep not in (",", "json"):
            settings["data"]["label_delimiter"] = sep
    else:
        reasons.append(f"column `{label.name}` looks like the label: {label.describe()}")
    settings["data"]["split"] = 0.2
    comments["data.split"] = "held out to select the best checkpoint"
    group = probe.group_column(exclude=[image.name, label.name])
    if group:
        settings["data"]["group_column"] = group[0]
        comments["data.group_column"] = "rows sharing it stay on one side of the split"
        reasons.append(group[1])
    return Claim(task=task, score=0.9 if multi else 0.85, reasons=reasons, settings=settings, comments=comments)


def claim_data(probe: DataProbe) -> list[Claim]:
    """The vision plugin's claims on ``probe``."""
    for detector in (_detection, _segmentation, _class_folder_claim, _table_claim):
        claim = detector(probe)
        if claim is not None:
            return [claim]
    return []
