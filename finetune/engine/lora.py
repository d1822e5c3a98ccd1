"""Attaching what trains to a model: a LoRA adapter (PEFT), the head alone, or every parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.contract.layers import resolve_layers
from finetune.errors import RecipeError


@dataclass
class LoraReport:
    target_modules: list[str] | str
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    layers: list[int] | None = None  #: transformer layers holding LoRA (None: all)
    fast_dropout_modules: int = 0  #: dropout layers switched to the fast CPU masks (train.fast_dropout)
    started_from: str | None = None  #: the adapter folder the weights started from (model.start_from)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


def attach_lora(model: Any, peft_cfg: Any, task: Any) -> tuple[Any, LoraReport]:
    """Wrap ``model`` with a LoRA adapter per the recipe's ``[peft]`` section.

    ``target_modules = "auto"`` asks the task; a list names modules; any other
    string is a regex matched against full module names (PEFT semantics).
    """
    from peft import LoraConfig, get_peft_model

    saved = task.modules_to_save(model) if peft_cfg.modules_to_save == "auto" else (
        [peft_cfg.modules_to_save] if isinstance(peft_cfg.modules_to_save, str) else list(peft_cfg.modules_to_save))
    if peft_cfg.method in ("none", "full"):
        if peft_cfg.layers is not None:
            raise RecipeError(f"peft.layers places LoRA in some layers; it does not apply to peft.method = "
                              f"\"{peft_cfg.method}\". Remove peft.layers or use method = \"lora\".")
        return _plain_training(model, peft_cfg.method, saved)
    targets = task.lora_targets(model) if peft_cfg.target_modules == "auto" else peft_cfg.target_modules
    names = [n for n, _ in model.named_modules()]
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                           if type(m).__name__ in ("Linear", "Conv2d", "Conv1D")})
            raise RecipeError(f"peft.target_modules: {unknown} match no module of this model. "
                              f"Linear/conv module names here: {', '.join(leaf)}.")
    layer_kwargs: dict[str, Any] = {}
    if peft_cfg.layers is not None:
        pattern, indices = resolve_layers(model, peft_cfg.layers)
        layer_kwargs = {"layers_to_transform": indices, "layers_pattern": pattern}
    config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                        target_modules=targets, modules_to_save=list(saved) or None, task_type=task.peft_task_type(),
                        **layer_kwargs)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"peft: cannot attach LoRA: {exc}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return peft_model, LoraReport(target_modules=targets, modules_to_save=saved, trainable_params=trainable,
                                  total_params=total, layers=layer_kwargs.get("layers_to_transform"))


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
