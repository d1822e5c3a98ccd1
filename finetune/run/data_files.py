"""Fingerprints of the data files a recipe names: a run resumes only on the data it started with.

When a run starts, ``run.json`` records each file of the recipe's ``[data]`` section (resolved path,
size, modification time and SHA-256; files over :data:`HASH_LIMIT_BYTES` by size and time only).
"""

from __future__ import annotations

from pathlib import Path

from finetune.contract.recipe import is_path_field

#: Files larger than this are fingerprinted by size and modification time only (hashing would take long).
HASH_LIMIT_BYTES = 2 * 1024**3


def fingerprint_file(path: str | Path) -> dict[str, object]:
    """Size, modification time and (up to HASH_LIMIT_BYTES) SHA-256 of a data file."""
    import hashlib

    path = Path(path)
    st = path.stat()
    out: dict[str, object] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= HASH_LIMIT_BYTES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        out["sha256"] = digest.hexdigest()
    return out


def data_fingerprints(data: object) -> dict[str, dict[str, object]]:
    """``{recipe key: fingerprint}`` for every file a recipe's ``[data]`` section names (folders,
    e.g. image folders, are not fingerprinted). Recorded in run.json when a run starts."""
    out: dict[str, dict[str, object]] = {}
    for name, info in type(data).model_fields.items():
        if not is_path_field(info):
            continue
        value = getattr(data, name)
        values = value if isinstance(value, list) else [value]
        for i, item in enumerate(values):
            if isinstance(item, str) and item and Path(item).is_file():
                key = f"data.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                out[key] = fingerprint_file(item)
    return out


def data_changes(recorded: dict[str, dict[str, object]], current: dict[str, dict[str, object]]) -> list[str]:
    """One line per data file that differs between two :func:`data_fingerprints` (content, not mtime,
    when both have a hash)."""
    lines = []
    for key, old in recorded.items():
        new = current.get(key)
        if new is None:
            lines.append(f"{key}: {old.get('path')} is no longer a file the recipe names")
            continue
        if old.get("path") != new.get("path"):
            lines.append(f"{key}: was {old.get('path')}, now {new.get('path')}")
        elif "sha256" in old and "sha256" in new:
            if old["sha256"] != new["sha256"]:
                lines.append(f"{key}: {new['path']} changed (size {old.get('size')} -> {new.get('size')} bytes, "
                             "different content)")
        elif (old.get("size"), old.get("mtime_ns")) != (new.get("size"), new.get("mtime_ns")):
            lines.append(f"{key}: {new['path']} changed (size or modification time)")
    return lines
