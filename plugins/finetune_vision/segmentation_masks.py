"""Segmentation metrics from confusion counts, compact masks (COCO RLE) and prediction pictures.

Metrics: every evaluated example contributes a ``C x C`` confusion matrix (rows: reference class, columns:
predicted class; pixels marked ``ignore_index`` in the reference are left out), summed over the eval set:

* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` for each class ``c``;
* ``mean_iou``: the mean over the classes present in the reference or the prediction (``TP + FP + FN > 0``);
  a class absent from both has no IoU (``None`` in ``per_class_iou``) and is not averaged, as in
  torchmetrics' ``MeanIoU`` and mmsegmentation (it would otherwise count as 0 or 1 by convention);
* ``pixel_accuracy``: correctly classified pixels / scored pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Colours of the class-index palette PNGs and overlays (class 0 black: background in most data sets).
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]


def confusion(pred: Any, target: Any, num_classes: int, ignore_index: int) -> Any:
    """``C x C`` int64 confusion counts (torch) of one example: rows reference, columns prediction."""
    import torch

    keep = target != ignore_index
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index.reshape(-1), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(matrix: Any, classes: list[str]) -> dict[str, Any]:
    import numpy as np

    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(len(classes))]
    present = [v for v in iou if v is not None]
    total = matrix.sum()
    return {"mean_iou": float(np.mean(present)) if present else 0.0,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
            "per_class_iou": dict(zip(classes, iou)),
            "per_class_pixels": {c: int(matrix[i].sum()) for i, c in enumerate(classes)}}


def encode_masks(mask: Any, classes: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """A class-index mask (H x W numpy) -> ``({class: COCO RLE with counts as text}, {class: pixel fraction})``
    for each class present."""
    import numpy as np
    from pycocotools import mask as rle

    rles, fractions = {}, {}
    total = mask.size
    for i, name in enumerate(classes):
        binary = mask == i
        n = int(binary.sum())
        fractions[name] = n / total if total else 0.0
        if n:
            encoded = rle.encode(np.asfortranarray(binary.astype(np.uint8)))
            rles[name] = {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
    return rles, fractions


def decode_masks(rles: dict[str, Any], classes: list[str], size: tuple[int, int]) -> Any:
    """The class-index mask (H x W, uint8 numpy) back from :func:`encode_masks`' RLEs (pixels of no class: 0)."""
    import numpy as np
    from pycocotools import mask as rle

    out = np.zeros(size, dtype=np.uint8)
    for i, name in enumerate(classes):
        if name in rles:
            item = rles[name]
            out[rle.decode({"size": item["size"], "counts": item["counts"].encode("ascii")}).astype(bool)] = i
    return out


def palette_image(mask: Any) -> Any:
    """A class-index mask as a palette PNG image (mode P; the pixel values stay the class indices)."""
    from PIL import Image

    image = Image.fromarray(mask.astype("uint8"), "P")
    flat = [v for colour in PALETTE for v in colour]
    image.putpalette(flat + [255] * (768 - len(flat)))
    return image


def overlay(image: Any, mask: Any, alpha: float = 0.45) -> Any:
    """The RGB image with every non-zero class tinted in its palette colour."""
    import numpy as np
    from PIL import Image

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.array([PALETTE[i % len(PALETTE)] for i in range(int(mask.max()) + 1)], dtype=np.float32)
    tint = colours[mask]
    chosen = (mask > 0)[..., None]
    out = np.where(chosen, base * (1 - alpha) + tint * alpha, base)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def draw(rows: list[dict[str, Any]], folder: Path, column: str, classes: list[str]) -> list[Path]:
    """Per predicted row: ``<name>_mask.png`` (palette, class indices) and ``<name>_overlay.png``."""
    from finetune_vision.images import load_rgb

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for i, row in enumerate(rows):
        if not row.get("pred_masks") and row.get("pred_error"):
            continue
        stem = Path(str(row[column])).stem or f"image_{i}"
        if stem in used:
            stem = f"{stem}_{i}"
        used.add(stem)
        height, width = row["pred_size"][0], row["pred_size"][1]
        mask = decode_masks(row["pred_masks"], classes, (height, width))
        mask_path, overlay_path = folder / f"{stem}_mask.png", folder / f"{stem}_overlay.png"
        palette_image(mask).save(mask_path)
        overlay(load_rgb(row.get("source", row[column])), mask).save(overlay_path)
        written += [mask_path, overlay_path]
    return written
