"""The segmentation network: a timm backbone's multi-scale features (``features_only=True``) and a light
decoder from torchvision, trained in full while LoRA adapts the backbone.

Decoders (``task.decoder``):

* ``"fpn"`` (default): ``torchvision.ops.FeaturePyramidNetwork`` over the stride 4/8/16/32 features (no
  normalisation layers), its four levels upsampled to stride 4 and summed (as Panoptic FPN's semantic
  branch, lighter), then a 3x3 convolution + ReLU + a 1x1 classifier.
* ``"lraspp"``: torchvision's LR-ASPP head (``torchvision.models.segmentation.lraspp.LRASPPHead``, the
  MobileNetV3 segmentation head) on the stride 8 and stride 32 features.

Either way the logits are upsampled (bilinear) to the input size. (Imported only inside Task methods, so
torch may be imported at module level here.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from finetune import BackboneError, is_adapter_method
from finetune_vision.zoo import TIMM_ARCH_PREFIX

FPN_LEVELS = (1, 2, 3, 4)  # timm feature indices: strides 4, 8, 16, 32
LRASPP_LEVELS = (2, 4)  # strides 8 and 32


class FPNDecoder(nn.Module):
    def __init__(self, channels: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.fpn = FeaturePyramidNetwork(list(channels), width)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, num_classes, 1))

    def forward(self, features: list[Any]) -> Any:
        levels = list(self.fpn({str(i): f for i, f in enumerate(features)}).values())
        size = levels[0].shape[-2:]  # every level (each trained: DDP needs them all) summed at stride 4
        fused = levels[0] + sum(nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
                                for x in levels[1:])
        return self.head(fused)


class LRASPPDecoder(nn.Module):
    def __init__(self, channels: list[int], num_classes: int, width: int = 128) -> None:
        super().__init__()
        from torchvision.models.segmentation.lraspp import LRASPPHead

        self.head = LRASPPHead(channels[0], channels[-1], num_classes, width)

    def forward(self, features: list[Any]) -> Any:
        return self.head({"low": features[0], "high": features[-1]})


DECODERS = {"fpn": (FPNDecoder, FPN_LEVELS), "lraspp": (LRASPPDecoder, LRASPP_LEVELS)}


class SegmentationNet(nn.Module):
    """``backbone`` (timm, features_only) + ``decoder``; ``forward(pixel_values)`` -> logits [B, C, H, W]."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, pixel_values: Any) -> Any:
        logits = self.decoder(self.backbone(pixel_values))
        return nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


def build_network(arch: str, num_classes: int, decoder: str) -> SegmentationNet:
    import timm

    decoder_cls, levels = DECODERS[decoder]
    try:
        backbone = timm.create_model(arch, pretrained=False, features_only=True, out_indices=levels)
    except Exception as exc:  # noqa: BLE001 - unknown architecture, no features_only support
        raise BackboneError(f"model.backbone: timm cannot build {arch!r} as a multi-scale feature extractor "
                            f"(features_only=True, out_indices={levels}): {type(exc).__name__}: {exc}. Use a "
                            "CNN backbone such as mobilenetv2_100.tv_in1k.") from None
    return SegmentationNet(backbone, decoder_cls(backbone.feature_info.channels(), num_classes))


def load_segmentation_model(backbone: Any, num_classes: int, init: str, decoder: str,
                            image_size: int | None) -> tuple[SegmentationNet, dict[str, Any]]:
    """``(model, facts)``: the network with the backbone's pretrained weights (unless ``init == "random"``)
    and the preprocessing facts for the task state."""
    import json

    import timm

    path = backbone.path
    folder: Path | None = None
    config: dict[str, Any] = {}
    if path.startswith(TIMM_ARCH_PREFIX):
        arch = path[len(TIMM_ARCH_PREFIX):]
    else:
        folder = Path(path)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackboneError(f"model.backbone: {folder} has no readable config.json ({exc}).") from None
        if "architecture" not in config or "model_type" in config:
            raise BackboneError(f"model.backbone: {folder} is not a timm model folder (config.json naming an "
                                "architecture); semantic-segmentation builds its encoder with timm "
                                "(features_only). Use e.g. mobilenetv2_100.tv_in1k or tf_efficientnet_lite0.mli_in1k"
                                " (see docs/design.md on SegFormer-style transformers models).")
        arch = config["architecture"]
    model = build_network(arch, num_classes, decoder)
    if init == "pretrained":
        if folder is None:
            raise BackboneError(f"model.backbone: {backbone.name!r}: no pretrained weights for timm architecture "
                                f"{arch!r} are available offline; use an offline zoo backbone "
                                "(mobilenetv2_100.tv_in1k) or set task.init = \"random\".")
        load_backbone_weights(model.backbone, folder)
    pcfg = dict(config.get("pretrained_cfg") or {})
    cfg = timm.data.resolve_data_config(pretrained_cfg={**model.backbone.pretrained_cfg, **pcfg})
    preprocess = {"input_size": int(image_size or cfg["input_size"][-1]),
                  "interpolation": str(cfg.get("interpolation", "bilinear")),
                  "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}
    facts = {"backend": "timm", "architecture": arch, "decoder": decoder, "init": init, "preprocess": preprocess,
             "feature_channels": [int(c) for c in model.backbone.feature_info.channels()]}
    return model, facts


def load_backbone_weights(features: nn.Module, folder: Path) -> None:
    """The pretrained tensors of a timm checkpoint into a features_only model: every tensor of the feature
    extractor must load (the classifier and the last 1x1 convolution are not part of it)."""
    from finetune_vision.models import read_timm_state

    state = read_timm_state(folder)
    own = features.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if wrong or missing:
        raise BackboneError(f"model.backbone: weights in {folder} do not fit timm's {type(features).__name__}: "
                            f"missing {missing[:3]}, wrong shapes {wrong[:3]}.")
    features.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def usage_snippet(state: dict[str, Any], base: str, method: str) -> str:
    """Plain timm + torchvision + peft code that rebuilds the network and loads the adapter."""
    classes = state.get("classes", [])
    pre = state.get("preprocess", {})
    decoder = state.get("decoder", "fpn")
    levels = DECODERS[decoder][1]
    if decoder == "fpn":
        decoder_code = (
            "class Decoder(torch.nn.Module):\n"
            "    def __init__(self, channels, num_classes, width=64):\n"
            "        super().__init__()\n"
            "        self.fpn = FeaturePyramidNetwork(channels, width)\n"
            "        self.head = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),\n"
            "                                        torch.nn.Conv2d(width, num_classes, 1))\n\n"
            "    def forward(self, features):\n"
            "        levels = list(self.fpn({str(i): f for i, f in enumerate(features)}).values())\n"
            "        size = levels[0].shape[-2:]\n"
            "        up = [torch.nn.functional.interpolate(x, size=size, mode='bilinear') for x in levels[1:]]\n"
            "        return self.head(levels[0] + sum(up))\n")
        imports = "from torchvision.ops import FeaturePyramidNetwork\n"
    else:
        decoder_code = (
            "class Decoder(torch.nn.Module):\n"
            "    def __init__(self, channels, num_classes, width=128):\n"
            "        super().__init__()\n"
            "        self.head = LRASPPHead(channels[0], channels[-1], num_classes, width)\n\n"
            "    def forward(self, features):\n"
            "        return self.head({'low': features[0], 'high': features[-1]})\n")
        imports = "from torchvision.models.segmentation.lraspp import LRASPPHead\n"
    load = ("model = PeftModel.from_pretrained(model, 'adapter').eval()  # the run's adapter/ folder"
            if is_adapter_method(method) else
            "model.load_state_dict(load_file('adapter/trained.safetensors'), strict=False)\nmodel.eval()")
    weights = (f"weights = load_file({str(Path(base) / 'model.safetensors')!r})  # the pretrained backbone\n"
               "own = model.backbone.state_dict()\n"
               "model.backbone.load_state_dict({k: v for k, v in weights.items() if k in own})\n"
               if state.get("init") != "random" else "")
    size = int(pre.get("input_size", 224))
    return (
        "import timm\nimport torch\nfrom peft import PeftModel\nfrom PIL import Image\n"
        "from safetensors.torch import load_file\nfrom torchvision.transforms import v2 as T\n"
        f"{imports}\n"
        f"{decoder_code}\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        f"        self.backbone = timm.create_model({state.get('architecture')!r}, features_only=True, "
        f"out_indices={levels})\n"
        "        self.decoder = Decoder(self.backbone.feature_info.channels(), num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.interpolate(self.decoder(self.backbone(x)), size=x.shape[-2:],\n"
        "                                               mode='bilinear')\n\n\n"
        f"classes = {classes!r}\n"
        "model = Net(len(classes))\n"
        f"{weights}{load}\n"
        f"transform = T.Compose([T.ToImage(), T.Resize(({size}, {size}), "
        f"interpolation=T.InterpolationMode.{str(pre.get('interpolation', 'bilinear')).upper()}),\n"
        f"                       T.ToDtype(torch.float32, scale=True), T.Normalize({pre.get('mean')}, "
        f"{pre.get('std')})])\n"
        "image = Image.open('image.png').convert('RGB')\n"
        "with torch.no_grad():\n"
        "    logits = model(transform(image)[None])\n"
        "    logits = torch.nn.functional.interpolate(logits, size=image.size[::-1], mode='bilinear')\n"
        "mask = logits.argmax(1)[0]  # class index per pixel, at the image's size\n"
        "print({c: float((mask == i).float().mean()) for i, c in enumerate(classes)})")
