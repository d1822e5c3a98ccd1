"""Object-detection data: COCO JSON, YOLO txt folders and Pascal VOC XML, read into one form.

Every layout becomes a list of :class:`DetectionExample` (image path, image width and height, boxes as
``[x1, y1, x2, y2]`` in the image's pixels, one class name per box) plus the data set's class names in
the data set's own order:

* COCO: the ``categories`` list ordered by id;
* YOLO: the class-id order of ``data.yaml``'s ``names`` / ``classes.txt`` / ``data.classes``;
* Pascal VOC (no class list of its own): ``data.classes`` when given, else the names sorted.

The layout is detected from the path (:func:`detect_layout`):

* a ``.json`` file -> COCO (images under ``data.images``, else beside the json);
* a folder with ``Annotations/`` (and ``JPEGImages/``) -> Pascal VOC, every annotation file;
* a ``.txt`` file in a VOC ``ImageSets/Main/`` folder -> Pascal VOC, only the image ids it lists
  (``train.txt``, ``val.txt``, ``test.txt``: the data set's own split);
* a folder with ``images/`` and ``labels/`` -> YOLO (``labels/<same relative path>.txt`` per image, lines
  ``class cx cy w h`` normalised to 0..1; an image without a label file has no boxes);
* a folder holding exactly one ``.json`` (at its top or in ``annotations/``) -> COCO.

Images with no boxes are kept (negatives). Bad input is a :class:`finetune.DataError` naming the recipe
key, the file and the object or line: boxes outside the image, zero or negative sizes, unknown category
ids or class names, annotations whose image file is missing (or unreadable, or of another size than the
annotations say), unreadable annotation files, a layout that is none of the above or more than one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import DataError
from finetune_vision.images import IMAGE_EXTENSIONS, list_image_files

#: a box may stick out of its image by this many pixels (rounding in converters); more is an error
EDGE_TOLERANCE = 1.0


@dataclass
class DetectionExample:
    image: str  #: absolute path of the image file
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)  #: [x1, y1, x2, y2] in pixels
    labels: list[str] = field(default_factory=list)  #: one class name per box

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "width": self.width, "height": self.height, "boxes": self.boxes,
                "labels": self.labels}


@dataclass
class DetectionData:
    examples: list[DetectionExample]
    classes: list[str]  #: the data set's class names in its own order
    layout: str  #: "coco", "yolo" or "voc"
    source: str  #: what was read (file or folder)


LAYOUT_HELP = ("a COCO annotations .json (images under data.images, else beside "
               "it), a Pascal VOC folder (Annotations/ + JPEGImages/) or one of its ImageSets/Main/*.txt lists, or "
               "a YOLO folder (images/ + labels/ with `class cx cy w h` lines)")


def detect_layout(path: Path, key: str) -> tuple[str, Path]:
    """``(layout, path)``: which format ``path`` holds (see the module docstring)."""
    if not path.exists():
        raise DataError(f"{key}: not found: {path}. Give {LAYOUT_HELP} (relative paths resolve against the "
                        "recipe's folder).")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco", path
        if path.suffix.lower() == ".txt" and path.parent.name == "Main" and path.parent.parent.name == "ImageSets":
            return "voc-list", path
        raise DataError(f"{key}: {path} is neither a COCO .json nor a VOC ImageSets/Main/*.txt list; give "
                        f"{LAYOUT_HELP}.")
    subs = {p.name for p in path.iterdir() if p.is_dir()}
    found = []
    if "Annotations" in subs:
        found.append("voc")
    if "images" in subs and "labels" in subs:
        found.append("yolo")
    jsons = sorted(path.glob("*.json")) + sorted((path / "annotations").glob("*.json"))
    if len(found) == 1:
        return found[0], path
    if len(found) > 1:
        raise DataError(f"{key}: {path} looks like both a Pascal VOC folder (Annotations/) and a YOLO folder "
                        "(images/ + labels/); point data paths at one layout's folder.")
    if len(jsons) == 1:
        return "coco", jsons[0]
    if len(jsons) > 1:
        raise DataError(f"{key}: {path} holds several .json files ({', '.join(p.name for p in jsons[:5])}); give "
                        "the COCO annotations file itself as the path.")
    raise DataError(f"{key}: cannot tell the annotation layout of {path} (sub-folders: "
                    f"{', '.join(sorted(subs)) or 'none'}); give {LAYOUT_HELP}.")


def read_detection(path: str | Path, key: str, *, images: str | Path | None = None,
                   classes: list[str] | None = None, yolo_classes: list[str] | None = None) -> DetectionData:
    """Read a detection data set of any supported layout. ``images``: COCO's image folder (``data.images``);
    ``classes``: the class names in order (``data.classes``; the order for VOC/YOLO when given);
    ``yolo_classes``: the names of a YOLO folder's class ids when neither ``classes`` nor the folder gives them
    (an eval folder takes the training classes)."""
    layout, where = detect_layout(Path(path), key)
    if layout == "coco":
        return read_coco(where, key, Path(images) if images else None)
    if layout == "yolo":
        return read_yolo(where, key, classes, yolo_classes)
    ids = None
    if layout == "voc-list":
        ids = read_id_list(where, key)
        where = where.parent.parent.parent
    return read_voc(where, key, classes, ids)


# ---------------------------------------------------------------------------------------------------- checks

def check_box(box: list[float], width: int, height: int, where: str, key: str) -> list[float]:
    """The box as floats, after checking that it has a positive size and lies inside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise DataError(f"{key}: {where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has a zero or negative size "
                        f"(width {x2 - x1:g}, height {y2 - y1:g}); fix or remove that object.")
    t = EDGE_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise DataError(f"{key}: {where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the {width}x{height} "
                        "image; fix its coordinates (pixels, x to the right, y down) or remove that object.")
    return [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]


def _image_size(path: Path, key: str, where: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except FileNotFoundError:
        raise DataError(f"{key}: {where}: image file {path} not found; add it or remove its annotations.") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
        raise DataError(f"{key}: {where}: image {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); "
                        "fix or remove it.") from None


def _checked_size(file: Path, width: Any, height: Any, key: str, where: str) -> tuple[int, int]:
    """The image's own size (its header is read: a missing or undecodable file is an error here), after checking
    it against the size the annotations give (a mismatch would silently misplace every box)."""
    actual = _image_size(file, key, where)
    if width and height and (int(float(width)), int(float(height))) != tuple(actual):
        raise DataError(f"{key}: {where}: the annotations give the image size {int(float(width))}x"
                        f"{int(float(height))} but {file} is {actual[0]}x{actual[1]}; boxes must be in the pixels of "
                        "the image file (re-export the annotations, or the images at their annotated size).")
    return actual


# ---------------------------------------------------------------------------------------------------- COCO

def read_coco(path: Path, key: str, images: Path | None) -> DetectionData:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{key}: COCO annotations file {path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc)[:160]}).") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("categories"), list):
        raise DataError(f"{key}: {path} is not a COCO detection file: it needs top-level 'images', 'annotations' "
                        "and 'categories' lists.")
    folder = images or path.parent
    try:
        categories = sorted(((int(c["id"]), str(c["name"])) for c in doc["categories"]), key=lambda c: c[0])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{key}: {path}: every entry of 'categories' needs an integer 'id' and a 'name'.") from None
    names = {cid: name for cid, name in categories}
    if len(set(names.values())) != len(names):
        raise DataError(f"{key}: {path}: two categories share a name; category names must be unique.")
    by_id: dict[int, DetectionExample] = {}
    for n, image in enumerate(doc["images"]):
        try:
            image_id, file_name = int(image["id"]), str(image["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{key}: {path}: images[{n}] needs an integer 'id' and a 'file_name'.") from None
        file = Path(file_name) if Path(file_name).is_absolute() else folder / file_name
        where = f"{path.name}: image id {image_id} ({file_name})"
        if not file.is_file():
            raise DataError(f"{key}: {where}: image file {file} not found (images are read from "
                            f"{'data.images' if images else 'the folder of the json'}: {folder}); add it, remove the "
                            "image, or set data.images to the image folder.")
        width, height = _checked_size(file, image.get("width"), image.get("height"), key, where)
        by_id[image_id] = DetectionExample(str(file.resolve()), int(width), int(height))
    for n, ann in enumerate(doc.get("annotations") or []):
        where = f"{path.name}: annotations[{n}] (id {ann.get('id', '?')}, image id {ann.get('image_id', '?')})"
        if ann.get("iscrowd"):
            continue  # crowd regions mark "many objects here": not a box to learn or score
        example = by_id.get(ann.get("image_id"))
        if example is None:
            raise DataError(f"{key}: {where}: no image with id {ann.get('image_id')!r} in 'images'; add the image "
                            "or remove the annotation.")
        if ann.get("category_id") not in names:
            raise DataError(f"{key}: {where}: unknown category id {ann.get('category_id')!r} (categories: "
                            f"{', '.join(f'{i}={v}' for i, v in categories)}); fix it or add that category.")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise DataError(f"{key}: {where}: 'bbox' must be [x, y, width, height], got {bbox!r}.")
        x, y, w, h = (float(v) for v in bbox)
        example.boxes.append(check_box([x, y, x + w, y + h], example.width, example.height, where, key))
        example.labels.append(names[ann["category_id"]])
    return DetectionData(list(by_id.values()), [name for _, name in categories], "coco", str(path))


# ---------------------------------------------------------------------------------------------------- YOLO

def _yolo_classes(root: Path, key: str, classes: list[str] | None, fallback: list[str] | None) -> list[str]:
    if classes:
        return list(classes)
    for name in ("data.yaml", "dataset.yaml"):
        file = root / name
        if file.is_file():
            import yaml

            try:
                doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise DataError(f"{key}: {file} cannot be read ({type(exc).__name__}: {str(exc)[:160]}).") from None
            names = doc.get("names") if isinstance(doc, dict) else None
            if isinstance(names, dict):
                return [str(names[i]) for i in sorted(names, key=int)]
            if isinstance(names, list) and names:
                return [str(v) for v in names]
            raise DataError(f"{key}: {file} has no 'names' list (the class names in class-id order).")
    file = root / "classes.txt"
    if file.is_file():
        return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if fallback:
        return list(fallback)
    raise DataError(f"{key}: YOLO folder {root} names no classes: add data.yaml (names: [...]) or classes.txt "
                    "(one name a line, in class-id order), or set data.classes in the recipe.")


def read_yolo(root: Path, key: str, classes: list[str] | None, fallback: list[str] | None = None) -> DetectionData:
    names = _yolo_classes(root, key, classes, fallback)
    image_dir, label_dir = root / "images", root / "labels"
    files = list_image_files(image_dir)
    stems = {f.relative_to(image_dir).with_suffix("") for f in files}
    orphans = sorted(p for p in label_dir.rglob("*.txt") if p.relative_to(label_dir).with_suffix("") not in stems)
    if orphans:
        raise DataError(f"{key}: label file(s) without an image in {image_dir}: "
                        f"{', '.join(str(p) for p in orphans[:5])}{' ...' if len(orphans) > 5 else ''}; add the "
                        "images or remove the label files.")
    examples = []
    for file in files:
        where_image = str(file.relative_to(root))
        width, height = _image_size(file, key, where_image)
        example = DetectionExample(str(file.resolve()), width, height)
        label_file = label_dir / file.relative_to(image_dir).with_suffix(".txt")
        if label_file.is_file():
            try:
                lines = label_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{key}: {label_file} cannot be read ({type(exc).__name__}).") from None
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{label_file}: line {number}"
                parts = line.split()
                try:
                    cid, (cx, cy, w, h) = int(parts[0]), (float(v) for v in parts[1:5])
                    if len(parts) != 5:
                        raise ValueError
                except (ValueError, IndexError):
                    raise DataError(f"{key}: {where}: expected `class cx cy w h` (an integer and four numbers "
                                    f"0..1), got {line.strip()!r}.") from None
                if not 0 <= cid < len(names):
                    raise DataError(f"{key}: {where}: unknown class id {cid} (classes 0..{len(names) - 1}: "
                                    f"{', '.join(names)}); fix it or add the class to the class list.")
                if w <= 0 or h <= 0:
                    raise DataError(f"{key}: {where}: box width/height {w:g}/{h:g} must be positive.")
                if cx - w / 2 < -1e-3 or cy - h / 2 < -1e-3 or cx + w / 2 > 1 + 1e-3 or cy + h / 2 > 1 + 1e-3:
                    raise DataError(f"{key}: {where}: box (cx {cx:g}, cy {cy:g}, w {w:g}, h {h:g}) lies outside the "
                                    "image; YOLO coordinates are fractions 0..1 of the image width and height.")
                box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
                example.boxes.append(check_box(box, width, height, where, key))
                example.labels.append(names[cid])
        examples.append(example)
    if not examples:
        raise DataError(f"{key}: {image_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return DetectionData(examples, names, "yolo", str(root))


# ---------------------------------------------------------------------------------------------------- VOC

def read_id_list(path: Path, key: str) -> list[str]:
    try:
        ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}: image-set list {path} cannot be read ({type(exc).__name__}).") from None
    if not ids:
        raise DataError(f"{key}: image-set list {path} is empty.")
    return ids


def _voc_image(root: Path, file: Path, filename: str | None, key: str) -> Path:
    folder = root / "JPEGImages"
    if filename and (folder / filename).is_file():
        return folder / filename
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp"):
        if (folder / (file.stem + ext)).is_file():
            return folder / (file.stem + ext)
    raise DataError(f"{key}: {file}: its image {filename or file.stem + '.jpg'} is not in {folder}; add it or "
                    "remove the annotation file.")


def read_voc(root: Path, key: str, classes: list[str] | None, ids: list[str] | None = None) -> DetectionData:
    import xml.etree.ElementTree as ET

    annotations = root / "Annotations"
    if ids is None:
        files = sorted(annotations.glob("*.xml"))
        if not files:
            raise DataError(f"{key}: {annotations} holds no .xml annotation files.")
    else:
        files = [annotations / f"{i}.xml" for i in ids]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{key}: {len(missing)} image id(s) of the list have no annotation file in "
                            f"{annotations} (e.g. {', '.join(missing[:3])}).")
    examples = []
    seen: set[str] = set()
    for file in files:
        try:
            tree = ET.parse(file).getroot()
        except (OSError, ET.ParseError) as exc:
            raise DataError(f"{key}: annotation file {file} cannot be read ({type(exc).__name__}: "
                            f"{str(exc)[:120]}).") from None
        image = _voc_image(root, file, tree.findtext("filename"), key)
        size = tree.find("size")
        given = (size.findtext("width"), size.findtext("height")) if size is not None else (None, None)
        try:
            given = given if all(float(v) > 0 for v in given) else (None, None)
        except (TypeError, ValueError):
            given = (None, None)
        width, height = _checked_size(image, *given, key, str(file))
        example = DetectionExample(str(image.resolve()), width, height)
        for n, obj in enumerate(tree.findall("object")):
            name = (obj.findtext("name") or "").strip()
            where = f"{file}: object {n + 1} ({name or 'no name'})"
            if not name:
                raise DataError(f"{key}: {where}: the object has no <name>.")
            if classes and name not in classes:
                raise DataError(f"{key}: {where}: class {name!r} is not in data.classes ({', '.join(classes)}).")
            bndbox = obj.find("bndbox")
            try:
                box = [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise DataError(f"{key}: {where}: <bndbox> needs numeric xmin, ymin, xmax, ymax.") from None
            example.boxes.append(check_box(box, width, height, where, key))
            example.labels.append(name)
            seen.add(name)
        examples.append(example)
    names = list(classes) if classes else sorted(seen)
    return DetectionData(examples, names, "voc", str(root))


def split_examples(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random hold-out of ``fraction`` of the images (at least one on each side)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
