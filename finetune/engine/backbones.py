"""Resolve a backbone name from a recipe to local model files.

Order (fast and offline first; nothing here ever waits on the network):

1. an existing local folder;
2. a plugin's ``finetune_resolve_backbone`` hook (the offline zoo, a private store);
3. the local Hugging Face cache, with ``local_files_only=True`` (fails in ~0.2 s);
4. otherwise a :class:`BackboneError` saying how to make the weights available.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.contract.backbone import ResolvedBackbone, upstream_id_of
from finetune.engine import zoo
from finetune.errors import BackboneError

if TYPE_CHECKING:
    from finetune.engine.plugins import PluginRegistry


def resolve_backbone(name: str, trust_remote_code: bool = False,
                     registry: PluginRegistry | None = None) -> ResolvedBackbone:
    """``[model] backbone`` -> a local folder and its provenance (see the module's docstring)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(path.glob("config.json")) and not any(path.glob("*.safetensors")):
            raise BackboneError(
                f"model.backbone: folder {str(path)!r} holds no config.json or *.safetensors; "
                "point it at a folder written by save_pretrained().")
        upstream = upstream_id_of(path)
        return ResolvedBackbone(name=name, path=str(path.resolve()), upstream_id=upstream,
                                source=f"local folder {path.resolve()}", trust_remote_code=trust_remote_code)
    if registry is None:
        from finetune.engine.plugins import get_registry

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
