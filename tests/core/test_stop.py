"""Preemption and hostile disks: SIGTERM to a real `finetune run` process, a read-only output folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, make_sentiment_rows, run_cli, write_csv
from safetensors.torch import load_file

from finetune.engine.console import Console
from finetune.engine.run_folder import RunDir
from finetune.errors import RunError
from finetune.run.training import run_recipe


def test_sigterm_checkpoints_exits_in_bounded_time_and_resumes(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe(train="epochs = 20\ncheckpoint_every_steps = 1000\nlog_every_steps = 1")
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", str(recipe)], cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(r.get("kind") == "train" for r in run.read_metrics_log()) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a cluster scheduler sends before preempting the job
    sent = time.perf_counter()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("finetune run did not exit within 30 s of SIGTERM")
    elapsed = time.perf_counter() - sent
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGTERM received" in stderr and "the run is resumable" in stderr and "Traceback" not in stderr
    assert run.status == "interrupted"
    latest = run.latest_checkpoint()
    assert latest is not None
    stopped_at = json.loads((latest / "loop_state.json").read_text())["global_step"]
    assert stopped_at < 160  # 20 epochs x 8 steps: it stopped mid-run
    assert stopped_at >= max(r["step"] for r in run.read_metrics_log())  # nothing trained after it is lost
    load_file(str(latest / "trainable.safetensors"))
    print(f"SIGTERM -> exit in {elapsed:.2f} s, checkpoint at step {stopped_at}")

    # the data changed meanwhile: resuming is refused, naming the file
    original = sentiment_csv.read_bytes()
    write_csv(sentiment_csv, make_sentiment_rows(160, seed=7))
    refused = run_cli("run", str(recipe), "--resume")
    assert refused.returncode == 2 and f"data.train: {sentiment_csv} changed" in refused.stderr
    # the same content again (a newer mtime does not matter): the run resumes and finishes
    sentiment_csv.write_bytes(original)
    resumed = run_cli("run", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from {latest.name}" in resumed.stdout
    assert run.is_finished()
    assert json.loads(run.metrics_file.read_text())["train"]["steps"] == 160


def _failing_on(call: int, where: str, monkeypatch, error: OSError):
    """Make the ``call``-th atomic replace into ``where`` (checkpoints / adapter) fail with ``error``."""
    from finetune.engine import run_folder as runs
    from finetune.run import adapter as runner

    real = runs.replace_dir_atomic
    calls = {"n": 0}

    def replace(tmp, final):
        if (final.parent.name if where == "checkpoints" else final.name) == where:
            calls["n"] += 1
            if calls["n"] == call:
                raise error
        return real(tmp, final)

    monkeypatch.setattr(runs, "replace_dir_atomic", replace)
    monkeypatch.setattr(runner, "replace_dir_atomic", replace)


def test_read_only_checkpoint_folder_keeps_the_previous_checkpoint(make_recipe, tmp_path, monkeypatch):
    recipe = make_recipe()  # checkpoints at steps 3, 6, 8 (epoch end), ...
    _failing_on(2, "checkpoints", monkeypatch, OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(RunError) as info:
        run_recipe(recipe, [], console=Console(enabled=False))
    run = RunDir(tmp_path / "run")
    assert str(info.value).startswith(f"cannot write checkpoint {run.checkpoints_dir / 'ckpt-00000006'} "
                                      "(Read-only file system); the previous checkpoint ckpt-00000003 is intact")
    assert "--resume" in str(info.value)
    assert [c.name for c in run.checkpoints()] == ["ckpt-00000003"]
    load_file(str(run.checkpoints()[0] / "trainable.safetensors"))
    assert not list(run.checkpoints_dir.glob(".tmp-*"))
    assert run.status == "failed"
    monkeypatch.undo()  # writable again: the run resumes from the intact checkpoint
    resumed = run_recipe(recipe, [], resume=True, console=Console(enabled=False))
    assert resumed.is_finished()


def test_unwritable_adapter_folder_keeps_the_previous_adapter(tiny_bert, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from finetune.run.adapter import adapter_writer as _save_adapter_fn
    from finetune.run.adapter import expected_adapter_tensors

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))

    class FakeTask:
        name, state = "text-classification", {"labels": ["neg", "pos"]}

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save = _save_adapter_fn(run, FakeTask(), None, "lora", expected_adapter_tensors(model, "lora"))
    save(model)
    before = {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()}
    _failing_on(1, "adapter", monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(RunError) as info:
        save(model)
    assert str(info.value).startswith(f"cannot write the adapter to {run.adapter_dir} (Permission denied); the "
                                      "previous adapter is intact")
    assert {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()} == before
    assert not list(run.path.glob(".adapter*"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod; the "
                    "monkeypatched tests above cover the same path")
def test_real_read_only_checkpoints_folder(make_recipe, tmp_path, monkeypatch):
    from finetune.engine.run_folder import RunDir as RealRunDir

    recipe = make_recipe()
    real = RealRunDir.write_checkpoint
    calls = {"n": 0}

    def write_checkpoint(self, step, writer, keep):
        calls["n"] += 1
        if calls["n"] == 2:
            os.chmod(self.checkpoints_dir, 0o555)
        return real(self, step, writer, keep)

    monkeypatch.setattr(RealRunDir, "write_checkpoint", write_checkpoint)
    run = RunDir(tmp_path / "run")
    try:
        with pytest.raises(RunError, match="the previous checkpoint ckpt-00000003 is intact"):
            run_recipe(recipe, [], console=Console(enabled=False))
        assert [c.name for c in run.checkpoints()] == ["ckpt-00000003"]
    finally:
        os.chmod(run.checkpoints_dir, 0o755)
