"""Resolve a backbone name from a recipe to local model files.

Order (fast and offline first; nothing here ever waits on the network):

1. an existing local folder;
2. a plugin's ``finetune_resolve_backbone`` hook (the offline zoo, a private store);
3. the local Hugging Face cache, with ``local_files_only=True`` (fails in ~0.2 s);
4. otherwise a :class:`BackboneError` saying how to make the weights available.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import BackboneError

if TYPE_CHECKING:
    from finetune.plugins import PluginRegistry


@dataclass
class ResolvedBackbone:
    """Where a backbone's files are and where they came from."""

    name: str  #: as written in the recipe
    path: str  #: a local folder that ``from_pretrained`` loads
    upstream_id: str | None = None  #: the true Hub id (model cards); None for private/local models
    source: str = ""  #: human-readable provenance (package, file, cache)
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_backbone(name: str, trust_remote_code: bool = False,
                     registry: PluginRegistry | None = None) -> ResolvedBackbone:
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(path.glob("config.json")) and not any(path.glob("*.safetensors")):
            raise BackboneError(
                f"model.backbone: folder {str(path)!r} holds no config.json or *.safetensors; "
                "point it at a folder written by save_pretrained().")
        upstream = _upstream_from_config(path)
        return ResolvedBackbone(name=name, path=str(path.resolve()), upstream_id=upstream,
                                source=f"local folder {path.resolve()}", trust_remote_code=trust_remote_code)
    if registry is None:
        from finetune.plugins import get_registry

        registry = get_registry()
    resolved = registry.pm.hook.finetune_resolve_backbone(name=name, trust_remote_code=trust_remote_code)
    if resolved is not None:
        resolved.trust_remote_code = trust_remote_code
        return resolved
    cached = _from_hf_cache(name)
    if cached is not None:
        return ResolvedBackbone(name=name, path=cached, upstream_id=name,
                                source=f"Hugging Face cache {cached}", trust_remote_code=trust_remote_code)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BackboneError(f"model.backbone: {name!r} is not an existing folder; check the path "
                            "(relative paths resolve against the recipe's folder).")
    from finetune import zoo

    known = ", ".join(zoo.known_names()) or "none"
    raise BackboneError(
        f"model.backbone: {name!r} cannot be resolved offline: it is not a local folder, no installed "
        f"plugin provides it, and it is not in the local Hugging Face cache. Offline backbones available "
        f"here: {known}. Either download it on a machine with internet "
        f"(`huggingface-cli download {name}`) and copy the cache, or set backbone to a local folder "
        "saved with save_pretrained().")


def _from_hf_cache(name: str) -> str | None:
    if name.count("/") > 1 or not name.strip():
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    except Exception:  # noqa: BLE001 - invalid repo ids raise validation errors
        return None


def _upstream_from_config(path: Path) -> str | None:
    import json

    config = path / "config.json"
    if not config.exists():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    value = data.get("_name_or_path") or data.get("finetune_upstream_id")
    if isinstance(value, str) and value.count("/") == 1 and not value.startswith((".", "/")):
        return value
    return None


# ---------------------------------------------------------------------------
# LoRA

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
            from finetune.errors import RecipeError

            raise RecipeError(f"peft.layers places LoRA in some layers; it does not apply to peft.method = "
                              f"\"{peft_cfg.method}\". Remove peft.layers or use method = \"lora\".")
        return _plain_training(model, peft_cfg.method, saved)
    targets = task.lora_targets(model) if peft_cfg.target_modules == "auto" else peft_cfg.target_modules
    names = [n for n, _ in model.named_modules()]
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            from finetune.errors import RecipeError

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
        from finetune.errors import RecipeError

        raise RecipeError(f"peft: cannot attach LoRA: {exc}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return peft_model, LoraReport(target_modules=targets, modules_to_save=saved, trainable_params=trainable,
                                  total_params=total, layers=layer_kwargs.get("layers_to_transform"))


_LAYER_LISTS = ("layer", "layers", "h", "block", "blocks")  # PEFT's layers_pattern names


def transformer_layers(model: Any) -> tuple[str, str, Any]:
    """``(qualified name, attribute name, ModuleList)`` of the model's stack of transformer layers
    (the longest ModuleList named like PEFT's layer patterns, e.g. ``bert.encoder.layer``)."""
    import torch

    found = [(name, name.rsplit(".", 1)[-1], module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS and len(module)]
    if not found:
        from finetune.errors import RecipeError

        raise RecipeError("peft.layers: this model has no recognisable stack of transformer layers (a ModuleList "
                          f"named one of {', '.join(_LAYER_LISTS)}); remove peft.layers.")
    return max(found, key=lambda f: len(f[2]))


def resolve_layers(model: Any, layers: list[int]) -> tuple[str, list[int]]:
    """``peft.layers`` (negative = from the top) -> (layers_pattern, sorted 0-based indices)."""
    from finetune.errors import RecipeError

    _, pattern, stack = transformer_layers(model)
    n = len(stack)
    bad = [i for i in layers if not -n <= i < n]
    if bad or not layers:
        raise RecipeError(f"peft.layers: {bad or layers} out of range: this model has {n} layers (0..{n - 1}, "
                          f"or -{n}..-1 from the top).")
    return pattern, sorted({i % n for i in layers})


def _plain_training(model: Any, method: str, saved: list[str]) -> tuple[Any, LoraReport]:
    """Linear probing (only ``saved`` modules train) or full fine-tuning (everything trains)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if not saved:
            from finetune.errors import RecipeError

            raise RecipeError("peft.method = \"none\" trains only the head, but the task names no head "
                              "module; set peft.modules_to_save.")
        for name, p in model.named_parameters():
            p.requires_grad_(any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}"
                                 for m in saved))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, LoraReport(target_modules=[] if method == "none" else "all", modules_to_save=saved,
                             trainable_params=trainable, total_params=total)
