"""The CLI answers, and `--help` does not import torch."""

import subprocess
import sys

import pytest
from conftest import run_cli


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
