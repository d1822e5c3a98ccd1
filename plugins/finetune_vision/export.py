"""What ``finetune export`` needs from the vision plugin (imports torch): the module traced for ONNX, the
card's onnxruntime snippet, and timm models written in timm's own Hub layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class PixelLogits(torch.nn.Module):
    """``model(pixel_values)`` -> logits (a transformers output's ``.logits``, a timm model's tensor)."""

    def __init__(self, model: Any, forward_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.forward_kwargs = model, dict(forward_kwargs)

    def forward(self, pixel_values: Any) -> Any:
        out = self.model(pixel_values, **self.forward_kwargs)
        return getattr(out, "logits", out)


def onnx_usage(state: dict[str, Any], thresholds: list[float] | None) -> str:
    """onnxruntime + PIL + numpy: the eval transform (resize, centre crop, normalise) and the decision."""
    pre = state.get("preprocess", {})
    size = int(pre.get("input_size", 224))
    resize = int(size / float(pre.get("crop_pct", 1.0)))
    labels = state.get("labels", [])
    code = ("import numpy as np\nimport onnxruntime as ort\nfrom PIL import Image\n\n"
            "session = ort.InferenceSession('model.onnx')\n"
            f"labels = {labels!r}\n"
            "image = Image.open('image.jpg').convert('RGB')\n"
            f"scale = {resize} / min(image.size)  # as finetune_preprocess.json says: resize, centre crop, normalise\n"
            "image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), "
            f"Image.{str(pre.get('interpolation', 'bilinear')).upper()})\n"
            f"left, top = (image.width - {size}) // 2, (image.height - {size}) // 2\n"
            f"image = image.crop((left, top, left + {size}, top + {size}))\n"
            "x = np.asarray(image, dtype=np.float32) / 255.0\n"
            f"x = ((x - np.array({pre.get('mean')}, dtype=np.float32)) / np.array({pre.get('std')}, dtype=np.float32))"
            "\nx = x.transpose(2, 0, 1)[None]  # [batch, 3, height, width]\n"
            "logits = session.run(None, {'pixel_values': x})[0]\n")
    if thresholds is None:
        return code + "print(labels[int(logits[0].argmax())])\n"
    return (code + f"thresholds = {[round(float(t), 2) for t in thresholds]!r}  # per label, tuned on the eval split\n"
            "probs = 1 / (1 + np.exp(-logits[0]))\n"
            "print([name for name, p, t in zip(labels, probs, thresholds) if p >= t])\n")


def save_timm(model: Any, processor: Any, folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The merged timm model as config.json + model.safetensors (timm's ``save_for_hf``), read back with
    ``timm.create_model('local-dir:...')`` and compared with the merged model on a random input."""
    import timm
    from timm.models import save_for_hf

    labels = state.get("labels", [])
    pre = state.get("preprocess", {})
    size = int(pre.get("input_size", 224))
    data_config = {"input_size": (3, size, size), "interpolation": pre.get("interpolation", "bilinear"),
                   "mean": tuple(pre.get("mean", (0.485, 0.456, 0.406))),
                   "std": tuple(pre.get("std", (0.229, 0.224, 0.225))), "crop_pct": float(pre.get("crop_pct", 1.0))}
    save_for_hf(model, str(folder), model_config={"label_names": list(labels)},
                model_args=dict(state.get("model_kwargs") or {}), safe_serialization=True, data_config=data_config)
    if processor is not None:
        processor.save_pretrained(str(folder))
    back = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    diff = float((back(x) - model(x)).abs().max())
    if not diff <= 1e-4:
        from finetune import ExportError

        raise ExportError(f"export: the timm folder read back gives logits up to {diff:.3g} away from the merged "
                          "model's; nothing was written.")
    usage = ("import timm\nimport torch\n\n"
             "model = timm.create_model('local-dir:.', pretrained=True).eval()  # this folder\n"
             f"labels = {labels!r}\n"
             "config = timm.data.resolve_data_config(model=model)\n"
             "transform = timm.data.create_transform(**config)\n"
             "# (the eval transform finetune used, written to config.json: resize, centre crop, normalise)\n"
             "from PIL import Image\n"
             "logits = model(transform(Image.open('image.jpg').convert('RGB'))[None])\n"
             "print(labels[logits.argmax(-1).item()])\n")
    return {"files": sorted(p.name for p in Path(folder).iterdir()),
            "checks": {"timm_reload_max_abs_logit_diff": diff}, "usage": usage}
