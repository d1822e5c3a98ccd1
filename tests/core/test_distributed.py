"""Data-parallel training with 2 CPU processes (gloo) through `finetune run --num-processes 2`."""

from __future__ import annotations

import json

import pytest
from conftest import NEGATIVE, NEUTRAL, POSITIVE, run_cli
from safetensors.torch import load_file

from finetune.engine.run_folder import RunDir
from finetune.testing import tiny_text_backbone


@pytest.fixture
def no_dropout_bert(tmp_path):
    return tiny_text_backbone(tmp_path / "bert-no-dropout", POSITIVE + NEGATIVE + NEUTRAL,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_two_processes_match_one_process_with_the_same_global_batch(make_recipe, tmp_path, no_dropout_bert):
    common = ["--set", f'model.backbone="{no_dropout_bert}"', "--set", "peft.dropout=0.0",
              "--set", "train.epochs=2", "--set", "train.checkpoint_every_steps=0", "--set", "data.test_split=0.1"]
    one = run_cli("run", str(make_recipe(name="one.toml", output=str(tmp_path / "one"))), *common,
                  "--set", "train.batch_size=24")
    assert one.returncode == 0, one.stderr
    two = run_cli("run", str(make_recipe(name="two.toml", output=str(tmp_path / "two"))), *common,
                  "--set", "train.batch_size=12", "--num-processes", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    run_one, run_two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert run_two.is_finished() and run_two.info()["processes"] == 2
    a = load_file(str(run_one.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(run_two.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # synced gradients: the same model up to float reduction order
        assert (a[key] - b[key]).abs().max().item() < 1e-4, key
    m1, m2 = (json.loads(r.metrics_file.read_text()) for r in (run_one, run_two))
    assert m1["train"]["steps"] == m2["train"]["steps"] == 10  # 108 rows / 24 per step (5 steps) x 2 epochs
    assert m2["train"]["samples_seen"] == 216
    assert m1["best"]["accuracy"] == pytest.approx(m2["best"]["accuracy"], abs=1e-9)
    # the test split (16 rows), scored once by both processes with the selected adapter: every row once
    assert m1["data"]["test_examples"] == m2["data"]["test_examples"] == 16
    assert m1["test"]["accuracy"] == pytest.approx(m2["test"]["accuracy"], abs=1e-9)
    assert two.stdout.count("test (adapter of step") == 1
    # one progress display: each evaluation is printed once, by the main process
    assert two.stdout.count("eval @ step 5 ") == 1


def test_user_errors_in_a_multi_process_run_are_clear_without_a_launcher_traceback(make_recipe):
    # a recipe error: found once, before any process starts
    typo = run_cli("run", str(make_recipe(data='text_colum = "text"')), "--num-processes", "2")
    assert typo.returncode == 2 and typo.stderr.count("error: ") == 1, typo.stderr[-2000:]
    assert "did you mean 'text_column'?" in typo.stderr
    # a data error: each process reports it as usual, the launcher adds its exit code, not a traceback
    data = run_cli("run", str(make_recipe(data='label_column = "nope"', name="data.toml")), "--num-processes", "2")
    assert data.returncode == 2, data.stderr[-2000:]
    assert "error: data.label_column: column 'nope' not found" in data.stderr
    assert "Traceback" not in data.stderr and "ChildFailedError" not in data.stderr
    assert "stopped with exit code 2" in data.stderr


def test_a_single_machine_launch_takes_a_free_port_unless_told_one(monkeypatch):
    """Accelerate's fixed default port made a second multi-process run on the same machine fail."""
    import socket

    from finetune.cli import launch as launch_module

    calls = []
    monkeypatch.setattr(launch_module.subprocess, "call", lambda cmd, env: calls.append(cmd) or 0)
    common = dict(num_processes=2, num_machines=1, machine_rank=0, main_process_ip=None)
    for _ in range(2):
        launch_module.launch(["run", "r.toml"], main_process_port=None, **common)
    ports = [int(cmd[cmd.index("--main_process_port") + 1]) for cmd in calls]
    for port in ports:  # free now: it can be bound
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    launch_module.launch(["run", "r.toml"], main_process_port=29999, **common)
    assert calls[-1][calls[-1].index("--main_process_port") + 1] == "29999"
    launch_module.launch(["run", "r.toml"], main_process_port=None, **{**common, "num_machines": 2})
    assert "--main_process_port" not in calls[-1]  # several machines: the user must name the port
