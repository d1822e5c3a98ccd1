"""`finetune sweep`: the search space (parsing, validation before any trial), a sweep on the tiny model
(trial run folders, pruning, summary files, best.toml), and a sweep killed with SIGKILL and continued."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.errors import RecipeError, RunError
from finetune.run.sweep import SweepSettings, core_default_space, parse_param_option, plan_sweep, sweep

REPO = Path(__file__).resolve().parents[2]

# 4 trials of the random sampler with seed 2 draw the learning rates 1e-2, 1e-2, 1e-2, 1e-7 (optuna pinned in
# constraints.txt): the last cannot learn, so the median pruner stops it at its first evaluation.
SPACE = """
[sweep]
sampler = "random"
seed = 2
startup_trials = 1
trials = 4

[sweep.params]
"train.learning_rate" = [1e-2, 1e-7]
"""


# ---------------------------------------------------------------------------
# the search space

def test_param_option_parsing():
    assert parse_param_option("train.learning_rate=1e-5..1e-3,log") == \
        ("train.learning_rate", {"low": 1e-5, "high": 1e-3, "log": True})
    assert parse_param_option("train.epochs=1..3") == ("train.epochs", {"low": 1, "high": 3})
    assert parse_param_option("train.warmup_ratio=0..0.2,step=0.05") == \
        ("train.warmup_ratio", {"low": 0, "high": 0.2, "step": 0.05})
    assert parse_param_option("peft.r=4|8|16") == ("peft.r", [4, 8, 16])
    assert parse_param_option("train.lr_scheduler=linear|cosine") == ("train.lr_scheduler", ["linear", "cosine"])
    for bad, said in (("train.learning_rate", "expected KEY=LOW..HIGH"), ("train.epochs=1..", "both ends"),
                      ("train.epochs=1..3,lg", "unknown flag 'lg'")):
        with pytest.raises(RecipeError, match=said):
            parse_param_option(bad)


def _plan(recipe: Path, *params: str, **kw):
    return plan_sweep(SweepSettings(recipe, [], params=list(params), **kw))


@pytest.mark.parametrize("space, params, said", [
    ('"train.learnin_rate" = {low = 1e-4, high = 1e-2}', (), ["sweep.params.\"train.learnin_rate\"",
                                                              "learning_rate"]),
    ("", ("trian.epochs=1..3",), ["--param trian.epochs", "did you mean", "train"]),
    ('"peft.r" = {low = 0, high = 8}', (), ["sweep.params.\"peft.r\" = 0", "peft.r"]),
    ("", ("train.learning_rate=0..1e-3,log",), ["log range needs low > 0"]),
    ("", ("train.epochs=3..1",), ["low 3 is above high 1"]),
    ("", ("output.dir=a|b",), ["output.dir cannot be searched"]),
    ("", ("learning_rate=1..2",), ["not a recipe key", "SECTION.KEY"]),
    ("", ("train.epochs=1..3,step=0.5",), ["whole numbers"]),
    ('"train.epochs" = {low = 1}', (), ["sweep.params", '"train.epochs": high: Field required']),
    ("", ("train.epochs={low=1}",), ["--param 'train.epochs={low=1}': invalid search space"]),
    ("", ("train.lr_scheduler=linear|cosin",), ["--param train.lr_scheduler = 'cosin'", "lr_scheduler"]),
])
def test_space_errors_name_the_key_before_any_trial(make_recipe, tmp_path, space, params, said):
    recipe = make_recipe(f"[sweep.params]\n{space}\n" if space else "")
    with pytest.raises(RecipeError) as err:
        _plan(recipe, *params)
    for text in said:
        assert text in str(err.value), str(err.value)
    assert not (tmp_path / "run-sweep").exists()


def test_spaces_from_recipe_option_task_and_core(make_recipe, monkeypatch):
    recipe = make_recipe('[sweep.params]\n"train.learning_rate" = {low = 1e-4, high = 1e-2, log = true}\n'
                         '"train.epochs" = {low = 1, high = 3}\n"peft.r" = [2, 4]\n')
    plan = _plan(recipe, "peft.r=8|16", "train.warmup_ratio=0..0.1")
    by_key = {p.key: p for p in plan.params}
    assert (by_key["train.learning_rate"].kind, by_key["train.learning_rate"].log) == ("float", True)
    assert (by_key["train.epochs"].kind, by_key["train.epochs"].low, by_key["train.epochs"].high) == ("int", 1, 3)
    assert by_key["peft.r"].choices == [8, 16]  # --param wins
    assert by_key["train.warmup_ratio"].kind == "float"  # 0..0.1 of a float key
    assert (plan.metric, plan.direction) == ("accuracy", "maximize")
    assert plan.sweep_dir == recipe.parent / "run-sweep"

    # no space named: the core default around the recipe's values (learning rate 1e-2, 2 epochs, LoRA)
    plain = make_recipe(name="plain.toml", train="metric = 'eval_loss'")
    plan = _plan(plain)
    assert plan.space_origin == "core default" and plan.direction == "minimize"
    assert [p.key for p in plan.params] == ["train.learning_rate", "peft.r", "train.epochs", "train.warmup_ratio"]
    assert core_default_space(plan.recipe)["train.learning_rate"] == {"low": 0.0025, "high": 0.04, "log": True}
    assert (plan.params[2].low, plan.params[2].high) == (1, 3)

    # a task's own default (Task.sweep_space), validated like any space
    from finetune.engine.plugins import get_registry

    cls = get_registry().get_task("text-classification")
    monkeypatch.setattr(cls, "sweep_space", lambda self: {"train.batch_size": [8, 16]}, raising=False)
    plan = _plan(plain)
    assert plan.space_origin == "task 'text-classification'" and [p.key for p in plan.params] == ["train.batch_size"]
    monkeypatch.setattr(cls, "sweep_space", lambda self: {"train.batch_sise": [8]}, raising=False)
    with pytest.raises(RecipeError, match=r"(?s)'text-classification' search space, 'train.batch_sise'.*'batch_size'"):
        _plan(plain)


def test_validate_shows_the_sweep_section_as_written(make_recipe):
    from finetune.engine.plugins import get_registry
    from finetune.engine.recipe_file import load_recipe
    from finetune.run.recipe_view import recipe_view

    recipe = load_recipe(make_recipe(SPACE), [], get_registry().get_task)
    table, _, _ = recipe_view(recipe)  # the keys set, not the defaults; the dotted key stays one key
    assert table["sweep"] == {"sampler": "random", "seed": 2, "startup_trials": 1, "trials": 4,
                              "params": {"train.learning_rate": [1e-2, 1e-7]}}
    assert "sweep" not in load_recipe(make_recipe(name="plain.toml"), [], get_registry().get_task).to_dict()


# ---------------------------------------------------------------------------
# a sweep on the tiny model

@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_bert):
    """4 trials (one pruned), run in this process; shared by the tests below."""
    import tomli_w
    from conftest import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("sweep")
    write_csv(root / "data" / "train.csv", make_sentiment_rows(160))
    recipe = {"task": {"name": "text-classification"}, "model": {"backbone": str(tiny_bert)},
              "data": {"train": "data/train.csv", "split": 0.25, "max_length": 16}, "peft": {"r": 4, "alpha": 8},
              "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no",
                        "log_every_steps": 2, "checkpoint_every_steps": 3},
              "output": {"dir": "runs/tiny"}}
    path = root / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe) + SPACE)
    summary = sweep(SweepSettings(path, []))
    return path, root / "runs" / "tiny-sweep", summary


def test_sweep_trials_are_run_folders_and_the_pruner_stops_the_one_behind(finished_sweep):
    from finetune.run.listing import list_runs

    _, folder, summary = finished_sweep
    states = [(t["number"], t["params"]["train.learning_rate"], t["state"]) for t in summary["trials"]]
    assert states == [(0, 1e-2, "complete"), (1, 1e-2, "complete"), (2, 1e-2, "complete"), (3, 1e-7, "pruned")]
    learned = summary["trials"][0]["accuracy"]
    assert summary["trials"][3]["accuracy"] < learned and learned > 0.6
    assert summary["counts"] == {"complete": 3, "pruned": 1, "fail": 0, "running": 0}

    pruned = json.loads((folder / "trial-0003" / "run.json").read_text())
    assert pruned["status"] == "pruned" and pruned["pruned"]["evaluation"] == 0
    assert pruned["pruned"]["step"] == 8  # stopped after its first epoch of 2 (16 steps)
    for n in range(3):
        assert json.loads((folder / f"trial-000{n}" / "run.json").read_text())["status"] == "finished"
    rows = {r.name: r for r in list_runs(folder, sort="name")}
    assert sorted(rows) == [f"trial-000{n}" for n in range(4)]
    assert rows["trial-0003"].status == "pruned" and rows["trial-0000"].status == "finished"
    assert rows["trial-0000"].best == pytest.approx(learned)


def test_sweep_summary_files_and_best_recipe(finished_sweep):
    import csv
    import tomllib

    from finetune.engine.plugins import get_registry
    from finetune.engine.recipe_file import load_recipe

    recipe_path, folder, summary = finished_sweep
    on_disk = json.loads((folder / "sweep.json").read_text())
    assert on_disk["best"]["number"] == summary["best"]["number"] == 0
    assert on_disk["metric"] == "accuracy" and on_disk["direction"] == "maximize"
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "complete", "complete", "pruned"]
    assert float(rows[0]["accuracy"]) == pytest.approx(summary["best"]["accuracy"])
    assert rows[3]["train.learning_rate"] == "1e-07" and float(rows[0]["duration_s"]) > 0

    best = tomllib.loads((folder / "best.toml").read_text())
    assert "sweep" not in best and best["train"]["learning_rate"] == 1e-2
    assert best["output"]["dir"] == str(folder / "best")
    assert best["data"]["train"] == str(recipe_path.parent / "data" / "train.csv")  # absolute: runs from anywhere
    recipe = load_recipe(folder / "best.toml", [], get_registry().get_task)  # `finetune run` takes it as it is
    assert recipe.sweep is None and recipe.train.learning_rate == 1e-2
    # the trial's own recipe is the same but for output.dir, and its run folder recorded it
    trial = tomllib.loads((folder / "recipes" / "trial-0000.toml").read_text())
    assert {**trial, "output": best["output"]} == best
    assert tomllib.loads((folder / "trial-0000" / "recipe.toml").read_text())["train"]["learning_rate"] == 1e-2


def test_sweep_continues_only_its_own_space_and_stops_at_n(finished_sweep):
    recipe_path, folder, _ = finished_sweep
    with pytest.raises(RunError, match="another recipe or search space"):
        sweep(SweepSettings(recipe_path, [], params=["train.learning_rate=1e-3|1e-2"]))
    again = sweep(SweepSettings(recipe_path, []))  # 4 of 4 ended: nothing to run
    assert len(again["trials"]) == 4
    assert not (folder / "trial-0004").exists()


# ---------------------------------------------------------------------------
# kill -9 and continue

def test_sweep_killed_during_a_trial_resumes_it_and_ends_with_n_trials(make_recipe, tmp_path):
    recipe = make_recipe('[sweep]\ntrials = 2\npruner = "none"\n[sweep.params]\n"peft.r" = [2, 4]\n',
                         train="epochs = 3")
    folder = tmp_path / "run-sweep"
    cmd = [sys.executable, "-m", "finetune.cli", "sweep", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((folder / "trial-0001" / "checkpoints").glob("*/loop_state.json")):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of trial 1 within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    import optuna

    study = optuna.load_study(study_name="finetune-sweep", storage=f"sqlite:///{folder / 'study.db'}")
    killed = {t.number: t.state.name for t in study.get_trials()}
    assert killed == {0: "COMPLETE", 1: "RUNNING"}
    params_before, killed_value = study.get_trials()[1].params, study.get_trials()[0].value
    assert json.loads((folder / "trial-0001" / "run.json").read_text())["status"] == "running"

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trial 1: was running when the sweep stopped; resuming it" in done.stdout
    study = optuna.load_study(study_name="finetune-sweep", storage=f"sqlite:///{folder / 'study.db'}")
    trials = study.get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert trials[1].params == params_before
    info = json.loads((folder / "trial-0001" / "run.json").read_text())
    assert info["status"] == "finished" and "resumed_at" in info  # from its checkpoint, not started again
    assert trials[0].value == killed_value  # the trial finished before the kill is kept as it was
    assert sorted(p.name for p in folder.glob("trial-*")) == ["trial-0000", "trial-0001"]
    summary = json.loads((folder / "sweep.json").read_text())
    assert summary["counts"]["complete"] == 2 and len(summary["trials"]) == 2
    assert "best: trial" in done.stdout and (folder / "best.toml").exists()
