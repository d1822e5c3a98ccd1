"""``semantic-segmentation``: a class for every pixel, from image folders paired with mask PNGs.

Model: a timm CNN backbone's multi-scale features (``features_only=True``, pretrained weights from the offline
zoo) and a light torchvision decoder (FPN or LR-ASPP; ``finetune_vision.segmentation_model``). LoRA adapts the
backbone's non-depthwise convolutions; the decoder is trained in full (``modules_to_save``). As for image
classification, frozen BatchNorm layers stay in eval mode (and are folded into their convolutions with
``task.fold_batchnorm``), so a reloaded adapter reproduces the trained model exactly.

Data (``finetune_vision.segmentation_data``): ``data.images`` + ``data.masks`` (or ``data.train``, a folder with
``images/`` and ``masks/``), class-index or palette PNG masks, checked before anything is written. Metrics
(``finetune_vision.segmentation_masks``): mean IoU (selects the checkpoint), per-class IoU and pixel accuracy,
from confusion counts at each mask's own resolution (logits are upsampled to it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, DataOptions, DataSplits, PathStr, RecipeError, Task, TaskOptions, split_frame
from finetune_vision.batchnorm_fold import FrozenBatchNormTask
from finetune_vision.images import ImagePredictInput, load_rgb


class SegmentationData(DataOptions):
    source_keys = ("images", "train")

    images: PathStr | None = Field(None, description="Folder of training images (searched recursively). Each has a "
                                   "mask in `masks` with the same file name without extension (a.jpg with a.png).")
    masks: PathStr | None = Field(None, description="Folder of training masks: PNGs whose pixel values are class "
                                  "indices (single-channel or palette mode; an RGB mask must be greyscale), the "
                                  "same size as their images.")
    train: PathStr | None = Field(None, description="Instead of `images`/`masks`: a folder holding `images/` and "
                                  "`masks/`.")
    eval: PathStr | None = Field(None, description="Eval folder holding `images/` and `masks/` (or give "
                                 "`eval_images` and `eval_masks`); if absent, `split` of the training pairs is held "
                                 "out (seeded by train.seed).")
    eval_images: PathStr | None = Field(None, description="Folder of eval images (with `eval_masks`).")
    eval_masks: PathStr | None = Field(None, description="Folder of eval masks (with `eval_images`).")
    test: PathStr | None = Field(None, description="Test folder holding `images/` and `masks/`: scored once at the "
                                 "end with the selected adapter (test.* in metrics.json).")
    classes: list[str] | None = Field(None, description="Class names: class i is pixel value i (e.g. [\"background\", "
                                      "\"nucleus\"]). Unset (and no `classes_file`): the names are the values "
                                      "\"0\" .. the highest value found in the training masks.")
    classes_file: PathStr | None = Field(None, description="A text file with one class name a line (line i: pixel "
                                         "value i), instead of `classes`.")
    ignore_index: int = Field(255, ge=0, description="Mask value of pixels that are neither learned nor scored "
                                                     "(unlabelled, object borders).")
    image_column: str = Field("image", description="Column of image paths in a `finetune predict --input` table.")
    image_size: int | None = Field(None, gt=0, le=2048, description="Images (and masks, nearest) are resized to "
                                   "this square side for training; default: the backbone's pretrained input size. "
                                   "Metrics and predictions are at each image's own size.")
    hflip: bool = Field(False, description="Training augmentation: random horizontal flip (image and mask).")
    vflip: bool = Field(False, description="Training augmentation: random vertical flip (image and mask).")
    random_resized_crop: bool = Field(False, description="Training augmentation: a random resized crop of image and "
                                      "mask (the mask resized with nearest neighbour).")
    crop_scale_min: float = Field(0.35, gt=0, le=1, description="Smallest area fraction of a random resized crop.")


class SegmentationOptions(TaskOptions):
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random': the same network with a randomly initialised backbone (the "
                                  "from-scratch baseline; use with peft.method = 'full').")
    decoder: Literal["fpn", "lraspp"] = Field(
        "fpn", description="'fpn': torchvision's FeaturePyramidNetwork over the stride 4-32 features + a small "
                           "head; 'lraspp': torchvision's LR-ASPP head on the stride 8 and 32 features.")
    dice_weight: float = Field(0.0, ge=0, description="Weight of a soft Dice loss added to the cross-entropy (0: "
                                                      "cross-entropy only).")
    fold_batchnorm: bool = Field(
        True, description="With LoRA or peft.method = 'none', compute each frozen BatchNorm folded into the "
                          "frozen convolution before it (faster on CPU; float rounding differs). The adapter is "
                          "unchanged.")


class SemanticSegmentation(ImagePredictInput, FrozenBatchNormTask, Task):
    name = "semantic-segmentation"
    description = "Label every pixel of an image (timm backbone + FPN / LR-ASPP decoder; mask PNGs)."
    task_options = SegmentationOptions
    data_options = SegmentationData
    default_metric = "mean_iou"
    metric_names = ("mean_iou", "pixel_accuracy")
    pipeline_tag = "image-segmentation"
    library_name = "peft"
    prediction_fields = {
        "pred_masks": "per class present: its pixels as COCO RLE ({\"size\": [height, width], \"counts\": text}; "
                      "pycocotools.mask.decode with counts encoded to bytes)",
        "pred_fractions": "per class: the fraction of the image's pixels predicted as that class",
        "pred_size": "[height, width] of the mask (the image's own size)",
        "pred_error": "why the image could not be read (only then)",
    }

    # -- data ----------------------------------------------------------
    def _folders(self, folder: str | None, images: str | None, masks: str | None, key: str,
                 images_key: str, masks_key: str) -> tuple[Path, Path, str, str] | None:
        if folder:
            root = Path(folder)
            if not root.is_dir():
                raise DataError(f"{key}: folder not found: {root}. Give a folder holding images/ and masks/.")
            missing = [n for n in ("images", "masks") if not (root / n).is_dir()]
            if missing:
                raise DataError(f"{key}: {root} has no {' and no '.join(m + '/' for m in missing)} folder; a "
                                "segmentation data folder holds images/ and masks/ (same file names).")
            return root / "images", root / "masks", f"{key} (images/)", f"{key} (masks/)"
        if images or masks:
            if not (images and masks):
                given, other = (images_key, masks_key) if images else (masks_key, images_key)
                raise RecipeError(f"{given} is set without {other}; give both folders.")
            return Path(images), Path(masks), images_key, masks_key
        return None

    def _read_pairs(self, found: tuple[Path, Path, str, str]) -> Any:
        import pandas as pd

        from finetune_vision.segmentation_data import pair_folders

        images, masks, key, masks_key = found
        return pd.DataFrame(pair_folders(images, masks, key, masks_key), columns=["image", "mask"])

    def _class_names(self) -> list[str] | None:
        data = self.recipe.data
        if data.classes and data.classes_file:
            raise RecipeError("data.classes and data.classes_file are both set; keep one.")
        if data.classes_file:
            path = Path(data.classes_file)
            if not path.is_file():
                raise DataError(f"data.classes_file: file not found: {path}.")
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            key = "data.classes_file"
        elif data.classes:
            names, key = list(data.classes), "data.classes"
        else:
            return None
        if len(names) < 2:
            raise DataError(f"{key}: {len(names)} class(es); segmentation needs at least two (e.g. background and "
                            "the object).")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"{key}: class names {dupes} appear more than once.")
        if data.ignore_index < len(names):
            raise DataError(f"data.ignore_index = {data.ignore_index} is a class value ({names[data.ignore_index]!r}); "
                            "set it to a value no class uses (default 255).")
        return names

    def prepare_data(self) -> DataSplits:
        from finetune_vision.segmentation_data import check_pairs

        data = self.recipe.data
        if data.dataset:
            raise RecipeError("data.dataset: semantic-segmentation reads image and mask folders (data.images and "
                              "data.masks, or data.train with images/ and masks/); it does not read datasets sources.")
        if data.group_column:
            raise RecipeError("data.group_column: semantic-segmentation has no table columns to group by; remove it.")
        found = self._folders(data.train, data.images, data.masks, "data.train", "data.images", "data.masks")
        train = self._read_pairs(found)
        seed = self.recipe.train.seed
        test = None
        if data.test_split:
            train, test = split_frame(train, data.test_split, seed, key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=seed).reset_index(drop=True)
        eval_found = self._folders(data.eval, data.eval_images, data.eval_masks, "data.eval", "data.eval_images",
                                   "data.eval_masks")
        if eval_found is not None:
            eval_ = self._read_pairs(eval_found)
        else:
            if len(train) < 2:
                raise DataError(f"{found[2]}: {len(train)} image(s); holding out data.split for evaluation needs at "
                                "least two (or give data.eval).")
            train, eval_ = split_frame(train, data.split, seed)
        names = self._class_names()
        counts = check_pairs(train.to_dict("records"), found[2], len(names) if names else None, data.ignore_index)
        if names is None:
            names = [str(i) for i in range(max(len(counts), 2))]
            if len(counts) < 2:
                print(f"warning: {found[2]}: the training masks hold class 0 only; assuming classes 0 and 1 (set "
                      "data.classes)", file=sys.stderr)
        eval_key = eval_found[2] if eval_found is not None else "data.split (eval)"
        check_pairs(eval_.to_dict("records"), eval_key, len(names), data.ignore_index)
        self.state = {"classes": names, "ignore_index": data.ignore_index}
        if data.test:
            test = self.read_examples(Path(data.test), "data.test")
        elif test is not None:
            check_pairs(test.to_dict("records"), "data.test_split", len(names), data.ignore_index)
        pixels = {name: int(counts[i]) if i < len(counts) else 0 for i, name in enumerate(names)}
        info = {"train_examples": len(train), "eval_examples": len(eval_),
                **({"test_examples": len(test)} if test is not None else {}), "classes": names,
                "train_class_pixels": pixels, "train_from": str(found[0])}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled pairs (data.test, ``finetune evaluate --input``): a folder holding images/ and masks/."""
        from finetune_vision.segmentation_data import check_pairs

        pairs = self._read_pairs(self._folders(str(path), None, None, key, key, key))
        check_pairs(pairs.to_dict("records"), key, len(self.state["classes"]), self.state["ignore_index"])
        return pairs

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        from finetune_vision.segmentation_data import SegmentationDataset, SegmentationTransform

        transform = SegmentationTransform(self.state["preprocess"], training, self.recipe.data)
        return SegmentationDataset(examples.to_dict("records"), transform, keep_target=not training)

    def collate_fn(self, processor: Any):
        from finetune_vision.segmentation_data import collate

        return collate

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        import torch

        torch.set_flush_denormal(True)  # frozen random-init BatchNorm statistics make subnormal floats (slow)
        from finetune_vision.segmentation_model import load_segmentation_model

        task = self.recipe.task
        model, facts = load_segmentation_model(backbone, len(self.state["classes"]), task.init, task.decoder,
                                               self.recipe.data.image_size)
        self.state.update(facts)
        return model, None

    def lora_targets(self, model: Any) -> list[str]:
        import torch.nn as nn

        convs = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == 1 and n.startswith("backbone.")]
        if not convs:
            raise RecipeError("peft.target_modules: found no (non-depthwise) Conv2d layer in the backbone; set "
                              "peft.target_modules to module names of this model.")
        return convs

    def modules_to_save(self, model: Any) -> list[str]:
        return ["decoder"]

    def _logits(self, model: Any, pixel_values: Any) -> Any:
        import torch

        if getattr(model, "_finetune_batchnorm_folded", None) is None and self._folds_batchnorm():
            model._finetune_batchnorm_folded = 0  # set first: the fold's own forward passes come back here
            from finetune_vision.batchnorm_fold import fold_batchnorm

            probe = pixel_values[:2]
            folded, found = fold_batchnorm(model, lambda: self._logits(model, probe))
            model._finetune_batchnorm_folded = folded
            if found and not folded:
                print(f"warning: task.fold_batchnorm: the folded model's output differs from the unfolded one, so "
                      f"its {found} BatchNorm layers are computed separately", file=sys.stderr)
        # oneDNN convolutions run faster on channels-last input on CPU (measured: docs/design.md)
        return model(pixel_values.contiguous(memory_format=torch.channels_last)).float()

    def _loss(self, logits: Any, labels: Any) -> Any:
        import torch.nn.functional as F

        ignore = self.state["ignore_index"]
        valid = labels != ignore
        count = valid.sum()
        loss = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="sum") / count.clamp_min(1)
        weight = self.recipe.task.dice_weight
        if weight:
            probs = logits.softmax(1) * valid[:, None]
            onehot = F.one_hot(labels.where(valid, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid[:, None]
            inter = (probs * onehot).sum((0, 2, 3))
            sizes = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
            loss = loss + weight * (1 - ((2 * inter + 1) / (sizes + 1)).mean())
        return loss

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return self._loss(self._logits(model, batch["pixel_values"]), batch["labels"])

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from finetune_vision.segmentation_masks import confusion

        logits = self._logits(model, batch["pixel_values"])
        n = len(self.state["classes"])
        matrices = []
        for i, target in enumerate(batch["target"]):
            target = target.to(logits.device)
            pred = F.interpolate(logits[i:i + 1], size=target.shape, mode="bilinear", align_corners=False).argmax(1)[0]
            matrices.append(confusion(pred, target, n, self.state["ignore_index"]))
        matrices = torch.stack(matrices)
        return {"loss": self._loss(logits, batch["labels"]), "predictions": matrices,
                "references": matrices.sum((1, 2))}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        from finetune_vision.segmentation_masks import metrics_from_confusion

        return metrics_from_confusion(predictions.sum(0), self.state["classes"])

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        from finetune_vision.segmentation_data import SegmentationTransform
        from finetune_vision.segmentation_masks import encode_masks

        classes = self.state["classes"]
        column = self.recipe.data.image_column
        transform = SegmentationTransform(self.state["preprocess"], False, None)
        device = next(model.parameters()).device
        rows: list[dict[str, Any]] = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            out: list[dict[str, Any]] = [{} for _ in chunk]
            tensors, sizes, ok = [], [], []
            for position, record in enumerate(chunk):
                try:
                    image = load_rgb(record[column])
                except Exception as exc:  # noqa: BLE001 - one bad file must not lose the others
                    out[position] = {**record, "pred_masks": None, "pred_fractions": None, "pred_size": None,
                                     "pred_error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                    continue
                tensors.append(transform(image)[0])
                sizes.append(image.size[::-1])
                ok.append(position)
            if tensors:
                logits = self._logits(model, torch.stack(tensors).to(device))
                for j, position in enumerate(ok):
                    mask = F.interpolate(logits[j:j + 1], size=sizes[j], mode="bilinear",
                                         align_corners=False).argmax(1)[0].cpu().numpy()
                    rles, fractions = encode_masks(mask, classes)
                    out[position] = {**chunk[position], "pred_masks": rles, "pred_fractions": fractions,
                                     "pred_size": [int(sizes[j][0]), int(sizes[j][1])]}
            rows += out
        return rows

    def draw_predictions(self, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
        """``<image>_mask.png`` (palette PNG of class indices) and ``<image>_overlay.png`` per predicted image."""
        from finetune_vision.segmentation_masks import draw

        return draw(rows, Path(folder), self.recipe.data.image_column, self.state["classes"])

    def usage_snippet(self, base: str) -> str:
        from finetune_vision.segmentation_model import usage_snippet

        return usage_snippet(self.state, base, self.recipe.peft.method)
