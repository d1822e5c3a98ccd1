"""`finetune new-plugin NAME`: a pip-installable plugin package that runs as generated."""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import FinetuneError

TEMPLATES = Path(__file__).parent / "templates" / "plugin"


def plugin_names(name: str) -> dict[str, str]:
    """``"text-regression"`` -> dist ``finetune-text-regression``, package ``finetune_text_regression``, ..."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if slug.startswith("finetune-"):
        slug = slug[len("finetune-"):]
    if not slug or not slug[0].isalpha():
        raise FinetuneError(f"new-plugin: {name!r} is not a usable name; use letters, digits and '-', "
                            "starting with a letter (e.g. text-regression).")
    words = slug.split("-")
    snake = slug.replace("-", "_")
    return {"plugin": snake, "dist": f"finetune-{slug}", "package": f"finetune_{snake}", "task": slug,
            "cls": "".join(w.capitalize() for w in words) + "Task"}


def create_plugin(name: str, parent: Path, task: str | None = None) -> Path:
    names = plugin_names(name)
    if task:
        names["task"] = task
    root = parent / names["dist"]
    if root.exists() and any(root.iterdir()):
        raise FinetuneError(f"new-plugin: {root} already exists and is not empty; choose another name or folder.")
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        "example.toml": "example.toml.tmpl",
        f"{names['package']}/__init__.py": "__init__.py.tmpl",
        f"{names['package']}/task.py": "task.py.tmpl",
        f"tests/test_{names['package']}.py": "test_plugin.py.tmpl",
    }
    for target, template in files.items():
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((TEMPLATES / template).read_text().format(**names))
    return root
