"""Attaching what trains to a model: a PEFT adapter (LoRA and its variants, IA3, prompt or prefix tuning),
the head alone, or every parameter; and the ``[peft]`` checks that need the task or the model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finetune.contract.layers import resolve_layers
from finetune.contract.recipe import METHOD_KEYS, PROMPT_METHODS, PeftSection
from finetune.errors import RecipeError

#: LoRA initialisations that move the top of each weight into the adapter (the base weights change while
#: training); the saved adapter is converted to a plain LoRA of rank 2r for the original base.
MUTATING_INITS = ("pissa", "olora")


@dataclass
class LoraReport:
    target_modules: list[str] | str
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    layers: list[int] | None = None  #: transformer layers holding LoRA (None: all)
    fast_dropout_modules: int = 0  #: dropout layers switched to the fast CPU masks (train.fast_dropout)
    started_from: str | None = None  #: the adapter folder the weights started from (model.start_from)
    #: pissa/olora: a folder holding the adapter as initialised (before training), which saving needs to
    #: convert the trained adapter into a plain LoRA for the original base (PEFT's
    #: ``path_initial_model_for_weight_conversion``)
    initial_adapter: str | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def describe(self, method: str) -> str:
        """One line for the console: what trains and how much of the model that is."""
        share = (f"trainable {self.trainable_params:,} of {self.total_params:,} "
                 f"({100 * self.trainable_fraction:.2f}%)")
        where = f" in layers {self.layers}" if self.layers is not None else ""
        what = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}.get(method)
        if what:
            return f"{what} on {self.target_modules}{where}; trained in full: {self.modules_to_save}; {share}"
        if method in PROMPT_METHODS:
            return f"{method}: trained virtual tokens before the input; {share}"
        return f"peft.method = {method!r}; trained in full: {self.modules_to_save or 'everything'}; {share}"


def check_peft(recipe: Any, task: Any) -> None:
    """``[peft]`` against the task and itself, before the model is loaded: prompt/prefix tuning only for a
    task that declares ``prompt_learning``; an option of another method (set to a non-default value) is an
    error naming the methods it belongs to. (r, alpha, dropout and target_modules only get a "not used" note,
    so ``--set peft.method=...`` works on a recipe that sets them.)"""
    peft = recipe.peft
    method = peft.method
    if method in PROMPT_METHODS and not getattr(task, "prompt_learning", False):
        raise RecipeError(f"peft.method = \"{method}\": task {task.name!r} cannot train with virtual tokens (it "
                          "does not declare prompt_learning: its loss or outputs assume one position per input "
                          "token). Prompt and prefix tuning are for causal-lm; use method = \"lora\", \"dora\" or "
                          "\"ia3\" here.")
    defaults = PeftSection()
    for key in ("use_rslora", "init", "loraplus_lr_ratio", "feedforward_modules", "num_virtual_tokens"):
        if key in METHOD_KEYS[method] or getattr(peft, key) == getattr(defaults, key):
            continue
        owners = [m for m, keys in METHOD_KEYS.items() if key in keys]
        raise RecipeError(f"peft.{key} is an option of method {' / '.join(owners)}; this recipe's peft.method is "
                          f"\"{method}\". Remove peft.{key}, or set peft.method = \"{owners[0]}\".")
    if peft.layers is not None and "layers" not in METHOD_KEYS[method]:
        raise RecipeError(f"peft.layers places LoRA in some layers; it does not apply to peft.method = "
                          f"\"{method}\". Remove peft.layers or use method = \"lora\" (or \"dora\").")
    if peft.init in MUTATING_INITS and method != "lora":
        raise RecipeError(f"peft.init = \"{peft.init}\" works with method = \"lora\" only (its conversion to a "
                          f"plain LoRA at save time does not cover DoRA's magnitudes); use method = \"lora\" or "
                          "another init.")
    if recipe.model.start_from and peft.init in MUTATING_INITS:
        raise RecipeError(f"model.start_from continues a plain LoRA adapter; peft.init = \"{peft.init}\" would "
                          "replace its starting weights. Unset peft.init (or model.start_from).")


def attach_lora(model: Any, peft_cfg: Any, task: Any) -> tuple[Any, LoraReport]:
    """Wrap ``model`` with what trains per the recipe's ``[peft]`` section (:func:`check_peft` first).

    ``target_modules = "auto"`` asks the task (for ia3: PEFT's per-architecture layers where it knows the
    model); a list names modules; any other string is a regex matched against full module names (PEFT
    semantics).
    """
    from peft import get_peft_model

    method = peft_cfg.method
    saved = task.modules_to_save(model) if peft_cfg.modules_to_save == "auto" else (
        [peft_cfg.modules_to_save] if isinstance(peft_cfg.modules_to_save, str) else list(peft_cfg.modules_to_save))
    if method in ("none", "full"):
        if peft_cfg.layers is not None:
            raise RecipeError(f"peft.layers places LoRA in some layers; it does not apply to peft.method = "
                              f"\"{method}\". Remove peft.layers or use method = \"lora\".")
        return _plain_training(model, method, saved)
    if method in PROMPT_METHODS:
        config, targets, layer_kwargs = _prompt_config(peft_cfg, task), [], {}
    else:
        targets = _targets(model, peft_cfg, task)
        layer_kwargs: dict[str, Any] = {}
        if peft_cfg.layers is not None:
            pattern, indices = resolve_layers(model, peft_cfg.layers)
            layer_kwargs = {"layers_to_transform": indices, "layers_pattern": pattern}
        if method == "ia3":
            config = _ia3_config(model, peft_cfg, task, targets, saved)
        else:
            _check_init_layers(model, peft_cfg, targets)
            from peft import LoraConfig

            init = True if peft_cfg.init == "default" else peft_cfg.init
            config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                                target_modules=targets, modules_to_save=list(saved) or None,
                                task_type=task.peft_task_type(), use_dora=method == "dora",
                                use_rslora=peft_cfg.use_rslora, init_lora_weights=init, **layer_kwargs)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise RecipeError(f"peft.method = \"{method}\": cannot attach it to this model: {exc}") from None
    initial = _save_initial_adapter(peft_model) if peft_cfg.init in MUTATING_INITS else None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return peft_model, LoraReport(target_modules=targets, modules_to_save=[] if method in PROMPT_METHODS else saved,
                                  trainable_params=trainable, total_params=total,
                                  layers=layer_kwargs.get("layers_to_transform"), initial_adapter=initial)


def _targets(model: Any, peft_cfg: Any, task: Any) -> list[str] | str:
    """The target modules: the task's (or for ia3 PEFT's) defaults, or the recipe's, checked to exist."""
    if peft_cfg.target_modules != "auto":
        targets = peft_cfg.target_modules
    elif peft_cfg.method == "ia3" and _ia3_defaults(model) is not None:
        targets = _ia3_defaults(model)[0]
    else:
        targets = task.lora_targets(model)
    names = [n for n, _ in model.named_modules()]
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                           if type(m).__name__ in ("Linear", "Conv2d", "Conv1D")})
            raise RecipeError(f"peft.target_modules: {unknown} match no module of this model. "
                              f"Linear/conv module names here: {', '.join(leaf)}.")
    return targets


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's target matching: a regex over the full name, or a name suffix from a list."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_init_layers(model: Any, peft_cfg: Any, targets: list[str] | str) -> None:
    """pissa/olora initialise Linear layers only (PEFT silently starts other layers the default way)."""
    if peft_cfg.init not in MUTATING_INITS:
        return
    import torch.nn as nn

    other = sorted({f"{type(m).__name__} ({n})" for n, m in model.named_modules()
                    if _matches(n, targets) and not isinstance(m, nn.Linear)})
    if other:
        raise RecipeError(f"peft.init = \"{peft_cfg.init}\" initialises Linear layers only, and the LoRA targets "
                          f"include {len(other)} other layer(s): {', '.join(other[:3])}"
                          f"{' ...' if len(other) > 3 else ''}. Use init = \"default\" (or \"gaussian\"), or set "
                          "peft.target_modules to Linear layers only.")


def _ia3_defaults(model: Any) -> tuple[list[str], list[str]] | None:
    """PEFT's IA3 (targets, feed-forward modules) for the model's architecture, or None if it has none."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
        return None
    return (list(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[kind]),
            list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(kind, [])))


def _ia3_config(model: Any, peft_cfg: Any, task: Any, targets: list[str] | str, saved: list[str]) -> Any:
    from peft import IA3Config

    if peft_cfg.feedforward_modules != "auto":
        feedforward = peft_cfg.feedforward_modules
    else:
        defaults = _ia3_defaults(model)
        feedforward = [] if defaults is None or peft_cfg.target_modules != "auto" else defaults[1]
    if isinstance(feedforward, list) and isinstance(targets, list):
        stray = [f for f in feedforward if f not in targets]
        if stray:
            raise RecipeError(f"peft.feedforward_modules: {stray} are not among the target modules {targets}; "
                              "ia3's feed-forward modules must be a subset of peft.target_modules.")
    # the layers IA3 is placed on must be ones it has a layer for (PEFT names the type it cannot take)
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, modules_to_save=list(saved) or None,
                     task_type=task.peft_task_type())


def _prompt_config(peft_cfg: Any, task: Any) -> Any:
    from peft import PrefixTuningConfig, PromptTuningConfig

    kind = PromptTuningConfig if peft_cfg.method == "prompt-tuning" else PrefixTuningConfig
    return kind(num_virtual_tokens=peft_cfg.num_virtual_tokens, task_type=task.peft_task_type())


def _save_initial_adapter(peft_model: Any) -> str:
    """pissa/olora: save the adapter as initialised into a temporary folder (removed at exit), as PEFT's
    documented conversion needs; the config says ``init_lora_weights = True`` so that reloading it for the
    conversion does not decompose the (already residual) weights again."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="finetune-lora-init-")
    atexit.register(shutil.rmtree, folder, True)
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(f"{folder}/initial")
    finally:
        config.init_lora_weights = init
    return f"{folder}/initial"


def _plain_training(model: Any, method: str, saved: list[str]) -> tuple[Any, LoraReport]:
    """Linear probing (only ``saved`` modules train) or full fine-tuning (everything trains)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if not saved:
            raise RecipeError("peft.method = \"none\" trains only the head, but the task names no head "
                              "module; set peft.modules_to_save.")
        for name, p in model.named_parameters():
            p.requires_grad_(any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}"
                                 for m in saved))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, LoraReport(target_modules=[] if method == "none" else "all", modules_to_save=saved,
                             trainable_params=trainable, total_params=total)


def load_start_adapter(model: Any, recipe: Any) -> str:
    """``model.start_from``: copy a finished run's LoRA weights into the freshly attached adapter.

    ``model`` is the PEFT model :func:`attach_lora` returned. The run's backbone, ``[peft]`` r and target
    modules must match (a clear error names what differs and how to fix it); every LoRA tensor of this
    model must be filled from the adapter, with its shape. Returns the adapter folder it read."""
    import json
    import tomllib
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    given = Path(recipe.model.start_from)
    folder = given / "adapter" if (given / "adapter" / "adapter_config.json").is_file() else given
    weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not given.exists():
        raise RecipeError(f"model.start_from: {given} does not exist; give a finished run folder (or its adapter/ "
                          "folder).")
    if recipe.peft.method != "lora":
        raise RecipeError(f"model.start_from continues a LoRA adapter; it does not apply to peft.method = "
                          f"\"{recipe.peft.method}\" (use method = \"lora\", or unset model.start_from).")
    if not (weights.is_file() and config_file.is_file()):
        raise RecipeError(f"model.start_from: {folder} holds no LoRA adapter (adapter_model.safetensors and "
                          "adapter_config.json); give a finished run folder (a run still training has no adapter/ "
                          "yet; one trained with peft.method = \"none\"/\"full\" has no LoRA adapter).")
    parent_recipe = folder.parent / "recipe.toml"
    if parent_recipe.is_file():
        with parent_recipe.open("rb") as fh:
            parent_backbone = tomllib.load(fh).get("model", {}).get("backbone")
        if parent_backbone and parent_backbone != recipe.model.backbone:
            raise RecipeError(f"model.start_from: {folder.parent} was trained on backbone {parent_backbone!r}, this "
                              f"recipe's model.backbone is {recipe.model.backbone!r}; an adapter only fits the "
                              "backbone it was trained on (set model.backbone to it).")
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    ours = model.peft_config["default"]
    mine_targets = sorted(ours.target_modules) if not isinstance(ours.target_modules, str) else ours.target_modules
    theirs = saved.get("target_modules")
    theirs = sorted(theirs) if isinstance(theirs, list) else theirs
    if saved.get("r") != ours.r or theirs != mine_targets:
        raise RecipeError(f"model.start_from: the adapter in {folder} has r = {saved.get('r')} on {theirs}; this "
                          f"recipe attaches r = {ours.r} on {mine_targets}. Set [peft] r and target_modules to the "
                          "adapter's (alpha too, to keep its scale).")
    tensors = load_file(str(weights))
    # Modules trained in full here that the adapter lacks (a new task head, e.g. a reward model's score head
    # starting from a causal-lm run) keep their fresh weights: PEFT's loader needs a tensor for each of them.
    from peft import get_peft_model_state_dict

    for name, tensor in get_peft_model_state_dict(model).items():
        if "lora_" not in name and name not in tensors:
            tensors[name] = tensor
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    try:
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"model.start_from: the adapter in {folder} does not fit this model ({first}); it was "
                          "trained on another backbone or with other [peft] settings.") from None
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [n for n in (getattr(result, "missing_keys", None) or []) if n in expected]
    if unexpected or missing:
        bad = (unexpected or missing)[:3]
        raise RecipeError(f"model.start_from: the adapter in {folder} does not fit this model ({len(unexpected)} of "
                          f"its tensors have no place here, {len(missing)} LoRA tensors here are not in it; e.g. "
                          f"{bad}); it was trained on another backbone or with other [peft] settings.")
    return str(folder)
