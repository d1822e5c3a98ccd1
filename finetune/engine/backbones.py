"""Resolve a backbone name from a recipe to local model files.

Order (offline and fast first):

1. an existing local folder;
2. a plugin's ``finetune_resolve_backbone`` hook (the offline zoo, a private store): it keeps priority
   for the names it serves;
3. the local Hugging Face cache (at ``model.revision`` when set), without the network (~0.2 s);
4. online, a download from the Hugging Face Hub (``HF_ENDPOINT``) of the files a run loads
   (``finetune.engine.hub_access``): said before it starts (what, which commit, how big);
5. otherwise a :class:`BackboneError` saying how to make the weights available (offline: within
   seconds, listing the offline backbones).

A backbone from the Hub records its commit, which the run folder's recipe pins (``model.revision``).
A folder whose config asks to run its own modelling code (``auto_map``) is refused unless the recipe
(or the user's own ``--trust-remote-code``) allows it, whatever its source.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.contract.backbone import ResolvedBackbone, upstream_id_of
from finetune.engine import hub_access
from finetune.errors import BackboneError

if TYPE_CHECKING:
    from finetune.engine.plugins import PluginRegistry


def resolve_backbone(name: str, trust_remote_code: bool = False, registry: PluginRegistry | None = None,
                     revision: str | None = None, allow_pickled: bool = False,
                     announce: Callable[[str], None] | None = None) -> ResolvedBackbone:
    """``[model] backbone`` -> a local folder and its provenance (see the module's docstring).

    ``announce`` receives one line before a download starts (what is fetched, from where, how much)."""
    resolved = _resolve(name, trust_remote_code, registry, revision, allow_pickled, announce)
    resolved.trust_remote_code = trust_remote_code
    code = hub_access.custom_code(Path(resolved.path)) if not trust_remote_code else []
    if code:
        raise BackboneError(
            f"model.backbone: {name!r} ships its own modelling code ({', '.join(code)}), which would run on this "
            f"machine when the model loads. If you trust {resolved.upstream_id or name}, set model.trust_remote_code "
            "= true in your recipe (for `finetune predict` of a run that needs it: --trust-remote-code).")
    return resolved


def _resolve(name: str, trust_remote_code: bool, registry: PluginRegistry | None, revision: str | None,
             allow_pickled: bool, announce: Callable[[str], None] | None) -> ResolvedBackbone:
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(path.glob("config.json")) and not any(path.glob("*.safetensors")):
            raise BackboneError(
                f"model.backbone: folder {str(path)!r} holds no config.json or *.safetensors; "
                "point it at a folder written by save_pretrained().")
        return ResolvedBackbone(name=name, path=str(path.resolve()), upstream_id=upstream_id_of(path),
                                source=f"local folder {path.resolve()}")
    if registry is None:
        from finetune.engine.plugins import get_registry

        registry = get_registry()
    resolved = registry.pm.hook.finetune_resolve_backbone(name=name, trust_remote_code=trust_remote_code)
    if resolved is not None:
        return resolved
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not hub_access.looks_like_hub_id(name):
        close = closest_backbone(name, registry)
        raise BackboneError(f"model.backbone: {name!r} is not an existing folder"
                            f"{f' (did you mean {close!r}?)' if close else ''}; check the path (relative paths "
                            "resolve against the recipe's folder).")
    in_cache = hub_access.cached(name, revision)
    if in_cache is not None and not _loadable(in_cache[0], allow_pickled, trust_remote_code):
        in_cache = None
    # No revision (or a commit): the cache answers without a request. A branch or tag named in the recipe
    # asks the Hub where it points now (offline, the cache's record of it is used).
    moving = revision is not None and not hub_access.is_commit(revision)
    if in_cache is not None and (not moving or hub_access.offline()):
        return _from_cache(name, *in_cache)
    if hub_access.offline():
        raise BackboneError(_unavailable(name, revision, "HF_HUB_OFFLINE is set", registry))
    try:
        commit, files = hub_access.repo_files(name, revision)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one message
        reason = hub_access.describe_hub_error(exc, "look up", name, nothing="Nothing was downloaded")
        if "RevisionNotFound" in type(exc).__name__:
            raise BackboneError(f"model.revision: {revision!r}: {reason}") from None
        reachable = getattr(getattr(exc, "response", None), "status_code", None) is not None
        if in_cache is not None and not reachable:
            if announce is not None:
                announce(f"warning: {reason} Using the cached commit of {name} at {revision!r}: {in_cache[1]}.")
            return _from_cache(name, *in_cache)
        if not reachable:
            raise BackboneError(_unavailable(name, revision, reason, registry)) from None
        raise BackboneError(f"model.backbone: {reason}{_did_you_mean(name, registry)}") from None
    in_cache = hub_access.cached(name, commit)
    if in_cache is not None and _loadable(in_cache[0], allow_pickled, trust_remote_code):
        return _from_cache(name, *in_cache)
    chosen, refused = hub_access.model_files(files, trust_remote_code, allow_pickled, name)
    if refused:
        raise BackboneError(refused)
    plan = hub_access.DownloadPlan(repo_id=name, repo_type="model", commit=commit, files=chosen, revision=revision)
    if announce is not None:
        announce(f"downloading backbone {plan.describe()}")
    try:
        folder = hub_access.download(plan)
    except Exception as exc:  # noqa: BLE001
        raise BackboneError(hub_access.describe(exc, name, "model.backbone") + " What was fetched stays in the "
                            "cache; the next run resumes the download.") from None
    return ResolvedBackbone(name=name, path=str(folder), upstream_id=name, revision=commit,
                            source=f"Hugging Face Hub {hub_access.hub_url()}, commit {commit}, cached at {folder}")


def _from_cache(name: str, folder: Path, commit: str) -> ResolvedBackbone:
    return ResolvedBackbone(name=name, path=str(folder), upstream_id=name, revision=commit,
                            source=f"Hugging Face cache {folder} (commit {commit})")


def _loadable(folder: Path, allow_pickled: bool, trust_remote_code: bool) -> bool:
    """A cached snapshot holds what this run loads: weights it may load (a cache can hold just a config, or
    only pickles), and, when remote code is allowed, the code files its config names (a snapshot fetched
    without consent has none)."""
    names = [p.name for p in folder.iterdir()]
    if trust_remote_code and any(f"{ref.split('.')[0]}.py" not in names for ref in hub_access.custom_code(folder)):
        return False
    if any(n.endswith(".safetensors") for n in names):
        return True
    return allow_pickled and any(n.endswith(hub_access.PICKLED) for n in names)


def _unavailable(name: str, revision: str | None, reason: str, registry: PluginRegistry) -> str:
    known = ", ".join(offline_backbones(registry)) or "none"
    at = f" at revision {revision!r}" if revision else ""
    return (f"model.backbone: {name!r}{at} is not a local folder, no installed plugin provides it, it is not in the "
            f"local Hugging Face cache, and it cannot be downloaded now ({reason}).{_did_you_mean(name, registry)} "
            f"Offline backbones available here: {known}. Online, any Hub model id works (HF_ENDPOINT for another "
            f"server); to work offline, download it once (`huggingface-cli download {name}`) or set backbone to a "
            "local folder saved with save_pretrained().")


def offline_backbones(registry: PluginRegistry) -> list[str]:
    """The names the installed plugins resolve offline (their ``finetune_offline_backbones`` hook), in plugin
    order; a plugin whose hook fails is skipped (this list only decorates an error message)."""
    names: dict[str, None] = {}  # ordered, without repeats
    for impl in registry.pm.hook.finetune_offline_backbones.get_hookimpls():
        try:
            listed = [str(n) for n in impl.function() or []]
        except Exception:  # noqa: BLE001 - a broken listing must not hide the real error
            listed = []
        names.update(dict.fromkeys(listed))
    return list(names)


def _did_you_mean(name: str, registry: PluginRegistry) -> str:
    close = closest_backbone(name, registry)
    return f" Did you mean {close!r}?" if close else ""


def closest_backbone(name: str, registry: PluginRegistry) -> str | None:
    """The offline backbone or cached Hub model closest to a mistyped ``name``, if one is close. A candidate's
    last ``/`` part counts too: ``all-MiniLM-L6-v3`` is close to ``sentence-transformers/all-MiniLM-L6-v2``."""
    import difflib

    typed = name.lower()
    best, score = None, 0.0
    for candidate in dict.fromkeys(offline_backbones(registry) + hub_access.cached_model_ids()):
        for form in (candidate.lower(), candidate.rsplit("/", 1)[-1].lower()):
            against = typed if "/" in form else typed.rsplit("/", 1)[-1]
            ratio = difflib.SequenceMatcher(None, against, form).ratio()
            if candidate != name and ratio > score:
                best, score = candidate, ratio
    return best if score >= 0.7 else None
