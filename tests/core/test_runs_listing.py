"""`finetune runs [DIR]`: one real finished run plus hand-made unfinished, corrupt and running folders."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_sentiment_rows, run_cli, write_csv

from finetune.engine.console import Console
from finetune.errors import RunError
from finetune.run.listing import find_run_folders, list_runs, rich_table, sort_rows
from finetune.run.training import run_recipe

NOW = time.time()
OLD = dt.datetime(2020, 3, 4, 5, 6).timestamp()  # local time
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _checkpoint(run: Path, step: int, **state) -> Path:
    ckpt = run / "checkpoints" / f"ckpt-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "loop_state.json").write_text(json.dumps({"global_step": step, **state}))
    return ckpt


def _hand_made(root: Path, name: str, recipe: str, run_json: str | dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(recipe)
    (folder / "run.json").write_text(run_json if isinstance(run_json, str) else json.dumps(run_json))
    return folder


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_bert):
    """A folder of runs: a real finished one (trained on the tiny fixtures) and hand-made others."""
    import tomli_w

    tmp = tmp_path_factory.mktemp("listing")
    root = tmp / "runs"
    data = write_csv(tmp / "data" / "train.csv", make_sentiment_rows(64))
    recipe = tmp / "recipe.toml"
    recipe.write_text(tomli_w.dumps({
        "task": {"name": "text-classification"}, "model": {"backbone": str(tiny_bert)},
        "data": {"train": str(data), "split": 0.25, "max_length": 16}, "peft": {"r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no", "seed": 0},
        "output": {"dir": str(root / "finished")}}))
    finished = run_recipe(recipe, [], console=Console(enabled=False)).path
    text = (finished / "recipe.toml").read_text()
    custom = text.replace('[train]\n', '[train]\nmetric = "eval_loss"\n', 1)
    assert custom != text

    # interrupted with a complete checkpoint (the selection metric named by the recipe): resumable
    resumable = _hand_made(root, "group/resumable", custom, {"status": "interrupted", "created_at": NOW - 3600})
    _checkpoint(resumable, 2, best_metric=0.25, best_step=2, train_time_s=12.5,
                best_eval={"step": 2, "eval_loss": 0.25, "accuracy": 0.5})
    # killed (run.json still says running, nobody holds the lock), only a half-written checkpoint: incomplete
    incomplete = _hand_made(root, "incomplete", text, {"status": "running", "created_at": NOW - 7200})
    (incomplete / "checkpoints" / "ckpt-00000003").mkdir(parents=True)  # no loop_state.json: not complete
    # failed, with a checkpoint and the task's default metric (found in the best evaluation by its value)
    failed = _hand_made(root, "failed", text, {"status": "failed", "created_at": NOW - 60,
                                                "error": "TrainingError: loss became nan at step 5"})
    _checkpoint(failed, 4, best_metric=0.75, best_step=4, train_time_s=3.0,
                best_eval={"step": 4, "eval_loss": 0.5, "accuracy": 0.75})
    # corrupt files
    corrupt = _hand_made(root, "corrupt-run-json", text, "{not json")
    os.utime(corrupt / "recipe.toml", (NOW - 50, NOW - 50))  # with no created_at, the recipe's time is shown
    bad_metrics = _hand_made(root, "corrupt-metrics", text, {"status": "finished", "created_at": NOW - 10})
    (bad_metrics / "metrics.json").write_text("[1, 2")
    _hand_made(root, "corrupt-recipe", "this is = = not toml", {"status": "interrupted", "created_at": NOW - 20})
    # not runs: skipped
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("hello")
    _hand_made(root, ".finished.overwritten-1", text, {"status": "finished"})  # hidden: a run's leftovers
    _hand_made(root, "only-recipe", text, {})
    (root / "only-recipe" / "run.json").unlink()
    # deep: 4 levels below is found, 5 is not
    _hand_made(root, "a/b/c/deep", text, {"status": "interrupted", "created_at": OLD})
    _hand_made(root, "a/b/c/d/too-deep", text, {"status": "interrupted", "created_at": NOW - 40})
    return root


def by_name(rows):
    return {r.name: r for r in rows}


def test_finds_run_folders_and_skips_the_rest(runs_root):
    names = sorted(p.relative_to(runs_root).as_posix() for p in find_run_folders(runs_root))
    assert names == ["a/b/c/deep", "corrupt-metrics", "corrupt-recipe", "corrupt-run-json", "failed", "finished",
                     "group/resumable", "incomplete"]
    # a run folder itself lists just that run
    assert [r.name for r in list_runs(runs_root / "finished")] == ["."]
    assert by_name(list_runs(runs_root))["a/b/c/deep"].started_local == "2020-03-04 05:06"  # another year: in full


def test_finished_run_columns_come_from_its_files(runs_root, tiny_bert):
    row = by_name(list_runs(runs_root))["finished"]
    metrics = json.loads((runs_root / "finished" / "metrics.json").read_text())
    info = json.loads((runs_root / "finished" / "run.json").read_text())
    assert row.task == "text-classification"
    assert row.backbone == str(tiny_bert)
    assert (row.status, row.recorded_status, row.resumable) == ("finished", "finished", False)
    assert row.metric == metrics["selection_metric"] == "accuracy"
    assert row.mode == "max"
    assert row.best == pytest.approx(metrics["best"]["accuracy"])
    assert row.best_step == metrics["best"]["step"]
    assert row.started == pytest.approx(info["created_at"])
    assert row.started_local == dt.datetime.fromtimestamp(info["created_at"]).strftime("%m-%d %H:%M")  # this year
    assert row.duration_s == pytest.approx(metrics["train"]["wall_time_s"])
    assert row.problems == []


def test_unfinished_runs_are_marked_resumable_or_incomplete(runs_root):
    rows = by_name(list_runs(runs_root))
    resumable = rows["group/resumable"]
    assert (resumable.status, resumable.recorded_status, resumable.resumable) == ("resumable", "interrupted", True)
    assert (resumable.metric, resumable.best, resumable.best_step) == ("eval_loss", 0.25, 2)  # the recipe's metric
    assert resumable.duration_s == 12.5  # training time so far
    incomplete = rows["incomplete"]
    assert (incomplete.status, incomplete.resumable, incomplete.best) == ("incomplete", False, None)
    failed = rows["failed"]
    assert (failed.status, failed.recorded_status) == ("resumable", "failed")
    assert (failed.metric, failed.best) == ("accuracy", 0.75)  # the default metric, found by its value
    assert failed.problems == ["failed: TrainingError: loss became nan at step 5"]


def test_corrupt_files_are_shown_in_the_row(runs_root):
    rows = by_name(list_runs(runs_root))
    assert rows["corrupt-run-json"].status == "unreadable"
    assert rows["corrupt-run-json"].problems == ["run.json unreadable (JSONDecodeError)"]
    assert rows["corrupt-run-json"].task == "text-classification"
    assert rows["corrupt-run-json"].started == pytest.approx(NOW - 50)
    assert rows["corrupt-metrics"].status == "finished"
    assert rows["corrupt-metrics"].problems == ["metrics.json unreadable (JSONDecodeError)"]
    assert rows["corrupt-metrics"].best is None
    assert rows["corrupt-recipe"].problems == ["recipe.toml unreadable"]
    assert (rows["corrupt-recipe"].task, rows["corrupt-recipe"].status) == (None, "incomplete")


def test_a_run_another_process_trains_in_is_running(runs_root, tmp_path):
    run = tmp_path / "live"
    shutil.copytree(runs_root / "group" / "resumable", run)
    code = ("import sys, time; from pathlib import Path; from finetune.engine.run_lock import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **ENV}, cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"
        row = list_runs(tmp_path)[0]
        assert (row.name, row.status, row.recorded_status) == ("live", "running", "interrupted")
    finally:
        holder.kill()
        holder.wait()
    assert list_runs(tmp_path)[0].status == "resumable"  # the lock went with the process


def test_sorting(runs_root):
    rows = list_runs(runs_root)
    started = [r.started for r in rows]
    assert started == sorted(started, reverse=True) and rows[0].name == "finished"  # default: newest first
    names = [r.name for r in sort_rows(rows, "name")]
    assert names == sorted(names)
    tasks = [r.task for r in sort_rows(rows, "task")]
    assert tasks[-1] is None and tasks[:-1] == ["text-classification"] * (len(rows) - 1)
    durations = [r.duration_s for r in sort_rows(rows, "duration")]
    known = [d for d in durations if d is not None]
    assert known == sorted(known, reverse=True) and durations[:len(known)] == known
    by_metric = [(r.metric, r.best) for r in sort_rows(rows, "metric")]
    with_metric = [m for m in by_metric if m[1] is not None]
    accuracy = [b for m, b in with_metric if m == "accuracy"]
    assert accuracy == sorted(accuracy, reverse=True)  # higher is better
    assert by_metric[:len(with_metric)] == with_metric  # runs without a metric last
    with pytest.raises(RunError, match="cannot sort by 'size'"):
        sort_rows(rows, "size")


def test_rich_table_shows_every_column(runs_root):
    from rich.console import Console as RichConsole

    out = RichConsole(file=io.StringIO(), width=250, record=True)
    out.print(rich_table(list_runs(runs_root), "runs"))
    text = out.export_text()
    for header in ("run", "task", "backbone", "status", "best", "started", "took", "notes"):
        assert header in text
    assert "group/resumable" in text and "eval_loss 0.25" in text and "12s" in text
    assert "run.json unreadable" in text
    narrow = RichConsole(file=io.StringIO(), width=80, record=True)  # a terminal of 80 columns: folded, not cut
    narrow.print(rich_table(list_runs(runs_root), "runs"))
    lines = narrow.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(line.split()[3:4] == ["resumable"] for line in lines)  # the status column is whole


def test_cli_plain_table_json_and_messages(runs_root, tmp_path, tiny_bert):
    plain = run_cli("runs", str(runs_root), env=ENV)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[0].split() == ["run", "task", "backbone", "status", "best", "started", "took", "notes"]
    # newest first; a local backbone shown as its folder's name; the finished run has no notes
    assert lines[1].split()[:5] == ["finished", "text-classification", tiny_bert.name, "finished", "accuracy"]
    assert len(lines) == 9 and "Traceback" not in plain.stderr
    resumable = next(line for line in lines if line.startswith("group/resumable"))
    assert "resumable" in resumable.split() and "eval_loss 0.25" in resumable

    as_json = run_cli("runs", str(runs_root), "--json", "--sort", "name", env=ENV)
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [r["name"] for r in rows] == sorted(r["name"] for r in rows)
    finished = next(r for r in rows if r["name"] == "finished")
    assert finished["status"] == "finished" and finished["metric"] == "accuracy"
    assert dt.datetime.fromisoformat(finished["started_iso"]).timestamp() == pytest.approx(finished["started"], abs=1)
    assert next(r for r in rows if r["name"] == "group/resumable")["resumable"] is True

    missing = run_cli("runs", str(tmp_path / "nowhere"), env=ENV)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("runs", str(tmp_path / "empty"), env=ENV)
    assert empty.returncode == 0 and "no run folders under" in empty.stdout
    # the default folder: runs/ under the current folder
    shutil.copytree(runs_root / "group", tmp_path / "runs" / "group")
    default = run_cli("runs", "--json", env=ENV, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert [r["name"] for r in json.loads(default.stdout)] == ["group/resumable"]


def test_a_killed_copy_of_a_real_run_reads_its_real_checkpoint(runs_root, tmp_path):
    """The checkpoint a real run wrote (not a hand-made one): what a run killed after its last step leaves."""
    killed = tmp_path / "killed"
    shutil.copytree(runs_root / "finished", killed)
    (killed / "metrics.json").unlink()
    info = json.loads((killed / "run.json").read_text())
    (killed / "run.json").write_text(json.dumps({**info, "status": "running"}))
    state = json.loads((sorted((killed / "checkpoints").iterdir())[-1] / "loop_state.json").read_text())
    metrics = json.loads((runs_root / "finished" / "metrics.json").read_text())
    row = list_runs(tmp_path)[0]
    assert (row.status, row.recorded_status, row.resumable) == ("resumable", "running", True)
    assert row.best == pytest.approx(metrics["best"]["accuracy"]) and row.best_step == metrics["best"]["step"]
    assert row.metric == "accuracy"  # the one metric of the best evaluation with that value
    assert row.duration_s == pytest.approx(state["train_time_s"])
