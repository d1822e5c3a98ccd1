"""The plugin test kit (finetune.testing): check_plugin finds real mistakes, and run_task_smoke as an
outside author meets it."""

from __future__ import annotations

import json
import os
import tomllib

import pytest
from fake_plugins import install_tagger, tagging_rows

from finetune.engine.plugins import reset_registry
from finetune.testing import check_plugin, run_task_smoke


def test_smoke_run_takes_list_rows_varies_lengths_merges_overrides_and_is_quiet(tmp_path, monkeypatch, capfd):
    monkeypatch.syspath_prepend(str(install_tagger(tmp_path / "site")))
    monkeypatch.delenv("FINETUNE_PLUGINS", raising=False)
    reset_registry()
    rows = [{"tokens": ["good", "day", "sad"], "tags": ["POS", "O", "NEG"]}] * 8 + tagging_rows(24)
    folder = tmp_path / "not" / "yet" / "there"
    try:
        result = run_task_smoke("word-tagging", folder, rows=rows, recipe={"train": {"epochs": 1}})
    finally:
        reset_registry()
    written = [json.loads(line) for line in (folder / "smoke-train.jsonl").read_text().splitlines()]
    assert written[0] == rows[0]  # lists stay lists (JSON lines, not a CSV cell)
    assert written[1]["tokens"] == rows[1]["tokens"] * 2 and written[1]["tags"] == rows[1]["tags"] * 2
    recipe = tomllib.loads((result.run.path / "recipe.toml").read_text())
    assert recipe["train"]["epochs"] == 1  # the override...
    assert recipe["train"]["learning_rate"] == 0.01 and recipe["train"]["mixed_precision"] == "no"  # ...merged
    assert recipe["train"]["eval_batch_size"] == 4
    assert result.metrics["best"]["examples"] == 8
    assert [len(p["pred_tags"]) for p in result.predictions] == [3, 3, 3, 3]
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err


@pytest.mark.skipif(os.environ.get("CI") != "true" and not __import__("importlib").util.find_spec(
    "finetune_rating_regression"), reason="example plugin not installed (`make test` installs it)")
@pytest.mark.parametrize("plugin", ["nlp", "vision", "speech", "generation", "rating-regression"])
def test_plugins_pass_the_conformance_kit(plugin):
    report = check_plugin(plugin)
    assert report.ok, report.problems
    assert report.tasks


def test_conformance_kit_finds_problems(tmp_path, monkeypatch):
    dist = tmp_path / "sloppy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sloppy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[finetune]\nsloppy = sloppy_mod\n")
    (tmp_path / "sloppy_mod.py").write_text(
        "import torch\nfrom finetune import Task, hookimpl\n"
        "class Sloppy(Task):\n    name = 'Sloppy_Task'\n    default_metric = 'f1'\n    metric_names = ('acc',)\n"
        "@hookimpl\ndef finetune_register_tasks(register):\n    register(Sloppy)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    report = check_plugin("sloppy")
    text = "\n".join(report.problems)
    assert not report.ok
    assert "finetune_hook_version" in text
    assert "imports torch" in text
    assert "lower-case" in text and "description" in text
    assert "implement prepare_data()" in text and "implement lora_targets()" in text
    assert "default_metric 'f1' is not in metric_names" in text
    assert not check_plugin("no-such-plugin").ok


def test_conformance_kit_finds_misspelled_methods_and_wrong_signatures():
    """What passed the kit before: a predict without batch_size/stream, and evaluate_step for
    evaluation_step (never called by finetune)."""
    from finetune import Task
    from finetune.testing import task_problems

    class Tagger(Task):
        name = "tagger"
        description = "A tagger."

        def prepare_data(self): ...
        def build_dataset(self, rows, tokenizer, training): ...  # renaming positional arguments is fine
        def collate_fn(self, processor): ...
        def load_model(self, backbone): ...
        def lora_targets(self, model): ...
        def predict(self, model, processor, records): ...
        def evaluate_step(self, model, batch): ...
        def compute_metric(self, predictions, references): ...
        def finalize_run(self, run_path, metrics, extra): ...
        def _helper(self, x): ...

    problems = task_problems(Tagger)
    text = "\n".join(problems)
    assert "Tagger.predict(self, model, processor, records) cannot be called as finetune calls it" in text
    assert "unexpected keyword argument batch_size" in text
    assert "Tagger.evaluate_step matches no method of the contract (did you mean 'evaluation_step'?)" in text
    assert "Tagger.compute_metric matches no method of the contract (did you mean 'compute_metrics'?)" in text
    assert "Tagger.finalize_run(self, run_path, metrics, extra)" in text and "extra" in text
    assert len(problems) == 4, problems  # build_dataset and _helper are fine
