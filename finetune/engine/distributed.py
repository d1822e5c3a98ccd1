"""Several processes: the Accelerator for a run, and the FSDP / DeepSpeed set-up of ``[distributed]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.engine.precision import resolve_mixed_precision
from finetune.errors import RecipeError

if TYPE_CHECKING:
    from finetune.contract.recipe import Recipe


SHARDED_STRATEGIES = ("fsdp", "deepspeed")
_WRAP_POLICIES = {"transformer": "transformer_based_wrap", "size": "size_based_wrap", "none": "no_wrap"}


def check_distributed(recipe: Recipe) -> None:
    """What ``[distributed]`` needs from the machine, checked before the run folder exists."""
    import importlib.util

    strategy = recipe.distributed.strategy
    if strategy == "ddp":
        return
    tests = [f"data.{k}" for k in ("test", "test_split", "dataset_test_split") if getattr(recipe.data, k, None)]
    if tests:
        raise RecipeError(f"{tests[0]}: a test split is not scored with distributed.strategy = {strategy!r} (the "
                          "selected adapter would have to be loaded back into a sharded model); unset it and score "
                          "the finished run with `finetune evaluate RUN --input FILE`.")
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            f"distributed.strategy = {strategy!r} needs GPUs. On CPU, Accelerate runs several processes as "
            f"plain data parallel and would silently ignore the {strategy} settings (FSDP and DeepSpeed are "
            "not supported there); use strategy = \"ddp\" (the default) on CPU.")
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise RecipeError("distributed.strategy = \"deepspeed\" needs DeepSpeed, which is not installed: "
                              "pip install deepspeed (or use strategy = \"fsdp\", which needs nothing extra).")
        deepspeed_config(recipe)


def fsdp_plugin_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Arguments of Accelerate's FullyShardedDataParallelPlugin for ``[distributed.fsdp]``.

    The adapter and checkpoints always gather the full trainable weights on the main process
    (FULL_STATE_DICT), so finetune never writes sharded files; ``use_orig_params`` lets frozen and
    LoRA parameters share FSDP units."""
    f = recipe.distributed.fsdp
    kwargs: dict[str, Any] = {
        "sharding_strategy": f.sharding_strategy,
        "auto_wrap_policy": _WRAP_POLICIES[f.auto_wrap_policy],
        "cpu_offload": f.cpu_offload,
        "state_dict_type": "FULL_STATE_DICT",
        "use_orig_params": True,
        "sync_module_states": True,
    }
    if f.auto_wrap_policy == "transformer" and f.transformer_layer_cls:
        kwargs["transformer_cls_names_to_wrap"] = list(f.transformer_layer_cls)
    if f.auto_wrap_policy == "size":
        kwargs["min_num_params"] = f.min_num_params
    return kwargs


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed config for ``[distributed.deepspeed]`` (or its JSON file), with [train] filled in."""
    ds, cfg = recipe.distributed.deepspeed, recipe.train
    if ds.config:
        key = "distributed.deepspeed.config"
        try:
            conf = json.loads(Path(ds.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"{key}: file not found: {ds.config} (relative paths resolve against the "
                              "recipe's folder).") from None
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{key}: cannot read {ds.config} as JSON ({exc}).") from None
        if not isinstance(conf, dict):
            raise RecipeError(f"{key}: {ds.config} holds a JSON {type(conf).__name__}, not an object.")
        for owned in ("optimizer", "scheduler"):
            if owned in conf:
                raise RecipeError(f"{key}: {ds.config} has an {owned!r} section; finetune builds the optimizer "
                                  "and scheduler from [train]: remove it.")
    else:
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if ds.offload_optimizer != "none":
            if ds.zero_stage == 0:
                raise RecipeError("distributed.deepspeed.offload_optimizer needs zero_stage >= 1.")
            zero["offload_optimizer"] = {"device": ds.offload_optimizer}
        if ds.offload_param != "none":
            if ds.zero_stage != 3:
                raise RecipeError("distributed.deepspeed.offload_param needs zero_stage = 3 (only stage 3 "
                                  "shards the parameters).")
            zero["offload_param"] = {"device": ds.offload_param}
        if ds.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        conf = {"zero_optimization": zero}
    for name, value in (("train_micro_batch_size_per_gpu", cfg.batch_size), ("gradient_accumulation_steps", 1),
                        ("gradient_clipping", cfg.max_grad_norm or 0.0)):
        if conf.get(name, "auto") == "auto":
            conf[name] = value
    if conf["gradient_accumulation_steps"] != 1 or cfg.gradient_accumulation_steps != 1:
        raise RecipeError("distributed.strategy = \"deepspeed\" works with train.gradient_accumulation_steps = 1 "
                          "(DeepSpeed counts accumulation itself); raise train.batch_size or use ddp/fsdp.")
    if conf["train_micro_batch_size_per_gpu"] != cfg.batch_size:
        raise RecipeError(f"distributed.deepspeed.config: train_micro_batch_size_per_gpu = "
                          f"{conf['train_micro_batch_size_per_gpu']} differs from train.batch_size = "
                          f"{cfg.batch_size}; set it to \"auto\".")
    zero = conf.get("zero_optimization") or {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise RecipeError("distributed.deepspeed.config: ZeRO stage 3 needs "
                          "zero_optimization.stage3_gather_16bit_weights_on_model_save = true, or the adapter "
                          "cannot be gathered from the shards when it is saved.")
    return conf


def make_accelerator(recipe: Recipe, run_path: Path) -> Any:
    """The Accelerator for a run. On CPU it must be ``cpu=True``: otherwise each process of a
    multi-process launch silently trains its own unsynchronised copy. ``[distributed]`` picks the
    strategy: plain data parallel (DDP), FSDP or DeepSpeed (both GPU only)."""
    import torch
    from accelerate import Accelerator

    check_distributed(recipe)
    cfg = recipe.train
    log_with = list(recipe.track.backends) or None  # availability checked before the run folder exists
    kwargs: dict[str, Any] = {}
    if recipe.distributed.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(recipe))
    elif recipe.distributed.strategy == "deepspeed":
        from accelerate import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe))
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                       cpu=not torch.cuda.is_available(), log_with=log_with,
                       project_dir=str(run_path / "tensorboard") if "tensorboard" in (log_with or ()) else None,
                       **kwargs)
