"""`[distributed]` (ddp / fsdp / deepspeed) and the adapter-completeness check at save time."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import run_cli

from finetune.engine.checkpoint import check_complete, incomplete_tensors
from finetune.engine.distributed import check_distributed, deepspeed_config, fsdp_plugin_kwargs
from finetune.engine.recipe_file import load_recipe
from finetune.engine.run_folder import SAFE_RESUME_CHANGES, recipe_differences
from finetune.errors import RecipeError, RunError


def test_default_strategy_is_plain_data_parallel(make_recipe):
    recipe = load_recipe(make_recipe())
    assert recipe.distributed.strategy == "ddp"
    assert recipe.to_dict()["distributed"]["strategy"] == "ddp"
    check_distributed(recipe)  # nothing to check for ddp, on any machine


def test_fsdp_options_map_to_accelerates_plugin(make_recipe):
    from accelerate import FullyShardedDataParallelPlugin

    recipe = load_recipe(make_recipe(extra="""
        [distributed]
        strategy = "fsdp"
        [distributed.fsdp]
        sharding_strategy = "SHARD_GRAD_OP"
        transformer_layer_cls = ["BertLayer"]
        cpu_offload = true
    """))
    kwargs = fsdp_plugin_kwargs(recipe)
    fields = {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)}
    assert set(kwargs) <= fields, set(kwargs) - fields  # an Accelerate rename breaks this test, not a run
    assert kwargs["sharding_strategy"] == "SHARD_GRAD_OP" and kwargs["cpu_offload"] is True
    assert kwargs["auto_wrap_policy"] == "transformer_based_wrap"
    assert kwargs["transformer_cls_names_to_wrap"] == ["BertLayer"]
    assert kwargs["state_dict_type"] == "FULL_STATE_DICT" and kwargs["use_orig_params"] is True
    size = load_recipe(make_recipe(extra='[distributed]\nstrategy = "fsdp"\nfsdp = {auto_wrap_policy = "size", '
                                         'min_num_params = 5000}'))
    assert fsdp_plugin_kwargs(size)["auto_wrap_policy"] == "size_based_wrap"
    assert fsdp_plugin_kwargs(size)["min_num_params"] == 5000


def test_deepspeed_keys_build_a_config(make_recipe):
    from accelerate import DeepSpeedPlugin

    assert "hf_ds_config" in {f.name for f in dataclasses.fields(DeepSpeedPlugin)}
    recipe = load_recipe(make_recipe(extra="""
        [distributed]
        strategy = "deepspeed"
        deepspeed = {zero_stage = 3, offload_optimizer = "cpu", offload_param = "cpu"}
    """))
    conf = deepspeed_config(recipe)
    zero = conf["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu"}
    assert zero["offload_param"] == {"device": "cpu"}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # or the adapter cannot be gathered
    assert conf["train_micro_batch_size_per_gpu"] == recipe.train.batch_size == 16
    assert conf["gradient_clipping"] == recipe.train.max_grad_norm


def test_deepspeed_json_config_relative_to_the_recipe(make_recipe, tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "zero2.json").write_text(json.dumps({
        "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}))
    recipe = load_recipe(make_recipe(extra='[distributed]\nstrategy = "deepspeed"\n'
                                           'deepspeed = {config = "ds/zero2.json"}'))
    assert recipe.distributed.deepspeed.config == str(tmp_path / "ds" / "zero2.json")  # nested paths resolve
    conf = deepspeed_config(recipe)
    assert conf["zero_optimization"] == {"stage": 2} and conf["train_micro_batch_size_per_gpu"] == 16


@pytest.mark.parametrize(("config", "extra_train", "fragment"), [
    (None, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps = 1"),
    ({"zero_optimization": {"stage": 3}}, {}, "stage3_gather_16bit_weights_on_model_save"),
    ({"optimizer": {"type": "Adam"}}, {}, "has an 'optimizer' section"),
    ({"train_micro_batch_size_per_gpu": 4}, {}, "differs from train.batch_size = 16"),
    ("not json", {}, "cannot read"),
    ("missing", {}, "file not found"),
], ids=["accumulation", "zero3-no-gather", "optimizer-section", "batch-size", "bad-json", "missing-file"])
def test_bad_deepspeed_settings_are_explained(make_recipe, tmp_path, config, extra_train, fragment):
    lines = ['[distributed]', 'strategy = "deepspeed"']
    if config is not None:
        path = tmp_path / "ds.json"
        if config != "missing":
            path.write_text(config if isinstance(config, str) else json.dumps(config))
        lines.append(f'deepspeed = {{config = "{path}"}}')
    train = "\n".join(f"{k} = {v}" for k, v in extra_train.items())
    recipe = load_recipe(make_recipe(extra="\n".join(lines), train=train))
    with pytest.raises(RecipeError, match="deepspeed") as info:
        deepspeed_config(recipe)
    assert fragment in str(info.value)


def test_offload_param_needs_stage_3(make_recipe):
    recipe = load_recipe(make_recipe(extra='[distributed]\nstrategy = "deepspeed"\n'
                                           'deepspeed = {zero_stage = 2, offload_param = "cpu"}'))
    with pytest.raises(RecipeError, match="offload_param needs zero_stage = 3"):
        deepspeed_config(recipe)


def test_deepspeed_missing_names_the_pip_install(make_recipe, monkeypatch):
    import importlib.util

    import torch

    recipe = load_recipe(make_recipe(extra='[distributed]\nstrategy = "deepspeed"'))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(RecipeError, match=r"needs DeepSpeed, which is not installed: pip install deepspeed"):
        check_distributed(recipe)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_on_cpu_before_the_run_folder(make_recipe, tmp_path, strategy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU refusal cannot be shown")
    for command in ("run", "validate"):
        result = run_cli(command, str(make_recipe()), "--set", f'distributed.strategy="{strategy}"')
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert f"distributed.strategy = '{strategy}' needs GPUs" in result.stderr
        assert 'use strategy = "ddp"' in result.stderr
        assert not (tmp_path / "run").exists()


def test_misspelled_fsdp_key_gets_did_you_mean(make_recipe):
    with pytest.raises(RecipeError) as info:
        load_recipe(make_recipe(), ["distributed.fsdp.sharding=FULL_SHARD"])
    assert "distributed.fsdp.sharding: unknown key (did you mean 'sharding_strategy'?)" in str(info.value)


def test_strategy_change_is_refused_on_resume_but_old_run_folders_still_resume(make_recipe):
    current = load_recipe(make_recipe()).to_dict()
    assert not any(key.startswith("distributed") for key in SAFE_RESUME_CHANGES)
    written_before_the_section_existed = {k: v for k, v in current.items() if k != "distributed"}
    assert recipe_differences(written_before_the_section_existed, current) == []
    fsdp = json.loads(json.dumps(current))
    fsdp["distributed"]["strategy"] = "fsdp"
    assert recipe_differences(current, fsdp) == ["distributed.strategy: 'ddp' -> 'fsdp'"]
    assert "distributed.strategy: '<unset>' -> 'fsdp'" in recipe_differences(written_before_the_section_existed, fsdp)


# ---------------------------------------------------------------------------
# adapter completeness

def test_incomplete_state_dict_is_named_key_by_key():
    import torch

    expected = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4), "head.weight": (2, 8)}
    complete = {k: torch.zeros(s) for k, s in expected.items()}
    assert incomplete_tensors(complete, expected) == []
    check_complete({**complete, "extra": torch.zeros(1)}, expected, "adapter")  # extra tensors are fine
    sharded = {"a.lora_A.weight": torch.zeros(0), "head.weight": torch.zeros(1, 8)}  # what one FSDP shard holds
    problems = incomplete_tensors(sharded, expected)
    assert problems == ["a.lora_A.weight: empty (0,), expected (4, 8)", "a.lora_B.weight: missing",
                        "head.weight: shape (1, 8), expected (2, 8)"]
    with pytest.raises(RunError) as info:
        check_complete(sharded, expected, "adapter (adapter_model.safetensors)")
    message = str(info.value)
    assert "adapter (adapter_model.safetensors) is incomplete: 3 of 3 trained tensors" in message
    assert "a.lora_B.weight: missing" in message and "previous one is intact" in message


def test_incomplete_adapter_is_not_written_and_the_previous_one_stays(tiny_bert, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from finetune.engine.run_folder import RunDir
    from finetune.run.adapter import adapter_writer as _save_adapter_fn
    from finetune.run.adapter import expected_adapter_tensors

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    expected = expected_adapter_tensors(model, "lora")
    assert any("lora_A" in k for k in expected) and any("classifier" in k for k in expected)

    class FakeTask:
        name, state = "text-classification", {"labels": ["neg", "pos"]}

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save = _save_adapter_fn(run, FakeTask(), None, "lora", expected)
    save(model)  # complete: written
    before = {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()}
    assert set(load_file(str(run.adapter_dir / "adapter_model.safetensors"))) == set(expected)

    # a state dict "gathered" from one shard: LoRA tensors empty (what a sharded module holds)
    shard = {k: (torch.empty(0) if "lora_" in k else v) for k, v in model.state_dict().items()}
    with pytest.raises(RunError) as info:
        save(model, state_dict=shard)
    message = str(info.value)
    assert "adapter (adapter_model.safetensors) is incomplete" in message
    assert "lora_A.weight: empty (0,), expected (4, 32)" in message
    assert {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()} == before  # previous adapter intact
    assert not list(run.path.glob(".adapter*"))  # no temp folder left behind
    # ... or tensors missing altogether
    shard = {k: v for k, v in model.state_dict().items() if "classifier" not in k}
    with pytest.raises(RunError, match=r"the adapter is incomplete: 2 of \d+ trained tensors are missing from the "
                       r"gathered state dict \(base_model.model.classifier.modules_to_save.default.weight, "):
        save(model, state_dict=shard)
    assert {p.name: p.read_bytes() for p in run.adapter_dir.iterdir()} == before
    assert not list(run.path.glob(".adapter*"))
