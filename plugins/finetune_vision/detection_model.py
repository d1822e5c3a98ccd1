"""The detector of ``object-detection``: a timm backbone's multi-scale features + torchvision's FPN and a
torchvision one-stage detection head (FCOS or RetinaNet), COCO metrics (pycocotools) and box drawing.

(Imported only inside Task methods, so torch may be imported at module level here.)

Architecture (module names matter: the LoRA adapter and the model card's snippet use them)::

    detector = torchvision FCOS / RetinaNet
      .backbone = TimmFPN
          .body   timm.create_model(arch, features_only=True, out_indices=(2, 3, 4))   strides 8, 16, 32
          .fpn    torchvision FeaturePyramidNetwork(..., extra_blocks=LastLevelP6P7)    P3..P7, strides 8..128
      .head       FCOSHead / RetinaNetHead
      .transform  GeneralizedRCNNTransform (normalisation with the backbone's mean/std; images come already
                  resized so that their longer side is data.image_size, so it does not resize again)
"""

from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import BackboneError, is_adapter_method

OUT_INDICES = (2, 3, 4)
#: initial FCOS box half-size, in strides of its pyramid level (see build_detector)
FCOS_BOX_INIT = 2.0


class TimmFPN(nn.Module):
    """A timm ``features_only`` backbone followed by a feature pyramid (P3..P7)."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                         extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> OrderedDict:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_detector(arch: str, num_classes: int, *, head: str, fpn_channels: int, head_convs: int,
                   image_size: int, mean: list[float], std: list[float], score_thresh: float = 0.05) -> nn.Module:
    """The detector with a randomly initialised backbone (load weights with :func:`load_body_weights`)."""
    import timm
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    try:
        body = timm.create_model(arch, pretrained=False, features_only=True, out_indices=OUT_INDICES)
    except Exception as exc:  # noqa: BLE001 - unknown architecture, no feature extraction
        raise BackboneError(f"model.backbone: timm cannot build {arch!r} as a multi-scale feature extractor "
                            f"(features_only=True; {type(exc).__name__}: {exc}).") from None
    backbone = TimmFPN(body, list(body.feature_info.channels()), fpn_channels)
    strides = list(body.feature_info.reduction()) + [body.feature_info.reduction()[-1] * 2,
                                                      body.feature_info.reduction()[-1] * 4]
    common = {"min_size": image_size, "max_size": image_size, "image_mean": list(mean), "image_std": list(std),
              "score_thresh": score_thresh, "detections_per_img": 100}
    if head == "fcos":
        from torchvision.models.detection.fcos import FCOS, FCOSHead

        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        fcos_head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
        # torchvision starts box distances at 0 (a point; relu'd, in strides): the GIoU loss then has almost no
        # gradient and Adam at fine-tuning learning rates needs thousands of steps to grow boxes. Start them at
        # FCOS_BOX_INIT strides from the centre instead (the size of objects each level is assigned).
        nn.init.constant_(fcos_head.regression_head.bbox_reg.bias, FCOS_BOX_INIT)
        return FCOS(backbone, num_classes, anchor_generator=anchors, head=fcos_head, **common)
    if head == "retinanet":
        from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

        anchors = AnchorGenerator(tuple((4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) for s in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
        return RetinaNet(backbone, num_classes, anchor_generator=anchors,
                         head=RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes),
                         **common)
    raise ValueError(f"unknown detection head {head!r}")


def load_body_weights(body: nn.Module, folder: Path) -> None:
    """The backbone's pretrained tensors (a timm Hub-layout folder) into the ``features_only`` body; every
    body tensor must be there (the classifier's are not used)."""
    from finetune_vision.models import read_timm_state

    state = read_timm_state(folder)
    own = body.state_dict()
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing or wrong:
        raise BackboneError(f"model.backbone: weights in {folder} do not fit timm {type(body).__name__} "
                            f"(features_only): missing {missing[:3]}, wrong shapes {wrong[:3]}.")
    body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def detector_module_names(model: nn.Module) -> tuple[str, list[str]]:
    """``(body prefix, [modules trained in full])`` of a detector, wrapped by PEFT or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = {n for n, _ in base.named_modules()}
    prefix = "backbone.body" if "backbone.body" in names else "body"
    # the head's two branches by name, not "head": PEFT matches modules_to_save as name suffixes, and "head"
    # would also wrap head.classification_head inside the wrapped head (a nested copy that does not reload)
    return prefix, [n for n in ("backbone.fpn", "head.classification_head", "head.regression_head") if n in names]


# ---------------------------------------------------------------------------------------------------- metrics

def coco_metrics(predictions: list[dict[str, Any]], references: list[dict[str, Any]],
                 classes: list[str]) -> dict[str, Any]:
    """COCO box metrics with pycocotools' COCOeval over every image (one prediction and one reference dict
    per image, in the same order): ``map`` (AP@[.5:.95]), ``map50``, ``map75``, ``map_small/medium/large``
    (-1 where no reference box is that size), ``mar100`` and ``per_class`` {name: {ap, ap50, boxes}} (AP
    None for a class without a reference box). Classes without reference boxes do not count in the means,
    as in COCO."""
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        images.append({"id": i, "width": int(ref.get("width", 0)), "height": int(ref.get("height", 0))})
        for box, label in zip(ref["boxes"], ref["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            detections.append({"image_id": i, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                               "score": float(score)})
    counts = [0] * len(classes)
    for ann in annotations:
        counts[ann["category_id"] - 1] += 1
    empty = {"map": 0.0, "map50": 0.0, "map75": 0.0, "map_small": -1.0, "map_medium": -1.0, "map_large": -1.0,
             "mar100": 0.0, "detections": len(detections), "reference_boxes": len(annotations),
             "per_class": {name: {"ap": None if not counts[c] else 0.0, "ap50": None if not counts[c] else 0.0,
                                  "boxes": counts[c]} for c, name in enumerate(classes)}}
    if not annotations or not detections:
        return empty
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": c + 1, "name": name} for c, name in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    precision = evaluator.eval["precision"]  # [iou thresholds, recall points, classes, areas, max dets]

    def class_ap(c: int, iou: slice | int) -> float | None:
        values = precision[iou, :, c, 0, -1]
        values = values[values > -1]
        return float(np.mean(values)) if values.size and counts[c] else None

    return {"map": max(stats[0], 0.0), "map50": max(stats[1], 0.0), "map75": max(stats[2], 0.0),
            "map_small": stats[3], "map_medium": stats[4], "map_large": stats[5], "mar100": max(stats[8], 0.0),
            "detections": len(detections), "reference_boxes": len(annotations),
            "per_class": {name: {"ap": class_ap(c, slice(None)), "ap50": class_ap(c, 0), "boxes": counts[c]}
                          for c, name in enumerate(classes)}}


# ---------------------------------------------------------------------------------------------------- drawing

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def draw_boxes(image: Any, boxes: list[list[float]], labels: list[str], scores: list[float] | None,
               classes: list[str]) -> Any:
    """A copy of a PIL image with each box outlined in its class's colour and labelled ``name score``."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 300))
    for n, (box, label) in enumerate(zip(boxes, labels)):
        colour = PALETTE[(classes.index(label) if label in classes else n) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{label} {scores[n]:.2f}" if scores is not None else str(label)
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, ty), text, fill=(255, 255, 255))
    return out


# ---------------------------------------------------------------------------------------------------- card

def usage_snippet(state: dict[str, Any], base: str, method: str) -> str:
    """Plain timm + torchvision + peft code that rebuilds the detector, loads the adapter and detects."""
    head = state["head"]
    weights = str(Path(base) / "model.safetensors")
    load = ("model = PeftModel.from_pretrained(model, 'adapter').eval()  # the run's adapter/ folder"
            if is_adapter_method(method) else
            "model.load_state_dict(load_file('adapter/trained.safetensors'), strict=False)\nmodel.eval()")
    if head == "fcos":
        build = ("from torchvision.models.detection.fcos import FCOS, FCOSHead\n"
                 "anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * 5)\n"
                 f"model = FCOS(backbone, len(labels), anchor_generator=anchors, head=FCOSHead(C, 1, len(labels), "
                 f"num_convs={state['head_convs']}),\n")
    else:
        build = ("from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead\n"
                 "anchors = AnchorGenerator(tuple((4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) "
                 "for s in strides), ((0.5, 1.0, 2.0),) * 5)\n"
                 "model = RetinaNet(backbone, len(labels), anchor_generator=anchors, "
                 "head=RetinaNetHead(C, 9, len(labels)),\n")
    return (
        "from collections import OrderedDict\n\n"
        "import timm\nimport torch\nfrom peft import PeftModel\nfrom PIL import Image\n"
        "from safetensors.torch import load_file\n"
        "from torchvision.models.detection.anchor_utils import AnchorGenerator\n"
        "from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7\n"
        "from torchvision.transforms.functional import resize, to_tensor\n\n"
        f"labels = {state['classes']!r}\n"
        f"size, C = {state['image_size']}, {state['fpn_channels']}  # longer image side, pyramid channels\n\n\n"
        "class TimmFPN(torch.nn.Module):\n"
        "    def __init__(self, body):\n"
        "        super().__init__()\n"
        "        self.body, self.out_channels = body, C\n"
        "        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), C,\n"
        "                                         extra_blocks=LastLevelP6P7(C, C))\n\n"
        "    def forward(self, x):\n"
        "        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))\n\n\n"
        + ("torch.manual_seed(0)  # the run's backbone is timm's random initialisation under seed 0\n"
           if state.get("init") == "random" else "")
        + f"body = timm.create_model({state['architecture']!r}, features_only=True, out_indices={OUT_INDICES!r})\n"
        + ("" if state.get("init") == "random" else
           f"weights = load_file({weights!r})  # the backbone (its classifier not used)\n"
           "body.load_state_dict({k: v for k, v in weights.items() if k in body.state_dict()})\n")
        + "backbone = TimmFPN(body)\n"
        "strides = body.feature_info.reduction() + [body.feature_info.reduction()[-1] * m for m in (2, 4)]\n"
        + build +
        f"             min_size=size, max_size=size, image_mean={state['mean']!r},\n"
        f"             image_std={state['std']!r}, score_thresh={state['score_threshold']!r})\n"
        f"{load}\n"
        "image = Image.open('image.jpg').convert('RGB')\n"
        "scale = size / max(image.size)\n"
        "x = to_tensor(resize(image, [round(image.height * scale), round(image.width * scale)]))\n"
        "with torch.no_grad():\n"
        "    found = model([x])[0]\n"
        "for box, label, score in zip(found['boxes'] / scale, found['labels'], found['scores']):\n"
        "    box = [round(float(v), 1) for v in box]\n"
        "    if box[2] > box[0] and box[3] > box[1]:  # not clipped to a line at the border\n"
        "        print(labels[label], round(float(score), 3), box)")
