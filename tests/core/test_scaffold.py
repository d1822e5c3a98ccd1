"""Third-party plugins: the example package from outside the core, the scaffold, the test kit,
and failures inside a plugin's hooks."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_sentiment_rows, run_cli, write_csv

from finetune.cli.scaffold import create_plugin
from finetune.engine.run_folder import RunDir

EXAMPLE = REPO / "examples" / "plugins" / "finetune-rating-regression"


def _example_installed() -> bool:
    try:
        importlib.metadata.distribution("finetune-rating-regression")
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
    assert "rating-regression (finetune-rating-regression 0.1.0) [ok]" in result.stdout
    assert "hooks:  finetune_claim_data, finetune_register_tasks\n" in result.stdout.split("rating-regression (")[1]
    assert "rating-regression" in run_cli("tasks").stdout
    assert "rating-regression" not in run_cli("--help").stdout  # installing a plugin adds no command unless asked


@needs_example
def test_example_plugin_trains_through_finetune_run(tmp_path, tiny_bert):
    rows = [{"text": r["text"], "score": 1.0 if r["label"] == "pos" else -1.0} for r in make_sentiment_rows(120)]
    train = write_csv(tmp_path / "scores.csv", rows)
    recipe = tmp_path / "regression.toml"
    recipe.write_text(f"""
[task]
name = "rating-regression"
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
    assert metrics["best"]["mse"] < metrics["before"]["mse"]  # and beyond the untouched model
    plugins = {p["name"]: p for p in run.info()["plugins"]}
    assert plugins["rating-regression"]["distribution"] == "finetune-rating-regression"


def test_example_is_exactly_what_the_scaffold_generates(tmp_path):
    fresh = create_plugin("rating-regression", tmp_path)
    generated = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(EXAMPLE) for p in EXAMPLE.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts and ".egg-info" not in str(p))
    assert generated == committed, "regenerate examples/plugins with `finetune new-plugin rating-regression`"
    for rel in generated:
        assert (fresh / rel).read_text() == (EXAMPLE / rel).read_text(), rel


@pytest.mark.parametrize("template", ["classification", "regression", "tagging", "generation"])
def test_each_template_installs_lists_its_task_and_its_own_tests_pass(tmp_path, template):
    root = create_plugin(f"star-{template}", tmp_path / "src", template=template, with_callback=True,
                         with_command=True)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(root)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": str(site)}
    tasks = run_cli("tasks", env=env)
    assert f"star-{template}" in tasks.stdout and f"[star-{template}]" in tasks.stdout
    assert f"star-{template}-summary" in run_cli("--help", env=env).stdout  # asked for: --with-command
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(REPO / "pyproject.toml"), str(root)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                          capture_output=True, text=True, cwd=str(root), env={**os.environ, **env}, timeout=600)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-2000:]
    assert "3 passed" in test.stdout  # conformance, a smoke run, the claim for finetune init


def test_the_scaffold_keeps_the_name_as_typed_and_picks_the_template_it_suggests(tmp_path):
    result = run_cli("new-plugin", "token-tagging", "--dir", str(tmp_path))
    assert result.returncode == 0 and "template: tagging, from 'token' in the name" in result.stdout
    root = tmp_path / "finetune-token-tagging"
    assert 'token-tagging = "finetune_token_tagging"' in (root / "pyproject.toml").read_text()
    readme = (root / "README.md").read_text()
    assert "`finetune new-plugin token-tagging --template tagging`" in readme
    task = (root / "finetune_token_tagging" / "task.py").read_text()
    assert 'name = "token-tagging"' in task and "Tag every word" in task
    hooks = (root / "finetune_token_tagging" / "__init__.py").read_text()
    assert "finetune_register_commands" not in hooks and "finetune_register_callbacks" not in hooks
    assert "a number from a text" not in readme + task
    again = run_cli("new-plugin", "token-tagging", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_cli("new-plugin", "x", "--template", "nope", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "nope" in bad.stderr
    taken = run_cli("new-plugin", "token-classification", "--dir", str(tmp_path))  # a built-in task's name
    assert taken.returncode == 2 and "a task named 'token-classification' is already installed" in taken.stderr
    assert not (tmp_path / "finetune-token-classification").exists()


def test_scaffold_rejects_bad_names(tmp_path):
    result = run_cli("new-plugin", "123", "--dir", str(tmp_path))
    assert result.returncode == 2 and "not a usable name" in result.stderr


def test_docs_walkthrough_commands_exist():
    """docs/plugins.md walks through commands that must exist."""
    text = (REPO / "docs" / "plugins.md").read_text()
    for command in ("finetune new-plugin", "pip install -e", "finetune tasks", "finetune run", "check_plugin"):
        assert command in text, command
    assert Path(REPO / "finetune" / "contract" / "hookspecs.py").read_text().count('"""') >= 10


def test_every_template_file_ships_in_the_package():
    import tomllib
    from fnmatch import fnmatch

    from finetune.cli.scaffold import TEMPLATES

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["finetune.cli"]
    base = TEMPLATES.parents[1]  # finetune/cli
    files = [p.relative_to(base).as_posix() for p in TEMPLATES.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch(f, pattern) for pattern in shipped) for f in files), files
