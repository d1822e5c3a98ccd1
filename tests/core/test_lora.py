"""Attaching LoRA (finetune.engine.lora): peft.layers places it in chosen layers only; bad values are
clear errors before any run folder exists."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from finetune.engine.console import Console
from finetune.errors import RecipeError
from finetune.run.training import run_recipe

QUIET = Console(enabled=False)


def test_peft_layers_places_lora_only_there(make_recipe):
    run = run_recipe(make_recipe(train="epochs = 1"), ["peft.layers=[-1]"], console=QUIET)
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]  # the tiny model has 2 layers
    from safetensors.torch import load_file

    keys = [k for k in load_file(str(run.adapter_dir / "adapter_model.safetensors")) if "lora_" in k]
    assert keys and all(".layer.1." in k for k in keys)


@pytest.mark.parametrize("override,fragment", [
    (["peft.layers=[2]"], "out of range: this model has 2 layers"),
    (["peft.layers=[-3]"], "out of range"),
    (["peft.layers=[]"], "out of range"),
    (["peft.layers=[1]", 'peft.method="full"'], "does not apply to peft.method"),
])
def test_bad_peft_layers(make_recipe, tmp_path, override, fragment):
    with pytest.raises(RecipeError, match=r"peft\.layers") as err:
        run_recipe(make_recipe(), override, console=QUIET)
    assert fragment in str(err.value)
    assert not (tmp_path / "run").exists()


def test_bad_peft_layers_on_the_command_line_is_one_clear_paragraph(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe()), "--set", "peft.layers=[7]")
    assert result.returncode != 0
    assert "peft.layers" in result.stderr and "out of range" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
