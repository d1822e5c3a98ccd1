"""Third-party plugins: the example package from outside the core, the scaffold, the test kit,
and failures inside a plugin's hooks."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import REPO, make_sentiment_rows, run_cli, write_csv

from finetune.console import Console
from finetune.errors import PluginError
from finetune.plugins import get_registry
from finetune.runner import run_recipe
from finetune.runs import RunDir
from finetune.scaffold import TEMPLATES, create_plugin
from finetune.testing import check_plugin

EXAMPLE = REPO / "examples" / "plugins" / "finetune-text-regression"


def _example_installed() -> bool:
    try:
        importlib.metadata.distribution("finetune-text-regression")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if not _example_installed() and os.environ.get("CI") == "true":
    raise RuntimeError("CI=true but the example plugin is not installed (make test installs it)")
needs_example = pytest.mark.skipif(not _example_installed(),
                                   reason="example plugin not installed (`make test` installs it)")


@needs_example
def test_example_plugin_is_discovered_from_its_own_distribution():
    result = run_cli("plugins")
    assert "text_regression (finetune-text-regression 0.1.0) [ok]" in result.stdout
    assert "finetune_register_callbacks, finetune_register_commands, finetune_register_tasks" in result.stdout
    assert "text-regression" in run_cli("tasks").stdout
    assert run_cli("text_regression-info").stdout.strip() == "finetune-text-regression provides the task " \
                                                            "'text-regression'."


@needs_example
def test_example_plugin_trains_through_finetune_run(tmp_path, tiny_bert):
    rows = [{"text": r["text"], "score": 1.0 if r["label"] == "pos" else -1.0} for r in make_sentiment_rows(120)]
    train = write_csv(tmp_path / "scores.csv", rows)
    recipe = tmp_path / "regression.toml"
    recipe.write_text(f"""
[task]
name = "text-regression"
normalize_target = true

[model]
backbone = "{tiny_bert}"

[data]
train = "{train}"
target_column = "score"
max_length = 16

[train]
epochs = 4
batch_size = 16
learning_rate = 5e-3
mixed_precision = "no"

[output]
dir = "{tmp_path / 'run'}"
""")
    bad = run_cli("validate", str(recipe), "--set", "data.target_colum=score")
    assert bad.returncode == 2 and "did you mean 'target_column'" in bad.stderr  # plugin options validated
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr
    run = RunDir(tmp_path / "run")
    metrics = json.loads(run.metrics_file.read_text())
    assert {"mse", "mae", "pearson"} <= set(metrics["best"])
    assert metrics["best"]["mse"] < metrics["baseline"]["mse"]  # learned something beyond the mean
    assert (run.path / "text_regression-evals.txt").read_text().count("step") == 4  # its callback ran
    plugins = {p["name"]: p for p in run.info()["plugins"]}
    assert plugins["text_regression"]["distribution"] == "finetune-text-regression"


@needs_example
@pytest.mark.parametrize("plugin", ["nlp", "text_regression"])
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


def test_example_is_exactly_what_the_scaffold_generates(tmp_path):
    fresh = create_plugin("text-regression", tmp_path)
    generated = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(EXAMPLE) for p in EXAMPLE.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts and ".egg-info" not in str(p))
    assert generated == committed, "regenerate examples/plugins with `finetune new-plugin text-regression`"
    for rel in generated:
        assert (fresh / rel).read_text() == (EXAMPLE / rel).read_text(), rel
    assert len(list(TEMPLATES.glob("*.tmpl"))) == len(generated)


def test_scaffold_installs_lists_its_task_and_its_own_test_passes(tmp_path):
    root = create_plugin("star-rating", tmp_path / "src")
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(root)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": str(site)}
    tasks = run_cli("tasks", env=env)
    assert "star-rating" in tasks.stdout and "[star_rating]" in tasks.stdout
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                          capture_output=True, text=True, cwd=str(root), env={**os.environ, **env}, timeout=600)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-2000:]
    assert "2 passed" in test.stdout
    again = run_cli("new-plugin", "star-rating", "--dir", str(tmp_path / "src"))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_scaffold_rejects_bad_names(tmp_path):
    result = run_cli("new-plugin", "123", "--dir", str(tmp_path))
    assert result.returncode == 2 and "not a usable name" in result.stderr


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


def test_docs_walkthrough_commands_exist():
    """docs/plugins.md walks through commands that must exist."""
    text = (REPO / "docs" / "plugins.md").read_text()
    for command in ("finetune new-plugin", "pip install -e", "finetune tasks", "finetune run", "check_plugin"):
        assert command in text, command
    assert Path(REPO / "finetune" / "hookspecs.py").read_text().count('"""') >= 10
