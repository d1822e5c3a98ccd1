"""Preference tuning, GRPO and reward models with 2 CPU processes (gloo), through `finetune run --num-processes 2`,
as SFT runs: the same adapter as one process with the same global batch where nothing is sampled."""

from __future__ import annotations

import json
import random

import pytest
from conftest import run_cli
from generation_fixtures import make_qa_rows, write_jsonl
from safetensors.torch import load_file

from finetune.engine.run_folder import RunDir


def _pairs(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"add {a} and {b}", "chosen": f"{a}+{b}={a + b}", "rejected": f"{a}+{b}={a + b + 1}"})
    return rows


def _recipe(path, backbone, task: dict, data, out, batch_size: int, epochs: int = 1):
    import tomli_w

    path.write_text(tomli_w.dumps({
        "task": task, "model": {"backbone": str(backbone)},
        "data": {"train": str(data), "split": 0.25, "max_length": 48},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 1e-2, "mixed_precision": "no",
                  "checkpoint_every_steps": 0, "seed": 0, "group_by_length": False},
        "output": {"dir": str(out)}}))
    return path


def test_dpo_with_two_processes_matches_one_process_with_the_same_global_batch(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(32))
    task = {"name": "preference-tuning", "objective": "dpo", "sample_prompts": 0}
    one = run_cli("run", str(_recipe(tmp_path / "one.toml", tiny_llama, task, data, tmp_path / "one", 8)))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("run", str(_recipe(tmp_path / "two.toml", tiny_llama, task, data, tmp_path / "two", 4)),
                  "--num-processes", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    run_one, run_two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert run_two.is_finished() and run_two.info()["processes"] == 2
    a = load_file(str(run_one.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(run_two.adapter_dir / "adapter_model.safetensors"))
    for key in a:  # synced gradients, the reference log-probs of every pair computed where it is trained
        assert (a[key] - b[key]).abs().max().item() < 1e-4, key
    m1, m2 = (json.loads(r.metrics_file.read_text()) for r in (run_one, run_two))
    for key in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert m1["best"][key] == pytest.approx(m2["best"][key], abs=1e-4), key
    assert m1["before"]["reward_margin"] == m2["before"]["reward_margin"] == 0.0  # fresh adapter: policy == reference


def test_grpo_and_a_reward_model_train_with_two_processes(tmp_path, tiny_llama):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", make_qa_rows(16, seed=2))
    grpo = {"name": "grpo", "group_size": 2, "max_new_tokens": 4, "rewards": {"exact-number": 1.0, "format": 0.1},
            "format_regex": r".*=.*", "sample_prompts": 2}
    result = run_cli("run", str(_recipe(tmp_path / "grpo.toml", tiny_llama, grpo, prompts, tmp_path / "grpo", 2)),
                     "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(tmp_path / "grpo")
    assert run.is_finished() and run.info()["processes"] == 2
    metrics = json.loads(run.metrics_file.read_text())
    assert {"reward", "reward_exact-number", "reward_format"} <= set(metrics["best"])
    train = [r for r in run.read_metrics_log() if r["kind"] == "train"]
    assert train and all("reward_std" in r and "completion_length" in r for r in train)
    samples = [json.loads(line) for line in (run.path / "samples" / "step-00000000.jsonl").read_text().splitlines()]
    assert len(samples) == 4  # every eval prompt once, gathered from both processes
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(24))
    result = run_cli("run", str(_recipe(tmp_path / "rm.toml", tiny_llama, {"name": "reward-model"}, pairs,
                                        tmp_path / "rm", 4)), "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(RunDir(tmp_path / "rm").metrics_file.read_text())
    assert {"accuracy", "margin"} <= set(metrics["best"])
