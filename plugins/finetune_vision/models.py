"""Loading timm and transformers image backbones with a new head, and their preprocessing.

(Imported only inside Task methods, so torch may be imported at module level here.)

A folder whose ``config.json`` names an ``architecture`` (timm's Hub layout, also what the vision zoo
writes) loads with timm; a folder with a ``model_type`` loads with transformers'
``AutoModelForImageClassification``. Either way the head is replaced by one with ``len(labels)``
outputs, and every other pretrained tensor must load (a missing backbone tensor is an error, not a
warning buried in a log).

A non-native input size (``data.image_size`` differing from the pretrained one) works for ViT-style
models: timm models that take ``img_size`` are built at that size and their position embeddings are
resampled once from the pretrained ones (timm's own ``checkpoint_filter_fn``); transformers models
whose forward takes ``interpolate_pos_encoding`` get it (``facts["forward_kwargs"]``) in training,
evaluation and prediction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from finetune import BackboneError, is_adapter_method
from finetune_vision.zoo import IMAGENET_MEAN, IMAGENET_STD, TIMM_ARCH_PREFIX

_HF_HEAD_NAMES = ("classifier", "head", "fc", "score")
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PREPROCESS_FILE = "finetune_preprocess.json"


class VisionProcessor:
    """The backbone's preprocessing (size, mean, std, interpolation, crop) and the transforms built from it."""

    def __init__(self, preprocess: dict[str, Any], hf_processor: Any = None) -> None:
        self.preprocess = preprocess
        self.hf_processor = hf_processor

    def transform(self, training: bool, options: Any = None):
        from torchvision import transforms as T

        pre = self.preprocess
        size = pre["input_size"]
        interp = T.InterpolationMode(pre["interpolation"]) if pre["interpolation"] in (
            "nearest", "bilinear", "bicubic", "lanczos", "box", "hamming") else T.InterpolationMode.BILINEAR
        resize = int(math.floor(size / pre["crop_pct"]))
        steps: list[Any] = []
        if training and options is not None and options.random_resized_crop:
            steps.append(T.RandomResizedCrop(size, scale=(options.crop_scale_min, 1.0), interpolation=interp))
        else:
            steps += [T.Resize(resize, interpolation=interp), T.CenterCrop(size)]
        if training and options is not None:
            if options.hflip:
                steps.append(T.RandomHorizontalFlip())
            if options.auto_augment == "trivial":
                steps.append(T.TrivialAugmentWide(interpolation=interp))
            elif options.auto_augment == "randaugment":
                steps.append(T.RandAugment(magnitude=options.randaugment_magnitude, interpolation=interp))
        steps += [T.ToTensor(), T.Normalize(pre["mean"], pre["std"])]
        return T.Compose(steps)

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / PREPROCESS_FILE).write_text(json.dumps(self.preprocess, indent=2))
        if self.hf_processor is not None:
            self.hf_processor.save_pretrained(folder)


def _read_config(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    if not config.exists():
        raise BackboneError(f"model.backbone: {folder} has no config.json; an image backbone folder needs a "
                            "transformers config (save_pretrained) or a timm config.json naming the architecture.")
    try:
        return json.loads(config.read_text())
    except ValueError as exc:
        raise BackboneError(f"model.backbone: {config} is not valid JSON ({exc}).") from None


def load_backbone_model(backbone: Any, labels: list[str], init: str, image_size: int | None = None,
                        crop_pct: float | None = None) -> tuple[Any, VisionProcessor, dict[str, Any]]:
    """``(model, processor, facts)``; facts (backend, architecture, preprocessing) go into the task state.

    ``image_size`` / ``crop_pct`` override the backbone's pretrained input size and eval crop."""
    path = backbone.path
    if path.startswith(TIMM_ARCH_PREFIX):
        model, processor, facts = _load_timm(path[len(TIMM_ARCH_PREFIX):], None, {}, backbone, labels, init,
                                             image_size)
    else:
        folder = Path(path)
        config = _read_config(folder)
        if "architecture" in config and "model_type" not in config:
            model, processor, facts = _load_timm(config["architecture"], folder, config, backbone, labels, init,
                                                 image_size)
        else:
            model, processor, facts = _load_transformers(folder, backbone, labels, init, image_size)
    if crop_pct:
        processor.preprocess["crop_pct"] = float(crop_pct)
    return model, processor, facts


def _load_timm(arch: str, folder: Path | None, config: dict[str, Any], backbone: Any, labels: list[str],
               init: str, image_size: int | None):
    import timm

    pcfg = dict(config.get("pretrained_cfg") or {})
    overlay = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pcfg.items()
               if k in ("mean", "std", "interpolation", "crop_pct", "crop_mode", "input_size", "tag", "classifier",
                        "first_conv", "num_classes", "test_input_size")}
    kwargs = {**(config.get("model_args") or {}), "num_classes": len(labels)}
    model_kwargs: dict[str, Any] = {}
    try:
        model = None
        if image_size:  # ViT-style models take img_size (position embeddings resampled on load); CNNs do not
            try:
                model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None,
                                          img_size=int(image_size), **kwargs)
                model_kwargs = {"img_size": int(image_size)}
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
        if model is None:
            model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown architecture, bad model_args
        raise BackboneError(f"model.backbone: timm cannot build {arch!r} ({type(exc).__name__}: {exc}).") from None
    if init == "pretrained":
        if folder is None:
            import difflib

            from finetune_vision.zoo import known_names

            close = difflib.get_close_matches(backbone.name, known_names(), n=1, cutoff=0.8)
            raise BackboneError(
                f"model.backbone: {backbone.name!r}{f' (did you mean {close[0]!r}?)' if close else ''}: no "
                f"pretrained weights for timm architecture {arch!r} are available offline (not in the local "
                f"Hugging Face cache as timm/{arch}). Offline vision backbones: "
                f"{', '.join(known_names())}; or set task.init = \"random\" to train it from scratch.")
        _load_timm_weights(model, folder)
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=model.pretrained_cfg)  # the pretrained, not img_size
    preprocess = {
        "input_size": int(image_size or data_cfg["input_size"][-1]),
        "interpolation": str(data_cfg.get("interpolation", "bicubic")),
        "mean": [float(v) for v in data_cfg["mean"]], "std": [float(v) for v in data_cfg["std"]],
        "crop_pct": float(data_cfg.get("crop_pct", 0.875)),
        "pretrained_input_size": int(data_cfg["input_size"][-1]),
    }
    facts = {"backend": "timm", "architecture": arch, "preprocess": preprocess, "init": init,
             "model_kwargs": model_kwargs}
    return model, VisionProcessor(preprocess), facts


def read_timm_state(folder: Path) -> dict[str, Any]:
    """The tensors of a timm Hub-layout checkpoint folder (safetensors, else a weights-only torch.load)."""
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.exists():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise BackboneError(f"model.backbone: {folder} holds no model.safetensors (or pytorch_model.bin).")


def _load_timm_weights(model: Any, folder: Path) -> None:
    state = read_timm_state(folder)
    heads = head_module_names(model)

    def in_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in heads)

    own = model.state_dict()
    state = {k: v for k, v in state.items() if not in_head(k)}

    def wrong_shapes(state: dict[str, Any]) -> dict[str, str]:
        return {k: f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                if k in own and tuple(v.shape) != tuple(own[k].shape)}

    wrong = wrong_shapes(state)
    if wrong:  # e.g. a ViT built at another img_size: timm's own filter resamples position embeddings
        import sys

        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = {k: v for k, v in filter_fn(dict(state), model).items() if not in_head(k)}
            except Exception as exc:  # noqa: BLE001 - report the shapes below, with the reason
                wrong["checkpoint_filter_fn"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            else:
                wrong = wrong_shapes(state)
    result = model.load_state_dict({k: v for k, v in state.items() if k in own and k not in wrong}, strict=False)
    missing = [k for k in result.missing_keys if not in_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or wrong:
        raise BackboneError(f"model.backbone: weights in {folder} do not fit timm {type(model).__name__}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}, "
                            f"wrong shapes {list(wrong.values())[:3]}.")


def _load_transformers(folder: Path, backbone: Any, labels: list[str], init: str, image_size: int | None):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    kw = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
    id2label = dict(enumerate(labels))
    config = AutoConfig.from_pretrained(str(folder), id2label=id2label,
                                        label2id={v: i for i, v in id2label.items()}, **kw)
    try:
        if init == "random":
            model = AutoModelForImageClassification.from_config(config, trust_remote_code=backbone.trust_remote_code)
        else:
            model = AutoModelForImageClassification.from_pretrained(str(folder), config=config,
                                                                    ignore_mismatched_sizes=True, **kw)
    except ValueError:
        # No image-classification class for this model type (e.g. CLIP/SigLIP vision towers): AutoModel + head.
        model = _backbone_with_head(folder, config, labels, init, kw)
    try:
        hf_processor = AutoImageProcessor.from_pretrained(str(folder), **kw)
    except (OSError, ValueError):
        hf_processor = None
    preprocess = _hf_preprocess(hf_processor, config)
    if image_size:
        preprocess["input_size"] = int(image_size)
    forward_kwargs = {}
    native = getattr(config, "image_size", None)
    if isinstance(native, (list, tuple)):
        native = native[-1]
    if native and int(native) != preprocess["input_size"] and _accepts(model, "interpolate_pos_encoding"):
        forward_kwargs["interpolate_pos_encoding"] = True  # position embeddings interpolated to the input size
    facts = {"backend": "transformers", "architecture": type(model).__name__, "preprocess": preprocess,
             "init": init, "forward_kwargs": forward_kwargs}
    return model, VisionProcessor(preprocess, hf_processor), facts


def _accepts(model: Any, name: str) -> bool:
    import inspect

    target = model.backbone if isinstance(model, BackboneWithHead) else model
    try:
        return name in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def _backbone_with_head(folder: Path, config: Any, labels: list[str], init: str, kw: dict[str, Any]) -> Any:
    from transformers import AutoModel

    try:
        if init == "random":
            backbone = AutoModel.from_config(config, trust_remote_code=kw["trust_remote_code"])
        else:
            backbone = AutoModel.from_pretrained(str(folder), **kw)
    except ValueError as exc:
        raise BackboneError(f"model.backbone: {folder} ({config.model_type}) loads neither as a transformers "
                            f"image classifier nor as an AutoModel ({str(exc)[:200]}).") from None
    size = int(getattr(config, "image_size", 224) or 224)
    with torch.no_grad():
        features = BackboneWithHead.pool(backbone.eval()(pixel_values=torch.zeros(1, 3, size, size)))
    return BackboneWithHead(backbone, features.shape[-1], len(labels))


class BackboneWithHead(torch.nn.Module):
    """A transformers vision backbone (AutoModel) + a linear classifier on its pooled features.

    Pooled features: ``pooler_output`` when the model has one, else the mean of ``last_hidden_state``
    over tokens (or spatial positions)."""

    def __init__(self, backbone: Any, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = torch.nn.Linear(num_features, num_classes)

    @staticmethod
    def pool(outputs: Any) -> Any:
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = outputs.last_hidden_state
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(-1)

    def forward(self, pixel_values: Any, **kwargs: Any) -> Any:
        return self.classifier(self.pool(self.backbone(pixel_values=pixel_values, **kwargs)))


def _hf_preprocess(proc: Any, config: Any) -> dict[str, Any]:
    if proc is None:  # no preprocessor_config.json: ImageNet statistics at the config's image size
        size = int(getattr(config, "image_size", 224) or 224)
        return {"input_size": size, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "crop_pct": 1.0, "pretrained_input_size": size,
                "note": "no preprocessor_config.json in the backbone folder: ImageNet mean/std assumed"}
    size = dict(getattr(proc, "size", None) or {})
    crop = dict(getattr(proc, "crop_size", None) or {})
    short = size.get("shortest_edge") or size.get("height") or 224
    if getattr(proc, "do_center_crop", False) and crop.get("height"):
        side, crop_pct = int(crop["height"]), float(crop["height"]) / float(short)
    else:
        side, crop_pct = int(short), 1.0
    resample = getattr(proc, "resample", 2)
    mean = getattr(proc, "image_mean", None) or IMAGENET_MEAN
    std = getattr(proc, "image_std", None) or IMAGENET_STD
    return {"input_size": side, "interpolation": _RESAMPLE_NAMES.get(int(resample), "bilinear"),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "crop_pct": crop_pct,
            "pretrained_input_size": side}


def head_module_names(model: Any) -> list[str]:
    """Full names of the classification head module(s) of a timm or transformers model."""
    base = model
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None:
        base = get_base()
    names = dict(base.named_modules())
    get_classifier = getattr(base, "get_classifier", None)
    if get_classifier is not None:  # timm
        head = get_classifier()
        for name, module in names.items():
            if module is head and name:
                return [name]
    return [n for n in _HF_HEAD_NAMES if n in names][:1]


def usage_snippet(state: dict[str, Any], base: str, method: str, thresholds: list[float] | None = None) -> str:
    """Plain timm/transformers + peft code that loads the adapter and classifies ``image.jpg``: the most
    likely label, or with ``thresholds`` (multi-label) every label whose sigmoid reaches its threshold."""
    labels = state.get("labels", [])
    pre = state.get("preprocess", {})
    forward_kwargs = state.get("forward_kwargs") or {}
    load = ("model = PeftModel.from_pretrained(model, 'adapter').eval()  # the run's adapter/ folder"
            if is_adapter_method(method) else
            "model.load_state_dict(load_file('adapter/trained.safetensors'), strict=False)\nmodel.eval()")
    transform = (
        "from torchvision import transforms as T\n"
        f"interpolation = T.InterpolationMode.{str(pre.get('interpolation', 'bilinear')).upper()}\n"
        f"transform = T.Compose([T.Resize({int(pre.get('input_size', 224) / pre.get('crop_pct', 1.0))}, "
        "interpolation=interpolation), "
        f"T.CenterCrop({pre.get('input_size', 224)}), T.ToTensor(),\n"
        f"                       T.Normalize({pre.get('mean')}, {pre.get('std')})])\n")
    if state.get("backend") == "timm":
        return (
            "import timm\nimport torch\nfrom peft import PeftModel\nfrom PIL import Image\n"
            "from safetensors.torch import load_file\n\n"
            f"labels = {labels!r}\n"
            f"model = timm.create_model({state.get('architecture')!r}, num_classes=len(labels)"
            + "".join(f", {k}={v!r}" for k, v in (state.get("model_kwargs") or {}).items()) + ")\n"
            f"weights = load_file({str(Path(base) / 'model.safetensors')!r})  # the backbone (head not used)\n"
            "model.load_state_dict({k: v for k, v in weights.items() if k in model.state_dict()\n"
            "                       and v.shape == model.state_dict()[k].shape}, strict=False)\n"
            f"{load}\n{transform}"
            "x = transform(Image.open('image.jpg').convert('RGB'))[None]\n"
            + _decision("model(x)", thresholds))
    return (
        "import torch\nfrom peft import PeftModel\nfrom PIL import Image\nfrom safetensors.torch import load_file\n"
        "from transformers import AutoModelForImageClassification\n\n"
        f"labels = {labels!r}\n"
        f"model = AutoModelForImageClassification.from_pretrained({base!r}, num_labels=len(labels),\n"
        "                                                        ignore_mismatched_sizes=True)\n"
        f"{load}\n{transform}"
        "x = transform(Image.open('image.jpg').convert('RGB'))[None]\n"
        + _decision("model(pixel_values=x" + "".join(f", {k}={v!r}" for k, v in forward_kwargs.items()) + ").logits",
                    thresholds))


def _decision(logits: str, thresholds: list[float] | None) -> str:
    if thresholds is None:
        return f"print(labels[{logits}.argmax(-1).item()])"
    return (f"thresholds = {[round(float(t), 2) for t in thresholds]!r}  # per label, tuned on the eval split\n"
            "with torch.no_grad():\n"
            f"    probs = {logits}.sigmoid()[0].tolist()\n"
            "print([name for name, p, t in zip(labels, probs, thresholds) if p >= t])")
