"""kill -9 at random moments (training, evaluation, checkpoint writing), again and again: the run
folder is never corrupt, and the resumed run ends with the same adapter and metrics as an
uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import REPO
from safetensors.torch import load_file

from finetune.engine.run_folder import RunDir


def start(recipe, *extra):
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", str(recipe), *extra], cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_not_corrupt(run: RunDir) -> None:
    if not run.path.exists():
        return  # killed before the folder was created: nothing to corrupt
    json.loads(run.run_file.read_text())  # run.json always parses (atomic writes)
    for ckpt in run.checkpoints():  # every listed checkpoint is complete and loadable
        state = json.loads((ckpt / "loop_state.json").read_text())
        assert state["global_step"] > 0
        load_file(str(ckpt / "trainable.safetensors"))
    # Final files appear only at the end: metrics.json, curves and card are written in the last
    # milliseconds before run.json says "finished"; a kill inside that window leaves them with an
    # unfinished status, and the resume removes and rewrites them. Outside it they never exist early.
    if not run.is_finished() and run.metrics_file.exists():
        assert run.read_metrics_log()[-1]["step"] == json.loads(run.metrics_file.read_text())["train"]["steps"]


def max_logged_step(run: RunDir) -> int:
    return max((r["step"] for r in run.read_metrics_log() if r["kind"] == "train"), default=0)


def test_repeated_kill_9_then_resume_equals_uninterrupted(make_recipe, tmp_path):
    settings = 'epochs = 12\ncheckpoint_every_steps = 2\neval_every_steps = 3\nlog_every_steps = 1'
    reference = make_recipe(train=settings, name="ref.toml", output=str(tmp_path / "ref"))
    assert subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(reference)], cwd=str(REPO),
                          capture_output=True).returncode == 0
    recipe = make_recipe(train=settings, name="killed.toml", output=str(tmp_path / "killed"))
    run = RunDir(tmp_path / "killed")
    rng = random.Random(1234)
    kills, steps_at_kill = 0, []
    deadline = time.time() + 180
    while time.time() < deadline and kills < 4 and not run.is_finished():  # a kill may land after the end
        # Kill once this process has trained a random 1-8 steps past everything logged so far, plus a
        # random few milliseconds (to land inside evaluation and checkpoint writes too). Counting steps
        # rather than seconds keeps several kills inside the 96 steps however fast the machine is.
        target = max_logged_step(run) + rng.randint(1, 8)
        proc = start(recipe)
        while max_logged_step(run) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        latest = run.latest_checkpoint()
        steps_at_kill.append(json.loads((latest / "loop_state.json").read_text())["global_step"] if latest else 0)
        assert_not_corrupt(run)
    final = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(recipe)], cwd=str(REPO),
                           capture_output=True, text=True, timeout=600)
    if not run.is_finished():
        assert final.returncode == 0, final.stderr[-2000:]
    print(f"kills: {kills}, last complete checkpoint at each kill: {steps_at_kill}")
    assert kills >= 3 and len(set(steps_at_kill)) >= 2, steps_at_kill  # killed at several different points (96 steps)
    assert run.is_finished()
    ref_run = RunDir(tmp_path / "ref")
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (ref_run, run))
    for key in a:
        assert (a[key] - b[key]).abs().max().item() == 0.0, key
    m_ref, m_killed = (json.loads(r.metrics_file.read_text()) for r in (ref_run, run))
    assert m_ref["best"] == m_killed["best"] and m_ref["last"] == m_killed["last"]
    steps = [r["step"] for r in run.read_metrics_log() if r["kind"] == "train"]
    assert steps == sorted(set(steps))
    leftovers = [p.name for p in run.path.rglob(".*") if p.name not in (".", "..")]
    assert not [p for p in leftovers if ".tmp" in p], leftovers
    assert os.path.exists(run.adapter_dir / "adapter_config.json")
