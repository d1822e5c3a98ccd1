"""Reading images robustly: listing a class-per-folder tree or a path table, mode conversion, checks.

Every image becomes 8-bit RGB the same way at training and prediction time: EXIF orientation applied,
16-bit and float greyscale scaled (not clipped) to 8 bits, transparency composited on white, CMYK /
palette / greyscale converted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finetune import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
EVAL_FOLDER_NAMES = ("eval", "val", "valid", "validation", "test")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), hidden files and folders skipped."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def image_inputs(path: Path, column: str) -> list[dict[str, Any]] | None:
    """Prediction records ``{column: path}`` for one image file or a folder of images (its image files, in
    name order); None when ``path`` is neither (a table the task reads itself)."""
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise DataError(f"--input: {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return [{column: str(f)} for f in files]
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [{column: str(path)}]
    return None


def paths_relative_to(records: list[dict[str, Any]], column: str, table: Path) -> list[dict[str, Any]]:
    """The image paths in ``records[column]`` resolved against the folder of the table they came from."""
    for record in records:
        image = Path(str(record[column]))
        record[column] = str(image if image.is_absolute() else (table.parent / image).resolve())
    return records


class ImagePredictInput:
    """``finetune predict`` input for a task whose records name one image each in ``data.image_column``: an
    image file, a folder of images (in name order), or a table the base ``Task`` reads (its columns kept, image
    paths resolved against its folder). Mix in before ``finetune.Task``."""

    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.image_column]

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        path, column = Path(path), self.recipe.data.image_column
        records = image_inputs(path, column)
        if records is None:
            records = paths_relative_to(super().read_predict_input(path), column, path)
        return records


def scan_class_folders(folder: Path, key: str) -> list[tuple[str, str]]:
    """``(path, label)`` pairs of a class-per-subfolder tree (``folder/<label>/**/image``)."""
    if not folder.exists():
        raise DataError(f"{key}: folder not found: {folder}. Check the path (relative paths resolve against the "
                        "recipe's folder).")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in folder.iterdir() if is_image_file(p)]
        hint = (f" It holds {len(loose)} image(s) directly (e.g. {loose[0]}); put each class in its own "
                f"subfolder ({folder}/<class>/<image>)") if loose else ""
        raise DataError(f"{key}: {folder} has no class subfolders.{hint} An image folder needs one subfolder per "
                        "class, or use a CSV/JSONL table with image paths and labels.")
    rows: list[tuple[str, str]] = []
    empty = []
    for cls in classes:
        files = list_image_files(cls)
        if not files:
            empty.append(cls.name)
        rows += [(str(f), cls.name) for f in files]
    if empty:
        raise DataError(f"{key}: class folder(s) {empty} in {folder} hold no image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder(s).")
    return rows


def to_rgb(image: Any) -> Any:
    """Any PIL image -> 8-bit RGB (see the module docstring for the rules)."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            top = arr.max() if arr.size else 0
            arr = arr / 257.0 if top > 255 else arr  # 16-bit PNGs often decode as "I"
        else:  # float: 0..1 images scale up, others clip
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def load_rgb(source: str | Path | bytes) -> Any:
    """An image file (path) or encoded image bytes (e.g. from a datasets Image column) as 8-bit RGB."""
    import io

    from PIL import Image

    if source is None:
        raise ValueError("no image")
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
        image.load()
        return to_rgb(image)


def check_images(paths: list[Any], names: list[str] | None = None) -> list[tuple[str, str]]:
    """``(name, reason)`` for every image (a path, or encoded bytes named by ``names``) that is missing or
    cannot be decoded."""
    bad = []
    for i, source in enumerate(paths):
        path = names[i] if names is not None else source
        try:
            load_rgb(source)
        except FileNotFoundError:
            bad.append((path, "file not found"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
            why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(encoded bytes)", str(exc))
            bad.append((path, f"{type(exc).__name__}: {why[:120]}"))
    return bad
