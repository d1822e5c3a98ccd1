"""Plugin code, attributed (finetune.engine.guard): what a task raises or returns against the contract is
reported naming the plugin, its distribution, the task and the method, and what was wrong, with no
traceback unless --debug."""

from __future__ import annotations

import json
import types

import pytest
from conftest import run_cli
from fake_plugins import install_tagger, tagging_rows, write_jsonl

from finetune import Task
from finetune.engine.console import Console
from finetune.engine.plugins import get_registry, reset_registry
from finetune.engine.run_folder import RunDir
from finetune.errors import PluginError
from finetune.run.training import run_recipe
from finetune.testing import tiny_text_backbone

QUIET = Console(quiet=True)


@pytest.fixture
def tagger(tmp_path, monkeypatch):
    site = install_tagger(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("FINETUNE_PLUGINS", raising=False)
    reset_registry()
    rows = tagging_rows(32)
    data = write_jsonl(tmp_path / "tags.jsonl", rows)
    backbone = tiny_text_backbone(tmp_path / "bert", [w for r in rows for w in r["tokens"]])

    def recipe(bug: str = "none", name: str = "run") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[task]\nname = "word-tagging"\nbug = "{bug}"\n\n[model]\nbackbone = "{backbone}"\n\n'
                        f'[data]\ntrain = "{data}"\n\n[train]\nepochs = 1\nbatch_size = 8\neval_batch_size = 4\n'
                        f'mixed_precision = "no"\n\n[output]\ndir = "{tmp_path / name}"\n')
        return str(path)

    yield {"recipe": recipe, "env": {"PYTHONPATH": str(site)}, "path": tmp_path}
    reset_registry()


@pytest.mark.parametrize(("bug", "message"), [
    ("wrong_rows", r"Tagger.evaluation_step returned 'predictions' of a Tensor of shape \(1, \d+\) for a batch of 4 "
                   r"examples; the first dimension must be the batch"),
    ("typo_key", r"Tagger.evaluation_step returned the key 'prediction' \(did you mean 'predictions'\?\)"),
    ("not_a_dict", r"Tagger.evaluation_step returned a Tensor of shape \(\); it must return a dict"),
    ("detached_loss", r"Tagger.training_loss returned a loss that does not require grad"),
])
def test_a_bad_return_value_names_the_plugin_the_method_and_what_is_wrong(tagger, bug, message):
    from finetune.run.training import run_recipe

    with pytest.raises(PluginError, match=r"^plugin 'tagger' \(tagger-dist\): " + message):
        run_recipe(tagger["recipe"](bug), [], console=QUIET)


def test_on_the_command_line_it_is_one_message_without_a_traceback_unless_debug(tagger):
    result = run_cli("run", tagger["recipe"]("wrong_rows"), env=tagger["env"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: plugin 'tagger' (tagger-dist): Tagger.evaluation_step returned")
    assert "Traceback" not in result.stderr and "numpy" not in result.stderr
    debug = run_cli("--debug", "run", tagger["recipe"]("wrong_rows", name="debug"), env=tagger["env"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PluginError" in debug.stderr


def test_predict_returning_too_few_rows_names_the_plugin(tagger):
    from finetune.run.inference import load_run
    from finetune.run.training import run_recipe

    run = run_recipe(tagger["recipe"](), [], console=QUIET)
    text = run.recipe_file.read_text().replace('bug = "none"', 'bug = "short_predict"')
    run.recipe_file.write_text(text)
    task, model, processor, _ = load_run(run.path)
    records = [{"tokens": ["good", "day"]}, {"tokens": ["bad"]}]
    with pytest.raises(PluginError, match=r"Tagger.predict returned 1 rows for 2 input records"):
        task.predict(model, processor, records)
    assert json.loads(run.metrics_file.read_text())["best"]["examples"] == 8


# -- exceptions raised by a plugin's task or callback --------------------------------------------------

@pytest.fixture
def exploding_plugin():
    """A plugin whose task raises inside a hook during training (from step 5 on, while armed)."""
    from finetune import hookimpl
    from finetune_nlp.text_classification import TextClassification

    class Exploding(TextClassification):
        name = "exploding-classification"
        armed = True

        def training_loss(self, model, batch):
            self.calls = getattr(self, "calls", 0) + 1
            if Exploding.armed and self.calls >= 5:
                raise ValueError("boom in the plugin")
            return super().training_loss(model, batch)

    module = types.ModuleType("exploding_plugin")

    @hookimpl
    def finetune_register_tasks(register):
        register(Exploding)

    module.finetune_register_tasks = finetune_register_tasks
    registry = get_registry()
    registry.register_module(module, name="exploding", distribution="exploding-dist", version="0.1")
    yield Exploding
    registry.pm.unregister(module)
    registry.tasks.pop("exploding-classification", None)


def test_plugin_raising_in_a_hook_fails_naming_it_and_the_run_resumes(make_recipe, tmp_path, exploding_plugin):
    recipe = make_recipe()
    recipe.write_text(recipe.read_text().replace('"text-classification"', '"exploding-classification"'))
    with pytest.raises(PluginError, match=r"plugin 'exploding' \(exploding-dist\) raised in Exploding.training_loss"):
        run_recipe(recipe, [], console=Console(quiet=True))
    run = RunDir(tmp_path / "run")
    assert run.status == "failed" and run.latest_checkpoint() is not None
    exploding_plugin.armed = False
    resumed = run_recipe(recipe, [], resume=True, console=Console(quiet=True))
    assert resumed.is_finished()


def test_callback_errors_name_the_plugin(make_recipe, tmp_path):
    from finetune import hookimpl

    class Broken:
        def on_log(self, run, state, logs):
            raise KeyError("nope")

    module = types.ModuleType("broken_cb")
    module.finetune_register_callbacks = hookimpl(lambda register: register(Broken()))
    registry = get_registry()
    registry.pm.register(module, name="broken-callbacks")
    try:
        with pytest.raises(PluginError, match=r"plugin 'broken-callbacks', callback Broken raised in on_log"):
            run_recipe(make_recipe(), [], console=Console(quiet=True))
    finally:
        registry.pm.unregister(module)
    assert RunDir(tmp_path / "run").status == "failed"


def test_metrics_as_numpy_or_torch_scalars_are_refused_not_silently_dropped():
    import numpy as np
    import torch

    from finetune.engine.guard import GuardedTask

    class Metrics(Task):
        name = "metrics"
        value = None

        def compute_metrics(self, predictions, references):
            return {"accuracy": self.value, "per_class": {"a": np.int64(3)}, "matrix": np.eye(2)}

    task = GuardedTask(Metrics(None), "plugin 'm' (m-dist)")
    for bad, kind in ((np.float32(0.5), "numpy.float32"), (torch.tensor(0.5), "torch.Tensor")):
        task.task.value = bad
        with pytest.raises(PluginError, match=rf"Metrics.compute_metrics returned 'accuracy' as {kind}; give Python"):
            task.compute_metrics(None, None)
    task.task.value = 0.5
    assert task.compute_metrics(None, None)["accuracy"] == 0.5  # nested numpy values are fine (details)


class Overwriter(Task):
    """A predict that writes its label over the input's (the bug a user met), or worse, as ``mode`` says."""

    name = "overwriter"
    prediction_fields = {"pred_label": "the label", "prob_<label>": "each label's probability"}
    mode = "overwrite"

    def predict(self, model, processor, records, batch_size=32, stream=False):
        if self.mode == "in_place":  # changes the records it was given and returns them
            for record in records:
                record["label"] = "pos"
            return records
        rows = []
        for record in records:
            row = {**record, "pred_label": "pos", "prob_pos": 1.0}
            if self.mode == "overwrite":
                row["label"] = "pos"
            elif self.mode == "drop":
                del row["label"]
            elif self.mode == "unprefixed":
                row["score"] = 1.0
            elif self.mode == "undeclared":
                row["pred_confidence"] = 1.0
            rows.append(row)
        return rows


@pytest.mark.parametrize(("mode", "message"), [
    ("overwrite", r"Overwriter.predict changed the input field 'label' of record 2 \('neg' -> 'pos'\); a prediction "
                  r"must not overwrite the user's data: give it a field of its own named pred_<name>"),
    ("in_place", r"Overwriter.predict changed the input field 'label' of record 2 \('neg' -> 'pos'\)"),
    ("drop", r"Overwriter.predict left out the input field 'label' of record 1; a row keeps every field"),
    ("unprefixed", r"Overwriter.predict added the field 'score' to record 1; name prediction fields pred_<name>"),
    ("undeclared", r"Overwriter.predict added the field 'pred_confidence' to record 1, which its prediction_fields "
                   r"do not list \(pred_label, prob_<label>\)"),
])
def test_a_prediction_that_overwrites_or_drops_an_input_field_is_the_plugins_error(mode, message):
    from finetune.engine.guard import GuardedTask

    task = GuardedTask(Overwriter(None), "plugin 'o' (o-dist)")
    task.task.mode = mode
    records = [{"text": "good day", "label": "pos", "n": float("nan")}, {"text": "bad day", "label": "neg"}]
    with pytest.raises(PluginError, match=r"^plugin 'o' \(o-dist\): " + message):
        task.predict(None, None, records, batch_size=2, stream=False)


def test_a_prediction_that_keeps_the_input_passes_and_bytes_may_be_left_out():
    from finetune.engine.guard import GuardedTask

    class Keeper(Overwriter):
        mode = "keep"

        def predict(self, model, processor, records, batch_size=32, stream=False):
            rows = super().predict(model, processor, records)
            return [{k: v for k, v in row.items() if not isinstance(v, bytes)} for row in rows]

    task = GuardedTask(Keeper(None), "plugin 'o' (o-dist)")
    records = [{"image": "a.png", "source": b"\x89PNG", "label": "pos", "n": float("nan")}]
    rows = task.predict(None, None, records)  # NaN (an empty cell) equals itself; the bytes are not written
    assert rows[0]["label"] == "pos" and rows[0]["pred_label"] == "pos" and "source" not in rows[0]


# -- the task class against the contract, before anything runs -------------------------------------

@pytest.fixture
def register_task():
    """Register a Task subclass as plugin 'oddities' (distribution oddities-dist) for one test."""
    from finetune import hookimpl

    registered = []

    def register(cls):
        module = types.ModuleType(f"oddities_{cls.name}")
        module.finetune_register_tasks = hookimpl(lambda register: register(cls))
        get_registry().register_module(module, name="oddities", distribution="oddities-dist", version="0.1")
        registered.append((module, cls.name))

    yield register
    for module, name in registered:
        get_registry().pm.unregister(module)
        get_registry().tasks.pop(name, None)


def _retask(recipe, name):
    recipe.write_text(recipe.read_text().replace('"text-classification"', f'"{name}"'))
    return recipe


def test_a_method_the_core_cannot_call_fails_before_the_run_folder(make_recipe, tmp_path, register_task):
    from finetune_nlp.text_classification import TextClassification

    class OldPredict(TextClassification):
        name = "old-predict"

        def predict(self, model, processor, records):  # lacks batch_size and stream
            return super().predict(model, processor, records)

    register_task(OldPredict)
    with pytest.raises(PluginError, match=r"plugin 'oddities' \(oddities-dist\): task 'old-predict' does not fit the "
                                          r"contract.*\n  OldPredict.predict\(self, model, processor, records\) cannot "
                                          r"be called as finetune calls it"):
        run_recipe(_retask(make_recipe(), "old-predict"), [], console=QUIET)
    assert not (tmp_path / "run").exists()


def test_a_misspelled_method_is_a_warning_and_a_missing_default_metric_fails_at_step_0(
        make_recipe, tmp_path, register_task, capsys):
    from finetune_nlp.text_classification import TextClassification

    class Misspelled(TextClassification):
        name = "misspelled"

        def evaluate_step(self, model, batch):  # never called: evaluation only gets the default loss
            return super().evaluation_step(model, batch)

        def evaluation_step(self, model, batch):
            return {"loss": model(**batch).loss}

    register_task(Misspelled)
    with pytest.raises(PluginError, match=r"Misspelled.compute_metrics did not return 'accuracy', the task's "
                                          r"default_metric .* the evaluation gave: eval_loss"):
        run_recipe(_retask(make_recipe(), "misspelled"), [], console=QUIET)
    err = capsys.readouterr().err
    assert ("warning: plugin 'oddities' (oddities-dist): Misspelled.evaluate_step matches no method of the contract "
            "(did you mean 'evaluation_step'?)") in err
    run = RunDir(tmp_path / "run")
    assert run.status == "failed" and not run.checkpoints()  # it failed at step 0, before any training
