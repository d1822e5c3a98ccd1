"""Built-in datasets exported from PyPI packages into an image folder on first use (in the cache)."""

from __future__ import annotations

from pathlib import Path

from finetune import cached_folder


def export_source(name: str) -> Path:
    """The class-per-subfolder image folder of a built-in source, exported once (atomically)."""
    if name == "sklearn-digits":
        import importlib.metadata

        version = importlib.metadata.version("scikit-learn")
        return cached_folder(f"datasets/sklearn-digits-{version}", _export_digits)
    raise ValueError(name)


def _export_digits(out: Path) -> None:
    """scikit-learn's digits (1,797 8x8 images with 17 grey levels, 0..16) as 8-bit greyscale PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = out / str(int(target))
        folder.mkdir(exist_ok=True)
        pixels = np.rint(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"digit_{i:04d}.png")
    (out / "README.txt").write_text(
        "scikit-learn's load_digits() (UCI ML hand-written digits, 1,797 images, 10 classes; BSD-3-Clause "
        "scikit-learn package), exported by finetune_vision.sources as 8x8 greyscale PNGs (values x 255/16).\n")
