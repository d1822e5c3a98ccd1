"""Fixtures of the semantic-segmentation tests: tiny images with bright discs and their class-index masks."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_disc_pairs(folder: Path, count: int = 12, size: int = 40, seed: int = 0, palette: bool = True,
                     classes: int = 2) -> Path:
    """``folder/images/img_i.jpg`` + ``folder/masks/img_i.png``: noisy dark images with one bright disc (class 1)
    and, with ``classes=3``, one bright green square (class 2); masks palette (``P``) or greyscale (``L``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        pixels = rng.integers(0, 60, size=(size, size, 3))
        mask = np.zeros((size, size), dtype=np.uint8)
        cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(4, 8)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        pixels[disc] = (230, 200, 200)
        mask[disc] = 1
        if classes == 3:
            y0, x0 = rng.integers(0, size - 8, size=2)
            pixels[y0:y0 + 7, x0:x0 + 7] = (40, 220, 40)
            mask[y0:y0 + 7, x0:x0 + 7] = 2
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(folder / "images" / f"img_{i:02d}.png")
        out = Image.fromarray(mask, "P" if palette else "L")
        if palette:
            out.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * (768 - 9))
        out.save(folder / "masks" / f"img_{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_seg_backbone(tmp_path_factory) -> Path:
    """timm's test_efficientnet (convs + BatchNorm, five feature levels), random weights."""
    from vision_fixtures import save_timm_folder

    return save_timm_folder(tmp_path_factory.mktemp("tiny-seg-backbone"), "test_efficientnet")


@pytest.fixture
def seg_recipe(tmp_path, tiny_seg_backbone):
    """Write a semantic-segmentation recipe; keyword sections are TOML lines merged into the defaults."""

    def _make(*, data: str = "", train: str = "", peft: str = "", task: str = "", name: str = "seg.toml",
              folder: Path | None = None, output: str | None = None) -> Path:
        import tomllib

        import tomli_w

        if folder is None:
            folder = tmp_path / "pairs"
            if not folder.exists():
                write_disc_pairs(folder)
        recipe = {
            "task": {"name": "semantic-segmentation"},
            "model": {"backbone": str(tiny_seg_backbone)},
            "data": {"train": str(folder), "split": 0.25, "image_size": 32, "classes": ["background", "disc"]},
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "mixed_precision": "no", "seed": 0},
            "output": {"dir": output if output is not None else str(tmp_path / "run")},
        }
        for section, text in (("data", data), ("train", train), ("peft", peft), ("task", task)):
            recipe[section].update(tomllib.loads(text))
        path = tmp_path / name
        path.write_text(tomli_w.dumps(recipe))
        return path

    return _make
