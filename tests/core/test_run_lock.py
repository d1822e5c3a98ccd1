"""One training process per run folder: a second `finetune run` on a folder in use is refused (naming the
pid) and the first is unharmed; a killed holder's lock does not count; validate needs no lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli
from fake_plugins import make_dist

from finetune.engine import run_lock
from finetune.engine.console import Console
from finetune.engine.run_folder import RunDir
from finetune.engine.run_lock import LOCK_FILE, RunLock, holder_now
from finetune.errors import RunError
from finetune.run.training import run_recipe

HOLD = ("import sys; from finetune.engine.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); sys.stdin.read()")

#: Holds a run at each logged step while the gate file exists; changes nothing else.
GATE = '''
import os
import time

from finetune import hookimpl

finetune_hook_version = "1"


class Gate:
    def on_log(self, *, run, state, logs):
        while os.path.exists(os.environ["FINETUNE_TEST_GATE"]):
            time.sleep(0.05)


@hookimpl
def finetune_register_callbacks(register):
    register(Gate())
'''


def hold_lock(folder):
    """Another process holding ``folder``'s lock (until its stdin closes or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_is_refused_naming_the_pid_and_a_killed_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        assert holder_now(folder)["pid"] == holder.pid
        with pytest.raises(RunError) as info:
            RunLock(folder).acquire()
        message = str(info.value)
        assert message.startswith(f"output.dir: {folder} is in use: another finetune run (pid {holder.pid}, since ")
        assert f"kill {holder.pid}" in message and "choose another output.dir" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_FILE).exists()  # kill -9 leaves the file, but not the lock
    assert holder_now(folder) is None
    lock = RunLock(folder)
    lock.acquire()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunError, match=f"pid {os.getpid()}"):  # one process, two runs: refused too
        RunLock(folder).acquire()
    lock.release()
    assert list(folder.iterdir()) == []
    fresh = RunLock(tmp_path / "fresh")
    fresh.acquire()
    fresh.release()
    assert not fresh.folder.exists()  # the lock made the folder, and nothing else was written to it


def test_a_record_counts_only_while_its_process_lives(tmp_path, monkeypatch):
    """Without flock (no fcntl, or a file system without locks) the record decides: pid and start time."""
    monkeypatch.setattr(run_lock, "_flock", lambda fd, exclusive: None)
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": sleeper.pid, "started": run_lock._start_time(sleeper.pid), "host": socket.gethostname(),
                  "since": time.time() - 5}
        (folder / LOCK_FILE).write_text(json.dumps(record))
        assert holder_now(folder)["pid"] == sleeper.pid
        assert holder_now(folder, locked_before=time.time() - 10) is None  # locked after this run began
        with pytest.raises(RunError, match=f"pid {sleeper.pid}"):
            RunLock(folder).acquire()
        if record["started"] is not None:  # the same pid, another process (a pid is reused)
            (folder / LOCK_FILE).write_text(json.dumps({**record, "started": record["started"] - 1}))
            assert holder_now(folder) is None
            (folder / LOCK_FILE).write_text(json.dumps(record))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert holder_now(folder) is None  # its process is gone
    lock = RunLock(folder)
    lock.acquire()
    lock.release()


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_unharmed(make_recipe, tmp_path):
    site = make_dist(tmp_path / "site", "gate-dist", {"gate": "gate_plugin"}, {"gate_plugin": GATE})
    gate = tmp_path / "gate"
    gate.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "FINETUNE_TEST_GATE": str(gate)}
    recipe = make_recipe(train="epochs = 1")
    run = RunDir(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", str(recipe)], cwd=str(REPO), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not any(r.get("kind") == "train" for r in run.read_metrics_log()):  # held at its first log
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run did not start training"
            time.sleep(0.1)
        assert run.status == "running"
        before = {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()}
        for flags in ([], ["--overwrite"], ["--resume"]):
            second = run_cli("run", str(recipe), *flags)
            assert second.returncode == 2, second.stderr[-3000:]
            assert second.stderr.startswith(f"error: output.dir: {run.path} is in use: another finetune run "
                                            f"(pid {first.pid}, since "), second.stderr
            assert "Traceback" not in second.stderr
        assert run_cli("validate", str(recipe)).returncode == 0  # reads only: no lock needed
        assert {p.name: p.stat().st_mtime_ns for p in run.path.iterdir()} == before
    finally:
        gate.unlink()
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert run.is_finished() and not (run.path / LOCK_FILE).exists()
    lone = run_recipe(make_recipe(train="epochs = 1", name="lone.toml", output=str(tmp_path / "lone")), [],
                      console=Console(enabled=False))
    ours, theirs = (json.loads(r.metrics_file.read_text()) for r in (run, lone))
    for key in ("best", "last", "before"):
        assert ours[key] == theirs[key], key
