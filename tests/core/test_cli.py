"""The CLI answers, and `--help` does not import torch."""

import subprocess
import sys

import pytest
from conftest import REPO, run_cli


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "validate", "predict", "plugins", "tasks"):
        assert command in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"]])  # predict's lists every task's fields
def test_help_does_not_import_heavy_libraries(argv):
    code = ("import sys; from finetune.cli import cli\n"
            f"try:\n    cli({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'timm', 'accelerate') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    if argv[0] == "predict":  # the listing was made, from the installed tasks
        assert "text-classification:" in out and "pred_label" in out


def test_quiet_run_prints_the_final_summary_and_nothing_else(make_recipe, tmp_path):
    import json

    result = run_cli("run", str(make_recipe(train="epochs = 1")), "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = ["finished in ", f"best (accuracy) at step {metrics['best']['step']}: ", "before training (step 0): "]
    if metrics["baseline"]:
        expected.append(f"baseline ({metrics['baseline']['name']}): ")
    expected.append(f"run folder: {tmp_path / 'run'} (adapter/")
    assert len(lines) == len(expected), result.stdout  # no set-up lines, evaluations or progress
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    assert f"accuracy={metrics['best']['accuracy']:.4f}" in lines[1]

    loud = run_cli("run", str(make_recipe(train="epochs = 1")), "--overwrite")
    assert loud.returncode == 0 and "eval @ step" in loud.stdout and "LoRA on" in loud.stdout  # what -q leaves out


def test_python_dash_m_finetune_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "finetune", "tasks"], capture_output=True, text=True, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert "text-classification" in result.stdout
