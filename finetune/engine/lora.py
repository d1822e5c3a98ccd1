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
