"""`[track]`: a real run on the tiny fixtures logged to TensorBoard, MLflow and W&B (offline), stopped with
Ctrl-C and resumed, then every store read back; the errors for a missing package and an unknown tracker."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, run_cli, write_csv

from finetune.errors import RecipeError

HAS_WANDB = __import__("importlib.util").util.find_spec("wandb") is not None
STOP_AT = 4  # Ctrl-C at this (logged) step: the run checkpoints there and is resumed


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): W&B's LevelDB-style log of protobuf records
    (7-byte header, 32 KiB blocks, each record fragment: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, block, fragment = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        fragment += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragment)
            fragment = b""
            yield record


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_bert):
    """One run with every installed tracker, interrupted at step STOP_AT and resumed to the end."""
    import tomli_w

    from finetune import hookimpl
    from finetune.engine.console import Console
    from finetune.engine.plugins import get_registry
    from finetune.engine.stop import Interrupted
    from finetune.run.training import run_recipe

    tmp = tmp_path_factory.mktemp("tracking")
    backends = ["tensorboard", "mlflow"] + (["wandb"] if HAS_WANDB else [])
    recipe = tmp / "recipe.toml"
    recipe.write_text(tomli_w.dumps({
        "task": {"name": "text-classification"}, "model": {"backbone": str(tiny_bert)},
        "data": {"train": str(write_csv(tmp / "train.csv", make_sentiment_rows(80))), "split": 0.25,
                 "test_split": 0.2, "max_length": 16},
        "peft": {"r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no", "seed": 0,
                  "log_every_steps": 2, "eval_every_steps": 3, "checkpoint_every_steps": 100},
        "output": {"dir": str(tmp / "runs" / "tracked")},
        "track": {"backends": backends, "project": "tiny", "tags": {"team": "nlp"}}}))

    class CtrlC:
        def on_log(self, run, state, logs):
            if state.global_step == STOP_AT:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    class Plugin:
        @hookimpl
        def finetune_register_callbacks(self, register):
            register(CtrlC())

    registry, plugin = get_registry(), Plugin()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")  # nothing may reach the network
        mp.setenv("WANDB_SILENT", "true")
        registry.pm.register(plugin, name="test-tracking-ctrl-c")
        try:
            with pytest.raises(Interrupted, match="resumable"):
                run_recipe(recipe, [], console=Console(quiet=True))
        finally:
            registry.pm.unregister(plugin)
        run_dir = tmp / "runs" / "tracked"
        first = json.loads((run_dir / "tracking.json").read_text())
        from mlflow import MlflowClient

        client = MlflowClient(first["mlflow"]["tracking_uri"])
        status_after_stop = client.get_run(first["mlflow"]["run_id"]).info.status
        run = run_recipe(recipe, [], resume=True, console=Console(quiet=True))
    assert run.is_finished()
    log = run.read_metrics_log()
    return {"run": run, "first": first, "status_after_stop": status_after_stop, "client": client,
            "state": json.loads((run.path / "tracking.json").read_text()), "backends": backends,
            "train": {r["step"]: r for r in log if r["kind"] == "train"},
            "eval": {r["step"]: r for r in log if r["kind"] == "eval"},
            "metrics": json.loads(run.metrics_file.read_text())}


def test_mlflow_store_holds_params_and_every_metric_in_one_run(tracked):
    client, state = tracked["client"], tracked["state"]["mlflow"]
    # the default store: SQLite beside the run folder, no server
    assert state["tracking_uri"] == f"sqlite:///{tracked['run'].path.parent / 'mlflow.db'}"
    assert state["run_id"] == tracked["first"]["mlflow"]["run_id"], "the resumed run must continue the MLflow run"
    assert tracked["status_after_stop"] == "KILLED"
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    params = run.data.params
    assert params["train.learning_rate"] == "0.01" and params["train.epochs"] == "2"
    assert params["peft.r"] == "4" and params["task.name"] == "text-classification"
    assert params["track.backends"] == json.dumps(tracked["backends"])
    assert run.data.tags["team"] == "nlp" and run.data.tags["finetune.task"] == "text-classification"

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(state["run_id"], key)}

    train_loss = history("train/loss")
    assert sorted(train_loss) == sorted(tracked["train"]), "every logged step once, across the resume"
    assert STOP_AT in train_loss and max(train_loss) > STOP_AT
    for step, value in train_loss.items():
        assert value == pytest.approx(tracked["train"][step]["loss"])
    assert set(history("train/lr")) == set(train_loss) and set(history("train/samples_per_s")) == set(train_loss)
    accuracy = history("eval/accuracy")
    assert 0 in accuracy, "the evaluation before training (step 0) is logged"
    assert sorted(accuracy) == sorted(tracked["eval"])
    for step, value in accuracy.items():
        assert value == pytest.approx(tracked["eval"][step]["accuracy"])
    best = tracked["metrics"]["best"]
    assert history("best/accuracy") == {max(tracked["train"]): pytest.approx(best["accuracy"])}
    assert list(history("best/step").values()) == [best["step"]]
    assert history("test/accuracy") == {max(tracked["train"]): pytest.approx(tracked["metrics"]["test"]["accuracy"])}


def test_tensorboard_event_files_hold_the_same_curves(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = Path(tracked["state"]["tensorboard"]["logdir"])
    assert logdir == tracked["run"].path / "tensorboard" / "tiny"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # the first attempt and the resumed one
    events = EventAccumulator(str(logdir)).Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert [e.step for e in events.Scalars("train/loss")] == sorted(tracked["train"])  # no step twice
    for step, value in loss.items():
        assert value == pytest.approx(tracked["train"][step]["loss"], rel=1e-6)
    accuracy = {e.step: e.value for e in events.Scalars("eval/accuracy")}
    assert sorted(accuracy) == sorted(tracked["eval"]) and 0 in accuracy
    assert "best/accuracy" in events.Tags()["scalars"]
    # the recipe as hyperparameters (HParams dashboard) in the run's own event files, no extra folders
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.learning_rate"].number_value == pytest.approx(0.01)
    assert hparams["task.name"].string_value == "text-classification"
    assert not [p for p in logdir.iterdir() if p.is_dir()]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (optional: pip install 'finetune[track]')")
def test_wandb_offline_run_folders_hold_the_history_under_one_id(tracked):
    state = tracked["state"]["wandb"]
    assert state["id"] == tracked["first"]["wandb"]["id"] and state["mode"] == "offline"
    folders = sorted((tracked["run"].path / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(folders) == 2, "the resumed run writes a second offline folder with the same run id"
    history, config = {}, {}
    for folder in folders:
        for record in _wandb_records(folder / f"run-{state['id']}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
            elif kind == "run":
                assert record.run.project == "tiny" and record.run.display_name == "tracked"
                assert "team:nlp" in record.run.tags
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    for step, row in tracked["train"].items():
        assert history[step]["train/loss"] == pytest.approx(row["loss"])
    assert history[0]["eval/accuracy"] == pytest.approx(tracked["eval"][0]["accuracy"])
    assert config.get("train.learning_rate") == 0.01


def test_unknown_tracker_is_a_recipe_error_with_did_you_mean():
    from finetune.engine.recipe_file import validate_recipe

    raw = {"task": {"name": "text-classification"}, "model": {"backbone": "x"}, "data": {"train": "t.csv"},
           "track": {"backends": ["tensorbord"]}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    message = str(info.value)
    assert "track.backends" in message and "did you mean 'tensorboard'" in message
    assert "tensorboard, mlflow, wandb" in message
    raw["track"] = {"backends": "mlflow"}  # one name without a list
    assert validate_recipe(raw).track.backends == ["mlflow"]


def test_old_train_tensorboard_key_reads_as_track():
    """Recipes and run folders written before [track]: ``train.tensorboard = true`` still logs to TensorBoard,
    ``false`` is ignored, so old unfinished runs still resume."""
    from finetune.engine.recipe_file import validate_recipe
    from finetune.engine.run_folder import recipe_differences

    raw = {"task": {"name": "text-classification"}, "model": {"backbone": "x"}, "data": {"train": "t.csv"},
           "train": {"tensorboard": True}}
    assert validate_recipe(raw).track.backends == ["tensorboard"]
    raw["train"]["tensorboard"] = False
    new = validate_recipe(raw)
    assert new.track.backends == []
    old = new.to_dict()
    old["train"]["tensorboard"] = False
    del old["track"]
    assert recipe_differences(old, new.to_dict()) == []


def test_missing_tracker_package_fails_at_validate_before_a_run_folder(make_recipe, tmp_path):
    """A tracker whose package is not installed: `finetune validate` and `run` stop with the pip command,
    before any run folder exists (the package is hidden from the CLI process)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    recipe = make_recipe('[track]\nbackends = ["tensorboard", "wandb"]\n')
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("validate", str(recipe), env=env)
    assert result.returncode == 2, result.stderr
    assert "track.backends: 'wandb' needs wandb" in result.stderr
    assert "pip install 'finetune[track]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_wandb_tags_stay_within_its_limit():
    from finetune.engine.tracking import WANDB_TAG_LIMIT, wandb_tag

    long_path = "/tmp/" + "x" * 80 + "/tiny-bert0"
    assert wandb_tag("finetune.backbone", long_path) == "finetune.backbone:tiny-bert0"
    assert wandb_tag("finetune.backbone", "sentence-transformers/all-MiniLM-L6-v2") == \
        "finetune.backbone:sentence-transformers/all-MiniLM-L6-v2"
    assert len(wandb_tag("team", "y" * 100)) == WANDB_TAG_LIMIT
