"""``model.start_from``: a run continues from a finished run's LoRA adapter (e.g. preference tuning or GRPO
after supervised fine-tuning)."""

from __future__ import annotations

import json

import pytest
import torch
from generation_fixtures import make_qa_rows, write_jsonl

from finetune.engine.console import Console
from finetune.errors import RecipeError
from finetune.run.session import build_model, open_session
from finetune.run.training import run_recipe


def _lora(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, tiny_llama):
    """A finished tiny SFT run (module scope: trained once)."""
    import tomli_w

    folder = tmp_path_factory.mktemp("parent")
    qa_jsonl = write_jsonl(folder / "qa.jsonl", make_qa_rows(48))
    recipe = folder / "recipe.toml"
    recipe.write_text(tomli_w.dumps({
        "task": {"name": "causal-lm", "sample_prompts": 0},
        "model": {"backbone": str(tiny_llama)},
        "data": {"train": str(qa_jsonl), "split": 0.25, "max_length": 64},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no", "seed": 0,
                  "checkpoint_every_steps": 0},
        "output": {"dir": str(folder / "run")},
    }))
    run_recipe(recipe, [], console=Console(enabled=False))
    return folder / "run"


def test_the_run_starts_from_the_parent_adapter_and_its_step_0_equals_the_parent_result(
        parent_run, tmp_path):
    from safetensors.torch import load_file

    recipe = parent_run / "recipe.toml"
    session = open_session(recipe, [f"model.start_from={parent_run}", f"output.dir={tmp_path / 'child'}"])
    model, _, report = build_model(session)
    assert report.started_from == str(parent_run / "adapter")
    saved = load_file(str(parent_run / "adapter" / "adapter_model.safetensors"))
    mine = _lora(model)
    assert len(saved) == len(mine) > 0
    for name, tensor in saved.items():
        assert torch.equal(mine[name], tensor), name
    # end to end: the child's evaluation before training is the parent's best evaluation (same eval split)
    run_recipe(recipe, [f"model.start_from={parent_run}", f"output.dir={tmp_path / 'child'}"],
               console=Console(enabled=False))
    parent = json.loads((parent_run / "metrics.json").read_text())
    child = json.loads((tmp_path / "child" / "metrics.json").read_text())
    assert child["before"]["eval_loss"] == pytest.approx(parent["best"]["eval_loss"], rel=1e-5)
    assert child["before"]["eval_loss"] < parent["before"]["eval_loss"]


def test_the_adapter_folder_itself_works_too(parent_run, tmp_path):
    session = open_session(parent_run / "recipe.toml", [f"model.start_from={parent_run / 'adapter'}",
                                                        f"output.dir={tmp_path / 'c'}"])
    assert build_model(session)[2].started_from == str(parent_run / "adapter")


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["peft.r=8"], ["has r = 4", "this recipe attaches r = 8", "Set [peft] r and target_modules"]),
    (["peft.target_modules=[\"q_proj\"]"], ["on ['q_proj', 'v_proj']", "Set [peft] r and target_modules"]),
    (["peft.method=none", "peft.modules_to_save=[\"lm_head\"]"], ["peft.method = \"none\""]),
])
def test_an_adapter_of_other_settings_is_a_clear_error(parent_run, tmp_path, overrides, fragments):
    session = open_session(parent_run / "recipe.toml", [f"model.start_from={parent_run}",
                                                        f"output.dir={tmp_path / 'c'}", *overrides])
    with pytest.raises(RecipeError) as info:
        build_model(session)
    assert str(info.value).startswith("model.start_from")
    for fragment in fragments:
        assert fragment in str(info.value)


def test_a_folder_without_an_adapter_and_another_backbone_are_refused(parent_run, tmp_path, tiny_gpt2):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    session = open_session(parent_run / "recipe.toml", [f"model.start_from={empty}", f"output.dir={tmp_path / 'c'}"])
    with pytest.raises(RecipeError, match="holds no LoRA adapter"):
        build_model(session)
    session = open_session(parent_run / "recipe.toml", [f"model.start_from={tmp_path / 'missing'}",
                                                        f"output.dir={tmp_path / 'c'}"])
    with pytest.raises(RecipeError, match="does not exist"):
        build_model(session)
    session = open_session(parent_run / "recipe.toml", [f"model.start_from={parent_run}",
                                                        f"model.backbone={tiny_gpt2}", f"output.dir={tmp_path / 'c'}",
                                                        "peft.target_modules=[\"c_attn\"]"])
    with pytest.raises(RecipeError, match="was trained on backbone"):
        build_model(session)
