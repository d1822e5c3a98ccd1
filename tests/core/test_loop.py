"""The training loop on a tiny fixture model: learning, checkpoints, resume, interruption, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from safetensors.torch import load_file

from finetune.engine.console import Console
from finetune.engine.run_folder import RunDir
from finetune.engine.run_lock import LOCK_FILE
from finetune.engine.stop import Interrupted
from finetune.errors import PluginError, RunError, TrainingError
from finetune.run.training import run_recipe

QUIET = Console(quiet=True)


def adapter_tensors(run: RunDir) -> dict:
    return load_file(str(run.adapter_dir / "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= atol, key


def test_training_learns_and_writes_complete_run_folder(make_recipe):
    # Every fixture text has the same length, so length grouping would only reorder the batches; the
    # accuracy bar below was set with the plain shuffled order (on 40 eval examples the order alone moves
    # accuracy by several points). 8 epochs: after 4, seeds 0-5 ended anywhere from 0.58 to 0.90 (the
    # dropout masks alone move it that much); after 8, from 0.80 to 0.95.
    run = run_recipe(make_recipe(train="epochs = 8\ngroup_by_length = false"), [], console=QUIET)
    assert run.is_finished()
    for name in ("recipe.toml", "run.json", "metrics.jsonl", "metrics.json", "curves.png", "README.md"):
        assert (run.path / name).exists(), name
    assert (run.adapter_dir / "adapter_config.json").exists()
    assert (run.adapter_dir / "finetune_task.json").exists()
    log = [r for r in run.read_metrics_log() if r["kind"] == "train"]
    assert log[-1]["loss"] < log[0]["loss"]
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["best"]["accuracy"] >= 0.75  # chance is 0.5
    assert metrics["baseline"]["name"]
    assert 0 < metrics["params"]["trainable"] < metrics["params"]["total"]
    assert metrics["train"]["steps"] == metrics["train"]["steps_planned"]
    info = run.info()
    assert info["status"] == "finished"
    assert any(p["name"] == "nlp" for p in info["plugins"])
    assert info["backbone"]["source"].startswith("local folder")
    card = run.card_file.read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "text-classification" in card


def test_keeps_only_the_last_k_checkpoints(make_recipe):
    run = run_recipe(make_recipe(train="keep_checkpoints = 2"), [], console=QUIET)
    ckpts = run.checkpoints()
    assert len(ckpts) == 2
    assert not list(run.checkpoints_dir.glob(".tmp-*"))
    state = json.loads((ckpts[-1] / "loop_state.json").read_text())
    assert state["global_step"] == json.loads(run.metrics_file.read_text())["train"]["steps"]


def test_interrupt_then_resume_equals_uninterrupted_run(make_recipe, tmp_path, callback_plugin):
    full = run_recipe(make_recipe(output=str(tmp_path / "full"), name="full.toml"), [], console=QUIET)

    class CtrlCAtStep5:
        def on_log(self, run, state, logs):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    callback_plugin.callbacks = [CtrlCAtStep5()]
    recipe = make_recipe(output=str(tmp_path / "cut"), name="cut.toml")
    with pytest.raises(Interrupted, match="resumable"):
        run_recipe(recipe, [], console=QUIET)
    cut = RunDir(tmp_path / "cut")
    assert cut.status == "interrupted"
    assert not cut.metrics_file.exists() and not cut.card_file.exists()
    assert json.loads((cut.latest_checkpoint() / "loop_state.json").read_text())["global_step"] == 4
    callback_plugin.callbacks = []
    resumed = run_recipe(recipe, [], console=QUIET)  # same command, no --resume: continues
    assert resumed.is_finished()
    assert_same_tensors(adapter_tensors(full), adapter_tensors(resumed))
    m_full, m_res = (json.loads(r.metrics_file.read_text()) for r in (full, resumed))
    assert m_full["best"] == m_res["best"] and m_full["last"] == m_res["last"]
    steps = [r["step"] for r in resumed.read_metrics_log() if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"


def test_crash_resumes_from_last_periodic_checkpoint(make_recipe, tmp_path, callback_plugin):
    full = run_recipe(make_recipe(output=str(tmp_path / "full"), name="full.toml"), [], console=QUIET)

    class Crash:
        def on_log(self, run, state, logs):
            if state.global_step == 8:
                raise RuntimeError("simulated crash")

    callback_plugin.callbacks = [Crash()]
    recipe = make_recipe(output=str(tmp_path / "crash"), name="crash.toml")
    with pytest.raises(Exception, match="simulated crash"):
        run_recipe(recipe, [], console=QUIET)
    crashed = RunDir(tmp_path / "crash")
    assert crashed.status == "failed"
    assert json.loads((crashed.latest_checkpoint() / "loop_state.json").read_text())["global_step"] == 6
    callback_plugin.callbacks = []
    resumed = run_recipe(recipe, [], resume=True, console=QUIET)
    assert_same_tensors(adapter_tensors(full), adapter_tensors(resumed))


def test_kill_9_mid_training_leaves_a_resumable_run(make_recipe, tmp_path):
    recipe = make_recipe(train="epochs = 40\ncheckpoint_every_steps = 2\nlog_every_steps = 1",
                         output=str(tmp_path / "killed"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", str(recipe)], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = RunDir(tmp_path / "killed")
    deadline = time.time() + 120
    while time.time() < deadline and len(run.checkpoints()) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run.status == "running" and not run.is_finished()
    assert json.loads((run.path / LOCK_FILE).read_text())["pid"] == proc.pid  # its record stays, its lock not
    step = json.loads((run.latest_checkpoint() / "loop_state.json").read_text())["global_step"]
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(recipe), "--resume",
                             "--set", "train.epochs=40"], cwd=str(REPO), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"Resuming from ckpt-{step:08d}" in result.stdout
    assert run.is_finished() and not (run.path / LOCK_FILE).exists()


def test_corrupt_checkpoint_is_named(make_recipe, tmp_path, callback_plugin):
    class CtrlC:
        def on_log(self, run, state, logs):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    callback_plugin.callbacks = [CtrlC()]
    recipe = make_recipe()
    with pytest.raises(Interrupted):
        run_recipe(recipe, [], console=QUIET)
    callback_plugin.callbacks = []
    run = RunDir(tmp_path / "run")
    bad = run.latest_checkpoint() / "optimizer.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="optimizer.pt"):
        run_recipe(recipe, [], console=QUIET)


def test_finished_run_is_not_overwritten_without_flag(make_recipe):
    recipe = make_recipe(train="epochs = 1")
    run = run_recipe(recipe, [], console=QUIET)
    before = run.metrics_file.read_text()
    with pytest.raises(RunError, match="--overwrite"):
        run_recipe(recipe, [], console=QUIET)
    assert run.metrics_file.read_text() == before
    again = run_recipe(recipe, [], overwrite=True, console=QUIET)
    assert again.is_finished()


def test_non_finite_loss_stops_with_a_clear_message(make_recipe, monkeypatch):
    import torch

    from finetune_nlp.text_classification import TextClassification

    def nan_loss(self, model, batch):
        return model(**batch).loss * torch.tensor(float("nan"))

    monkeypatch.setattr(TextClassification, "training_loss", nan_loss)
    with pytest.raises(TrainingError, match=r"loss became nan at step 1.*learning_rate"):
        run_recipe(make_recipe(), [], console=QUIET)


def test_early_stopping_and_step_evaluation(make_recipe, monkeypatch):
    from finetune_nlp.text_classification import TextClassification

    monkeypatch.setattr(TextClassification, "compute_metrics",
                        lambda self, p, r: {"accuracy": 0.5})  # never improves
    run = run_recipe(make_recipe(train="epochs = 5\neval_every_steps = 2\nearly_stopping_patience = 2"), [],
                     console=QUIET)
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["train"]["stopped_early"] is True
    assert metrics["train"]["steps"] < metrics["train"]["steps_planned"]
    evals = [r for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert [e["step"] for e in evals][:4] == [0, 2, 4, 6]  # step 0: before training
    assert metrics["best"]["step"] == 2


def test_callback_can_stop_training(make_recipe, callback_plugin):
    class StopAt3:
        def on_log(self, run, state, logs):
            if state.global_step >= 3:
                state.should_stop = True

    callback_plugin.callbacks = [StopAt3()]
    run = run_recipe(make_recipe(), [], console=QUIET)
    metrics = json.loads(run.metrics_file.read_text())
    assert run.is_finished() and metrics["train"]["steps"] == 4  # log_every_steps = 2: first log at/after 3
    assert metrics["last"]["step"] == 4


def test_gradient_accumulation_counts_optimizer_steps(make_recipe):
    run = run_recipe(make_recipe(train="gradient_accumulation_steps = 2\nepochs = 1"), [], console=QUIET)
    metrics = json.loads(run.metrics_file.read_text())
    # 120 training rows / batch 16 = 8 micro-batches -> 4 optimizer steps
    assert metrics["train"]["steps"] == 4
    assert metrics["train"]["samples_seen"] == 120


def test_resume_with_more_epochs_is_allowed_and_recorded(make_recipe, tmp_path, callback_plugin):
    class CtrlC:
        def on_log(self, run, state, logs):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    callback_plugin.callbacks = [CtrlC()]
    recipe = make_recipe()
    with pytest.raises(Interrupted):
        run_recipe(recipe, [], console=QUIET)
    callback_plugin.callbacks = []
    with pytest.raises(RunError, match=r"(?s)train.learning_rate: 0.01 -> 0.5.*Keys that may change on resume"):
        run_recipe(recipe, ["train.learning_rate=0.5"], console=QUIET)
    run = run_recipe(recipe, ["train.epochs=3"], console=QUIET)
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["train"]["epochs_completed"] == 3 and metrics["train"]["steps"] == 24
    assert run.info()["recipe_changes"] == ["train.epochs: 2 -> 3"]
    assert "epochs = 3" in run.recipe_file.read_text()


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_previous_checkpoint(make_recipe, monkeypatch,
                                                                                         tmp_path):
    import errno

    import finetune.engine.loop as loop_module

    real_save = loop_module.save_rng_state
    calls = {"n": 0}

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path)

    monkeypatch.setattr(loop_module, "save_rng_state", flaky)
    with pytest.raises(RunError, match=r"No space left on device.*ckpt-00000003 is intact.*--resume"):
        run_recipe(make_recipe(), [], console=QUIET)
    run = RunDir(tmp_path / "run")
    assert run.status == "failed"
    assert [c.name for c in run.checkpoints()] == ["ckpt-00000003"]
    assert not list(run.checkpoints_dir.glob(".tmp-*"))
    monkeypatch.setattr(loop_module, "save_rng_state", real_save)
    assert run_recipe(make_recipe(), [], resume=True, console=QUIET).is_finished()


def test_resume_repairs_what_a_kill_mid_replace_leaves(make_recipe, tmp_path, callback_plugin):
    class CtrlC:
        def on_log(self, run, state, logs):
            if state.global_step == 10:
                os.kill(os.getpid(), signal.SIGINT)

    callback_plugin.callbacks = [CtrlC()]
    recipe = make_recipe()
    with pytest.raises(Interrupted):
        run_recipe(recipe, [], console=QUIET)
    callback_plugin.callbacks = []
    run = RunDir(tmp_path / "run")
    # as if killed between the two renames of an adapter replace, and while writing a temp folder
    run.adapter_dir.rename(run.path / ".adapter.old-999")
    (run.path / ".adapter.tmp-998").mkdir()
    (run.path / ".run.json.tmp-997").write_text("{")
    run.lock()
    run.prepare(json.loads(json.dumps(__import__("tomllib").loads(run.recipe_file.read_text()))),
                run.recipe_file.read_text(), overwrite=False, resume=True)
    run.unlock()
    assert (run.adapter_dir / "adapter_config.json").exists()
    assert not [p.name for p in run.path.glob(".*")]


def test_the_untouched_model_is_evaluated_before_training_and_reported_as_before(make_recipe, callback_plugin):
    seen = []

    class Evaluations:
        def on_evaluate(self, run, state, metrics):
            seen.append(state.global_step)

    callback_plugin.callbacks = [Evaluations()]
    run = run_recipe(make_recipe(train="epochs = 2"), [], console=QUIET)
    evals = [r for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert [r["step"] for r in evals][0] == 0 and seen[0] == 0 and len(seen) == len(evals) == 3
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["before"]["step"] == 0 and metrics["before"]["accuracy"] == evals[0]["accuracy"]
    assert metrics["best"]["step"] > 0  # "before" is reported, never selected
    assert "| metric | before training (eval) | selected (eval) | last (eval) |" in run.card_file.read_text()


def test_evaluating_never_changes_what_training_does(make_recipe, tmp_path):
    """The step-0 evaluation (and evaluating every step) leaves the random states as they were: the same
    adapter with and without them, dropout on."""
    runs = {}
    for name, train in (("plain", "eval_before_training = false"),
                        ("evaluated", "eval_before_training = true\neval_every_steps = 1")):
        runs[name] = run_recipe(make_recipe(train=train, name=f"{name}.toml", output=str(tmp_path / name)), [],
                                console=QUIET)
    evals = [r for r in runs["evaluated"].read_metrics_log() if r["kind"] == "eval"]
    assert len(evals) > len([r for r in runs["plain"].read_metrics_log() if r["kind"] == "eval"]) + 3
    assert json.loads(runs["plain"].metrics_file.read_text())["before"] == {}
    final = {name: load_file(str(r.checkpoints()[-1] / "trainable.safetensors")) for name, r in runs.items()}
    assert_same_tensors(final["plain"], final["evaluated"], atol=0)


def test_a_resumed_run_does_not_evaluate_before_training_again(make_recipe, tmp_path, callback_plugin):
    class CrashOnce:
        crashed = False

        def on_checkpoint(self, run, state, path):
            if not CrashOnce.crashed:
                CrashOnce.crashed = True
                raise RuntimeError("simulated crash")

    callback_plugin.callbacks = [CrashOnce()]
    recipe = make_recipe()
    with pytest.raises(Exception, match="simulated crash"):
        run_recipe(recipe, [], console=QUIET)
    run = run_recipe(recipe, [], resume=True, console=QUIET)
    steps = [r["step"] for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert steps.count(0) == 1 and json.loads(run.metrics_file.read_text())["before"]["step"] == 0


# -- loss reads, heap trims, training time --------------------------------------------------------

def test_deferred_loss_reads_still_stop_a_bad_run_before_its_checkpoint(make_recipe, monkeypatch):
    """As on a GPU: losses are read only at log/eval/checkpoint points. A NaN at step 4 (between
    the step-3 checkpoint and the step-6 one) is reported with its step, and no checkpoint holds it."""
    import torch
    from safetensors.torch import load_file

    from finetune.engine import loop
    from finetune.engine.run_folder import RunDir
    from finetune.errors import TrainingError
    from finetune_nlp.text_classification import TextClassification

    monkeypatch.setattr(loop, "READ_LOSS_EVERY_STEP", False)
    calls = {"n": 0}
    original = TextClassification.training_loss

    def flaky(self, model, batch):
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * torch.tensor(float("nan")) if calls["n"] >= 4 else loss

    monkeypatch.setattr(TextClassification, "training_loss", flaky)
    recipe = make_recipe(train="log_every_steps = 5\ncheckpoint_every_steps = 3\nepochs = 3")
    with pytest.raises(TrainingError, match=r"loss became nan at step 4 "):
        run_recipe(recipe, [], console=QUIET)
    run = RunDir(recipe.parent / "run")
    ckpt = run.latest_checkpoint()
    assert ckpt is not None and ckpt.name.endswith("3")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_freed_heap_pages_are_released_around_every_evaluation(make_recipe, monkeypatch):
    """Before and after each evaluation the loop hands the heap's free pages back (glibc malloc_trim), so
    training's freed buffers do not raise the evaluation's peak resident memory, nor the eval's larger
    batches the peak of the training that follows."""
    import platform
    import sys

    from finetune.engine import evaluation

    calls = []
    real = evaluation.release_freed_memory
    monkeypatch.setattr(evaluation, "release_freed_memory", lambda: calls.append(real()) or calls[-1])
    run = run_recipe(make_recipe(train="epochs = 2\neval_every_steps = 3"), [], console=Console(quiet=True))
    evals = [r for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert len(calls) == 2 * len(evals) >= 6
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        from finetune.engine.memory import heap_trimming_available

        assert heap_trimming_available() and all(isinstance(c, bool) for c in calls)


def test_training_time_counts_batch_loading_but_not_evaluation(make_recipe, monkeypatch):
    """train.samples_per_s compares with a Trainer's train() time: loading and collating batches is part
    of it, evaluation is not."""
    import time

    from finetune_nlp.text_classification import TextClassification

    pause, collates, evals = 0.03, [], []
    make_collate, evaluation_step = TextClassification.collate_fn, TextClassification.evaluation_step

    def slow_collate_fn(self, processor):
        fn = make_collate(self, processor)
        return lambda items: (collates.append(time.sleep(pause)), fn(items))[1]

    def slow_evaluation_step(self, model, batch):
        evals.append(time.sleep(4 * pause))
        return evaluation_step(self, model, batch)

    monkeypatch.setattr(TextClassification, "collate_fn", slow_collate_fn)
    monkeypatch.setattr(TextClassification, "evaluation_step", slow_evaluation_step)
    run = run_recipe(make_recipe(), [], console=QUIET)
    train = json.loads((run.path / "metrics.json").read_text())["train"]
    train_collates = len(collates) - len(evals)  # every evaluated batch was collated once too
    assert train_collates >= train["steps"] > 0
    assert train["train_time_s"] >= train_collates * pause
    assert train["train_time_s"] < train["wall_time_s"] - len(evals) * 5 * pause



def test_a_task_s_training_logs_reach_the_log_and_callbacks_and_bad_keys_are_named(make_recipe, callback_plugin,
                                                                                   monkeypatch):
    """``Task.training_logs``: the task's own numbers join every logged step (metrics log, on_log)."""
    from finetune.engine.plugins import get_registry

    class Seen:
        def __init__(self):
            self.logs = []

        def on_log(self, run, state, logs):
            self.logs.append(dict(logs))

    seen = Seen()
    callback_plugin.callbacks = [seen]
    cls = get_registry().get_task("text-classification")
    calls = []

    def training_logs(self):
        calls.append(1)
        return {"my_number": float(len(calls))}

    monkeypatch.setattr(cls, "training_logs", training_logs, raising=False)
    run = run_recipe(make_recipe(train="epochs = 1"), [], console=QUIET)
    train = [r for r in run.read_metrics_log() if r["kind"] == "train"]
    assert len(train) >= 2
    assert [r["my_number"] for r in train] == [float(i + 1) for i in range(len(train))]
    assert [r["my_number"] for r in seen.logs] == [r["my_number"] for r in train]

    monkeypatch.setattr(cls, "training_logs", lambda self: {"loss": 1.0}, raising=False)
    with pytest.raises(PluginError, match="training_logs returned the key 'loss'"):
        run_recipe(make_recipe(train="epochs = 1"), ["output.dir=" + str(run.path) + "-2"], console=QUIET)
