"""Semantic segmentation data: image folders paired with mask PNGs, checked before anything is written.

A mask is a class-index image of the same size as its image: pixel value ``i`` is class ``i`` of the class
list, ``ignore_index`` (default 255) marks pixels that are neither learned nor scored. Palette PNGs (mode
``P``, the Pascal VOC convention) are read by their indices, not their colours; greyscale (``L``, ``I;16``,
``I``, 1-bit) by their values; an RGB(A) mask is accepted only when its three channels are equal (a
greyscale index image saved as RGB). Images and masks pair by file stem (``a.jpg`` with ``a.png``), searched
recursively so sub-folders may mirror each other.

The joint transforms (torchvision.transforms.v2 with a ``tv_tensors.Mask``) move the mask with the image:
a flip flips both, a random resized crop crops both at the same place and resizes the mask with nearest
neighbour interpolation (class indices are never blended).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune import DataError
from finetune_vision.images import IMAGE_EXTENSIONS, list_image_files, load_rgb

MASK_EXTENSIONS = {".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".pbm", ".ppm", ".webp"}
CONVERT_HINT = ("convert it to a class-index PNG (each pixel holds its class number) or a palette PNG, e.g. "
                "`Image.fromarray(index_array.astype('uint8'), 'L').save(path)` with index_array[y, x] = the class "
                "of that pixel (for a colour-coded mask: one index per colour)")


def read_mask(path: str | Path) -> Any:
    """A mask file as a 2-D numpy array of class indices (int64); ``ValueError`` explaining what is wrong for
    a mask that is not a class-index image (colour RGB, several channels that differ)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("P", "L", "1"):  # palette: the indices, not the colours; 1-bit: 0 and 1
            arr = np.asarray(image).astype(np.int64)
        elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            arr = np.asarray(image).astype(np.int64)
        elif mode in ("RGB", "RGBA", "LA", "PA"):
            channels = np.asarray(image.convert("RGB") if mode != "LA" else image.getchannel(0).convert("RGB"))
            if not (np.array_equal(channels[..., 0], channels[..., 1])
                    and np.array_equal(channels[..., 0], channels[..., 2])):
                colours = np.unique(channels.reshape(-1, 3), axis=0)
                shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:5])
                raise ValueError(f"an {mode} mask with colours ({len(colours)} distinct, e.g. {shown}) is not a "
                                 f"class-index mask; {CONVERT_HINT}")
            arr = channels[..., 0].astype(np.int64)
        else:
            raise ValueError(f"mask mode {mode!r} is not a class-index image; {CONVERT_HINT}")
    if arr.ndim != 2:
        raise ValueError(f"mask has shape {arr.shape}, expected height x width; {CONVERT_HINT}")
    return arr


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file after EXIF orientation (as it is trained on)."""
    return load_rgb(path).size


def _by_stem(files: list[Path], root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        key = str(f.relative_to(root).with_suffix(""))
        out.setdefault(key, f)
    return out


def pair_folders(images: Path, masks: Path, key: str, masks_key: str) -> list[dict[str, str]]:
    """``[{"image": path, "mask": path}]`` pairing ``images`` and ``masks`` by relative path without
    extension; images without a mask and masks without an image are errors naming them."""
    for folder, k in ((images, key), (masks, masks_key)):
        if not folder.is_dir():
            raise DataError(f"{k}: folder not found: {folder}. Give a folder of {'images' if k == key else 'masks'} "
                            "(relative paths resolve against the recipe's folder).")
    image_files = list_image_files(images)
    mask_files = [p for p in list_image_files(masks) if p.suffix.lower() in MASK_EXTENSIONS]
    if masks.resolve() == images.resolve():
        raise DataError(f"{masks_key}: is the same folder as {key} ({images}); keep masks in their own folder.")
    if not image_files:
        raise DataError(f"{key}: {images} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if not mask_files:
        raise DataError(f"{masks_key}: {masks} holds no mask files ({', '.join(sorted(MASK_EXTENSIONS))}).")
    by_image, by_mask = _by_stem(image_files, images), _by_stem(mask_files, masks)
    lonely_images = sorted(set(by_image) - set(by_mask))
    lonely_masks = sorted(set(by_mask) - set(by_image))
    problems = []
    if lonely_images:
        problems.append(f"{len(lonely_images)} image(s) in {images} have no mask in {masks} (e.g. "
                        f"{', '.join(str(by_image[s].name) for s in lonely_images[:5])})")
    if lonely_masks:
        problems.append(f"{len(lonely_masks)} mask(s) in {masks} have no image in {images} (e.g. "
                        f"{', '.join(str(by_mask[s].name) for s in lonely_masks[:5])})")
    if problems:
        raise DataError(f"{key} / {masks_key}: " + "; ".join(problems) + ". An image and its mask share the file "
                        "name without extension (img_01.jpg with img_01.png); add the missing files or remove the "
                        "unpaired ones.")
    return [{"image": str(by_image[s]), "mask": str(by_mask[s])} for s in sorted(by_image)]


def check_pairs(pairs: list[dict[str, str]], key: str, num_classes: int | None, ignore_index: int) -> Any:
    """Read every pair once: unreadable files, size mismatches, values outside the class list. Returns the
    per-class pixel counts (numpy, length = highest class value + 1 when ``num_classes`` is None)."""
    import numpy as np

    counts = np.zeros(max(num_classes or 0, 1), dtype=np.int64)
    unreadable, mismatched, unknown = [], [], []
    for pair in pairs:
        try:
            size = image_size(pair["image"])
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
            unreadable.append(f"{pair['image']} ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        try:
            mask = read_mask(pair["mask"])
        except ValueError as exc:
            if "class-index" in str(exc):
                raise DataError(f"{key}: mask {pair['mask']}: {exc}.") from None
            unreadable.append(f"{pair['mask']} (ValueError: {str(exc)[:100]})")
            continue
        except Exception as exc:  # noqa: BLE001
            unreadable.append(f"{pair['mask']} ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        if (mask.shape[1], mask.shape[0]) != tuple(size):
            mismatched.append(f"{pair['mask']} is {mask.shape[1]}x{mask.shape[0]} but its image {pair['image']} is "
                              f"{size[0]}x{size[1]}")
            continue
        values = mask[mask != ignore_index]
        if values.size and values.min() < 0:
            unknown.append((pair["mask"], sorted(int(v) for v in np.unique(values[values < 0]))))
            continue
        found = np.bincount(values.ravel(), minlength=len(counts)) if values.size else np.zeros(len(counts), np.int64)
        if num_classes is not None and len(found) > num_classes:
            bad = [int(v) for v in np.nonzero(found[num_classes:])[0] + num_classes]
            unknown.append((pair["mask"], bad))
            continue
        if len(found) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(found) - len(counts), np.int64)])
        counts[:len(found)] += found
    if unreadable:
        raise DataError(f"{key}: {len(unreadable)} file(s) are missing or unreadable: "
                        + "; ".join(unreadable[:8]) + (" ..." if len(unreadable) > 8 else "")
                        + ". Fix or remove them (with their image or mask).")
    if mismatched:
        raise DataError(f"{key}: {len(mismatched)} mask(s) differ in size from their image: "
                        + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
                        + ". A mask must have its image's width and height (pixel for pixel).")
    if unknown:
        shown = "; ".join(f"{m} has value(s) {v[:8]}" for m, v in unknown[:5])
        raise DataError(f"{key}: {len(unknown)} mask(s) hold values outside the class list (0..{(num_classes or 1) - 1}"
                        f", and data.ignore_index = {ignore_index}): {shown}"
                        + (" ..." if len(unknown) > 5 else "")
                        + ". Add the missing classes to data.classes, or set data.ignore_index to the value that marks "
                          "unlabelled pixels.")
    return counts


class SegmentationTransform:
    """Joint image + mask transform (torchvision.transforms.v2): resize to a square ``size`` (training: with
    an optional random resized crop and flips), then to a normalised float tensor; the mask stays int64."""

    def __init__(self, preprocess: dict[str, Any], training: bool, options: Any) -> None:
        import torch
        from torchvision.transforms import v2 as T

        size = int(preprocess["input_size"])
        interp = T.InterpolationMode(preprocess["interpolation"]) if preprocess["interpolation"] in (
            "nearest", "bilinear", "bicubic") else T.InterpolationMode.BILINEAR
        steps: list[Any] = [T.ToImage()]
        if training and options is not None and options.random_resized_crop:
            steps.append(T.RandomResizedCrop(size, scale=(options.crop_scale_min, 1.0), interpolation=interp,
                                             antialias=True))
        else:
            steps.append(T.Resize((size, size), interpolation=interp, antialias=True))
        if training and options is not None:
            if options.hflip:
                steps.append(T.RandomHorizontalFlip())
            if options.vflip:
                steps.append(T.RandomVerticalFlip())
        steps += [T.ToDtype({"others": None, _image_type(): torch.float32}, scale=True),
                  T.Normalize(preprocess["mean"], preprocess["std"])]
        self.transform = T.Compose(steps)

    def __call__(self, image: Any, mask: Any = None) -> tuple[Any, Any]:
        import torch
        from torchvision import tv_tensors

        if mask is None:
            return self.transform(image), None
        out_image, out_mask = self.transform(image, tv_tensors.Mask(torch.as_tensor(mask, dtype=torch.int64)))
        return out_image, out_mask.as_subclass(torch.Tensor)


def _image_type() -> Any:
    from torchvision import tv_tensors

    return tv_tensors.Image


class SegmentationDataset:
    """Items: ``pixel_values`` (3 x S x S), ``labels`` (S x S, the mask at the input size, nearest) and, for
    evaluation, ``target`` (the mask at its own size, where metrics are computed)."""

    def __init__(self, pairs: list[dict[str, str]], transform: SegmentationTransform, keep_target: bool) -> None:
        self.pairs, self.transform, self.keep_target = pairs, transform, keep_target

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        pair = self.pairs[i]
        try:
            image, mask = load_rgb(pair["image"]), read_mask(pair["mask"])
        except Exception as exc:  # noqa: BLE001 - checked in prepare_data; changed on disk since
            raise DataError(f"{pair['image']} / {pair['mask']} became unreadable during training "
                            f"({type(exc).__name__}: {exc}); fix it and resume with --resume.") from None
        pixels, labels = self.transform(image, mask)
        item = {"pixel_values": pixels, "labels": labels}
        if self.keep_target:
            item["target"] = torch.as_tensor(mask, dtype=torch.int64)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
             "labels": torch.stack([it["labels"] for it in items])}
    if "target" in items[0]:
        batch["target"] = [it["target"] for it in items]  # own sizes: metrics at the mask's resolution
    return batch
