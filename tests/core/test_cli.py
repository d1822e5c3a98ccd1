"""The CLI answers, and `--help` does not import torch."""

import subprocess
import sys

from conftest import run_cli


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "validate", "predict", "plugins", "tasks"):
        assert command in result.stdout


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from finetune.cli import cli\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'timm', 'accelerate') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
