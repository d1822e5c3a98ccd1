"""``object-detection``: boxes and class labels with a timm backbone + torchvision FPN and FCOS/RetinaNet head.

Data: COCO JSON, YOLO txt folders or Pascal VOC XML, detected from the layout
(``finetune_vision.detection_data``). Each image is resized so that its longer side is
``data.image_size`` (boxes with it, torchvision.transforms.v2 + tv_tensors.BoundingBoxes); training
augmentations (flips, colour jitter) move the boxes with the image. Model: ``finetune_vision.detection_model``
(LoRA on the backbone's non-depthwise convolutions, the FPN and the head trained in full). Metrics: COCO
box mAP@[.5:.95] (``map``, selects the checkpoint), ``map50``, ``map75`` and per-class AP by pycocotools,
in the original images' pixels.

BatchNorm: as in image-classification, with LoRA or ``peft.method = "none"`` the backbone's BatchNorm layers
stay in eval mode (frozen statistics, which the adapter does not save); with ``task.fold_batchnorm`` each
is computed folded into the convolution before it (``finetune_vision.batchnorm_fold``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, DataOptions, DataSplits, PathStr, RecipeError, Task, TaskOptions
from finetune_vision.batchnorm_fold import FrozenBatchNormTask
from finetune_vision.images import ImagePredictInput, load_rgb


class DetectionData(DataOptions):
    train: PathStr | None = Field(
        None, description="Training images with boxes: a COCO annotations .json (images under `images`, else beside "
                          "it), a Pascal VOC folder (Annotations/ + JPEGImages/) or one of its ImageSets/Main/*.txt "
                          "image lists, or a YOLO folder (images/ + labels/, `class cx cy w h` lines; class names from "
                          "data.yaml, classes.txt or `classes`). The layout is detected from the path.")
    eval: PathStr | None = Field(None, description="Eval images with boxes, in any layout `train` takes (e.g. "
                                 "bccd/ImageSets/Main/val.txt); if absent, `split` of the training images is held "
                                 "out (seeded by train.seed).")
    test: PathStr | None = Field(None, description="Test images with boxes, in any layout `train` takes: scored once "
                                 "at the end with the selected adapter.")
    images: PathStr | None = Field(None, description="COCO only: the folder the json's file_name entries are "
                                   "relative to (default: the json's folder).")
    classes: list[str] | None = Field(None, description="Class names in class-id order: required order for YOLO "
                                      "without data.yaml/classes.txt, optional for VOC (default: the names found, "
                                      "sorted); COCO takes its categories (ordered by id).")
    image_column: str = Field("image", description="Column of image paths in a `finetune predict --input` table.")
    image_size: int = Field(320, ge=32, le=2048, description="Longer image side in pixels that images are resized "
                            "to (aspect ratio kept, boxes moved with them); predictions come back in the original "
                            "image's pixels.")
    hflip: bool = Field(True, description="Training augmentation: random horizontal flip (boxes flipped too).")
    vflip: bool = Field(False, description="Training augmentation: random vertical flip (for top-down images such "
                        "as microscopy or aerial photos).")
    color_jitter: float = Field(0.0, ge=0, le=1, description="Training augmentation: random brightness, contrast "
                                "and saturation change up to this fraction (0: off).")


class DetectionOptions(TaskOptions):
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random': the same detector with a randomly initialised backbone (the "
                                  "from-scratch baseline; its initialisation is seeded, so a LoRA run reloads).")
    head: Literal["fcos", "retinanet"] = Field(
        "fcos", description="torchvision detection head: 'fcos' (anchor-free) or 'retinanet' (9 anchors per "
                            "position); both one-stage, on FPN levels P3..P7.")
    fpn_channels: int = Field(64, ge=64, le=512, multiple_of=32, description="Channels of the feature pyramid "
                              "and the head's convolutions: a multiple of 32, at least 64 (FCOS's GroupNorm has 32 "
                              "groups and needs two values per group on a 1x1 top level); torchvision's COCO models "
                              "use 256, smaller is much faster on CPU.")
    head_convs: int = Field(2, ge=1, le=8, description="FCOS only: convolutions in each head branch (torchvision's "
                            "default 4).")
    score_threshold: float = Field(0.3, ge=0, le=1, description="`finetune predict`: boxes scoring below this are "
                                   "dropped (metrics use every box scoring at least 0.05, as COCO evaluation does).")
    fold_batchnorm: bool = Field(
        True, description="With LoRA or peft.method = 'none', compute each frozen BatchNorm of the backbone folded "
                          "into the convolution before it (faster; float rounding differs). The adapter is unchanged.")


class ObjectDetection(ImagePredictInput, FrozenBatchNormTask, Task):
    name = "object-detection"
    description = "Detect objects (boxes + classes) with a timm backbone, FPN and FCOS/RetinaNet head."
    task_options = DetectionOptions
    data_options = DetectionData
    default_metric = "map"
    metric_names = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100", "detections",
                    "reference_boxes")
    pipeline_tag = "object-detection"
    library_name = "peft"
    prediction_fields = {
        "pred_boxes": "boxes [[x1, y1, x2, y2], ...] in the original image's pixels, best first",
        "pred_labels": "the class of each box",
        "pred_scores": "the score of each box (those below task.score_threshold are dropped)",
        "pred_error": "why the image could not be read (only then)",
    }

    # -- data ----------------------------------------------------------
    def _read(self, location: str, key: str, classes: list[str] | None):
        from finetune_vision.detection_data import read_detection

        data = self.recipe.data
        # YOLO label files hold class ids: without a class list of their own, they take the training classes
        found = read_detection(location, key, images=data.images, classes=data.classes, yolo_classes=classes)
        if classes is not None:
            unknown = sorted({label for e in found.examples for label in e.labels} - set(classes))
            if unknown:
                raise DataError(f"{key}: {found.source}: classes {unknown} never appear in the training data "
                                f"(training classes: {classes}); add training boxes for them or drop them.")
        return found

    def prepare_data(self) -> DataSplits:
        from finetune_vision.detection_data import split_examples

        data, seed = self.recipe.data, self.recipe.train.seed
        if data.dataset:
            raise RecipeError("data.dataset: object-detection reads COCO, YOLO or Pascal VOC files; set data.train "
                              "to one of them instead.")
        train_data = self._read(data.train, "data.train", None)
        classes = train_data.classes
        if not classes:
            raise DataError(f"data.train: {train_data.source} has no labelled boxes and no class list; detection "
                            "needs at least one class.")
        train, test = train_data.examples, None
        if data.test_split:
            train, test = split_examples(train, data.test_split, seed)
        if data.limit and data.limit < len(train):
            import random

            train = random.Random(seed).sample(train, data.limit)
        if data.eval:
            eval_ = self._read(data.eval, "data.eval", classes).examples
        else:
            if len(train) < 2:
                raise DataError(f"data.train: {train_data.source} holds {len(train)} image(s); give data.eval or "
                                "more images to hold some out.")
            train, eval_ = split_examples(train, data.split, seed)
        if data.test:
            test = self.read_examples(Path(data.test), "data.test", classes)
        if not eval_:
            raise DataError("data.eval: no eval images.")
        self.state = {"classes": list(classes)}

        def count(examples: list[Any]) -> dict[str, int]:
            out = dict.fromkeys(classes, 0)
            for e in examples:
                for label in e.labels:
                    out[label] += 1
            return out

        info = {"layout": train_data.layout, "classes": classes, "train_examples": len(train),
                "eval_examples": len(eval_), **({"test_examples": len(test)} if test is not None else {}),
                "train_boxes": count(train), "eval_boxes": count(eval_),
                "train_images_without_boxes": sum(not e.boxes for e in train), "train_from": train_data.source}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def read_examples(self, path: Path, key: str, classes: list[str] | None = None) -> Any:
        examples = self._read(str(path), key, classes or self.state["classes"]).examples
        if not examples:
            raise DataError(f"{key}: no images in {path}.")
        return examples

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        return DetectionDataset(examples, self.state["classes"], self.recipe.data, training)

    def collate_fn(self, processor: Any):
        return collate

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        import torch

        torch.set_flush_denormal(True)  # frozen random-init BatchNorm statistics make subnormal floats (slow)
        from finetune_vision.detection_model import build_detector, load_body_weights
        from finetune_vision.models import _read_config
        from finetune_vision.zoo import IMAGENET_MEAN, IMAGENET_STD, TIMM_ARCH_PREFIX

        task, data = self.recipe.task, self.recipe.data
        if backbone.path.startswith(TIMM_ARCH_PREFIX):
            arch, folder, config = backbone.path[len(TIMM_ARCH_PREFIX):], None, {}
        else:
            folder = Path(backbone.path)
            config = _read_config(folder)
            if "architecture" not in config or "model_type" in config:
                raise RecipeError(f"model.backbone: object-detection builds on timm backbones (multi-scale "
                                  f"features); {backbone.name!r} is a transformers model. Use e.g. "
                                  "mobilenetv2_100.tv_in1k or tf_efficientnet_lite0.mli_in1k.")
            arch = config["architecture"]
        if task.init == "pretrained" and folder is None:
            from finetune_vision.zoo import known_names

            raise RecipeError(f"model.backbone: no pretrained weights for {backbone.name!r} are available offline; "
                              f"offline backbones: {', '.join(known_names())}; or set task.init = \"random\".")
        cfg = config.get("pretrained_cfg") or {}
        mean = [float(v) for v in cfg.get("mean", IMAGENET_MEAN)]
        std = [float(v) for v in cfg.get("std", IMAGENET_STD)]
        classes = self.state["classes"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random initialisation at training and prediction time
            model = build_detector(arch, len(classes), head=task.head, fpn_channels=task.fpn_channels,
                                   head_convs=task.head_convs, image_size=data.image_size, mean=mean, std=std)
        if task.init == "pretrained":
            load_body_weights(model.backbone.body, folder)
        model.backbone.channels_last = True
        self.state.update({"architecture": arch, "head": task.head, "fpn_channels": task.fpn_channels,
                           "head_convs": task.head_convs, "image_size": data.image_size, "mean": mean, "std": std,
                           "init": task.init})
        return model, None

    def lora_targets(self, model: Any) -> list[str]:
        import torch.nn as nn

        prefix, _ = self._names(model)
        convs = [n for n, m in model.named_modules()
                 if n.startswith(prefix + ".") and isinstance(m, nn.Conv2d) and m.groups == 1]
        if not convs:
            raise RecipeError("peft.target_modules: the backbone has no non-depthwise Conv2d; set "
                              "peft.target_modules to module names of this model.")
        return convs

    def modules_to_save(self, model: Any) -> list[str]:
        return self._names(model)[1]

    @staticmethod
    def _names(model: Any) -> tuple[str, list[str]]:
        from finetune_vision.detection_model import detector_module_names

        return detector_module_names(model)

    def _prepare(self, model: Any, images: list[Any]) -> None:
        """On a model's first batch: fold the backbone's frozen BatchNorms (task.fold_batchnorm)."""
        if getattr(model, "_finetune_batchnorm_folded", None) is not None or not self._folds_batchnorm():
            return
        import torch

        model._finetune_batchnorm_folded = 0
        from finetune_vision.batchnorm_fold import fold_batchnorm

        base = model
        while isinstance(getattr(base, "module", None), torch.nn.Module):  # DistributedDataParallel
            base = base.module
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        body = base.backbone.body
        probe = images[0][None]

        def run() -> Any:
            return torch.cat([f.flatten() for f in body(probe)])

        folded, found = fold_batchnorm(body, run)
        model._finetune_batchnorm_folded = folded
        if found and not folded:
            print(f"warning: task.fold_batchnorm: the folded backbone's output differs from the unfolded one, so "
                  f"its {found} BatchNorm layers are computed separately (slower, same results)", file=sys.stderr)

    # -- training and evaluation -----------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        images = _images(batch)
        self._prepare(model, images)
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
        losses = model(images, targets)
        for name, value in losses.items():
            self._logged.setdefault(name, []).append(float(value.detach()))
        return sum(losses.values())

    @property
    def _logged(self) -> dict[str, list[float]]:
        if not hasattr(self, "_loss_parts"):
            self._loss_parts: dict[str, list[float]] = {}
        return self._loss_parts

    def training_logs(self) -> dict[str, float]:
        out = {f"loss_{k}": sum(v) / len(v) for k, v in self._logged.items() if v}
        self._loss_parts = {}
        return out

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        images = _images(batch)
        self._prepare(model, images)
        found = model(images)
        predictions = []
        for out, factor in zip(found, batch["scale_xy"]):
            boxes = out["boxes"].float().cpu() / factor.cpu().float().repeat(2)
            predictions.append({"boxes": boxes.tolist(), "scores": out["scores"].float().cpu().tolist(),
                                "labels": out["labels"].cpu().tolist()})
        return {"predictions": predictions, "references": batch["references"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        from finetune_vision.detection_model import coco_metrics

        return coco_metrics(predictions, references, self.state["classes"])

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        classes = self.state["classes"]
        column = self.recipe.data.image_column
        threshold = self.recipe.task.score_threshold
        device = next(model.parameters()).device
        rows: list[dict[str, Any]] = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            out: list[dict[str, Any]] = [{} for _ in chunk]
            tensors, factors, ok = [], [], []
            for position, record in enumerate(chunk):
                try:
                    image = load_rgb(record[column])
                except Exception as exc:  # noqa: BLE001 - one bad file must not lose the others
                    out[position] = {**record, "pred_boxes": [], "pred_labels": [], "pred_scores": [],
                                     "pred_error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                    continue
                tensor, factor = resize_for_model(image, self.state["image_size"])
                tensors.append(tensor.to(device))
                factors.append(factor)
                ok.append(position)
            if tensors:
                self._prepare(model, tensors)
                found = model(tensors)
                for position, result, (fx, fy) in zip(ok, found, factors):
                    boxes = result["boxes"].float().cpu() / torch.tensor([fx, fy, fx, fy])
                    shown = [[round(float(v), 1) for v in box] for box in boxes]
                    # boxes at or above the threshold that still have an area at 0.1 px (a box clipped at the
                    # image border can shrink to a line)
                    keep = [i for i, (box, score) in enumerate(zip(shown, result["scores"].tolist()))
                            if score >= threshold and box[2] > box[0] and box[3] > box[1]]
                    out[position] = {
                        **chunk[position],
                        "pred_boxes": [shown[i] for i in keep],
                        "pred_labels": [classes[int(result["labels"][i])] for i in keep],
                        "pred_scores": [round(float(result["scores"][i]), 4) for i in keep],
                    }
            rows += out
        return rows

    def draw_predictions(self, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
        from finetune_vision.detection_model import draw_boxes

        column = self.recipe.data.image_column
        written: list[Path] = []
        taken = {p.name for p in Path(folder).iterdir()}
        for row in rows:
            if row.get("pred_error"):
                continue
            image = load_rgb(row[column])
            stem, n = Path(str(row[column])).stem, 1
            name = f"{stem}.png"
            while name in taken:
                n += 1
                name = f"{stem}-{n}.png"
            taken.add(name)
            target = Path(folder) / name
            draw_boxes(image, row["pred_boxes"], row["pred_labels"], row["pred_scores"],
                       self.state["classes"]).save(target)
            written.append(target)
        return written

    def usage_snippet(self, base: str) -> str:
        from finetune_vision.detection_model import usage_snippet

        return usage_snippet({**self.state, "score_threshold": self.recipe.task.score_threshold}, base,
                             self.recipe.peft.method)


# ---------------------------------------------------------------------------------------------------- data

def resize_for_model(image: Any, size: int) -> tuple[Any, tuple[float, float]]:
    """A PIL image resized so that its longer side is ``size`` -> (float tensor 0..1, (x factor, y factor))."""
    from torchvision.transforms.v2 import functional as F

    width, height = image.size
    new_w, new_h = _resized(width, height, size)
    tensor = F.to_dtype(F.to_image(F.resize(image, [new_h, new_w], antialias=True)), scale=True)
    return tensor, (new_w / width, new_h / height)


def _resized(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class DetectionDataset:
    """Images with their boxes, resized (longer side ``data.image_size``) and, for training, augmented with
    torchvision.transforms.v2 on a tv_tensors.BoundingBoxes target, so every box moves with the image."""

    def __init__(self, examples: list[Any], classes: list[str], options: Any, training: bool) -> None:
        self.examples, self.options, self.training = examples, options, training
        self.ids = {name: i for i, name in enumerate(classes)}
        self.augment = augmentation(options) if training else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        example = self.examples[i]
        try:
            image = load_rgb(example.image)
        except Exception as exc:  # noqa: BLE001 - read in prepare_data; changed on disk since
            raise DataError(f"image {example.image} became unreadable during training ({type(exc).__name__}: "
                            f"{exc}); fix it and resume with --resume.") from None
        width, height = image.size
        new_w, new_h = _resized(width, height, self.options.image_size)
        boxes = tv_tensors.BoundingBoxes(torch.tensor(example.boxes, dtype=torch.float32).reshape(-1, 4),
                                         format="XYXY", canvas_size=(height, width))
        pixels = F.to_image(image)
        pixels, boxes = F.resize(pixels, [new_h, new_w], antialias=True), F.resize(boxes, [new_h, new_w])
        if self.augment is not None:
            pixels, boxes = self.augment(pixels, boxes)
        return {"pixel_values": F.to_dtype(pixels, torch.float32, scale=True),
                "boxes": boxes.as_subclass(torch.Tensor),
                "labels": torch.tensor([self.ids[v] for v in example.labels], dtype=torch.long),
                "scale_xy": (new_w / width, new_h / height),
                "reference": {"boxes": example.boxes, "labels": [self.ids[v] for v in example.labels],
                              "width": width, "height": height}}


def augmentation(options: Any):
    """The training augmentations of ``options`` as one transforms.v2 pipeline (image, boxes) -> (image, boxes),
    or None when there are none."""
    from torchvision.transforms import v2

    steps: list[Any] = []
    if options.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if options.vflip:
        steps.append(v2.RandomVerticalFlip())
    if options.color_jitter:
        j = options.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps) if steps else None


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images padded to the batch's largest (``image_sizes`` keeps each one's own), boxes and labels as lists."""
    import torch

    heights = [it["pixel_values"].shape[-2] for it in items]
    widths = [it["pixel_values"].shape[-1] for it in items]
    pixels = torch.zeros(len(items), 3, max(heights), max(widths))
    for n, it in enumerate(items):
        pixels[n, :, :heights[n], :widths[n]] = it["pixel_values"]
    return {"pixel_values": pixels, "image_sizes": torch.tensor(list(zip(heights, widths))),
            "scale_xy": torch.tensor([it["scale_xy"] for it in items], dtype=torch.float64),
            "boxes": [it["boxes"] for it in items], "labels": [it["labels"] for it in items],
            "references": [it["reference"] for it in items]}


def _images(batch: dict[str, Any]) -> list[Any]:
    return [pixels[:, :h, :w] for pixels, (h, w) in zip(batch["pixel_values"], batch["image_sizes"].tolist())]
