"""``finetune new-plugin NAME``: a pip-installable plugin package that runs as generated.

Templates fit the common shapes of a task: ``classification`` (text -> label), ``regression`` (text ->
number), ``tagging`` (a tag per word; per-token evaluation outputs of varying width) and
``generation`` (prompt -> completion with a causal LM; evaluation outputs as lists of strings).
Each template has a task module, an example recipe, a README and tests that pass as generated; a
callback and a CLI command are added only when asked (``--with-callback``, ``--with-command``), so
installing a plugin adds nothing to everyone's ``finetune --help`` unless its author chose to.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from finetune.errors import FinetuneError

TEMPLATES = Path(__file__).parent / "templates" / "plugin"
TEMPLATE_NAMES = ("classification", "regression", "tagging", "generation")

#: Words in a plugin's name that suggest its template (the first template with a match wins).
_HINTS = {
    "tagging": ("token", "tag", "ner", "entit", "pos-", "chunk", "span", "slot"),
    "regression": ("regress", "score", "rating", "price", "value", "estimat"),
    "generation": ("generat", "causal", "chat", "sft", "instruct", "completion", "answer", "summar", "lm"),
    "classification": ("classif", "sentiment", "label", "intent", "topic", "spam", "categor"),
}


def plugin_names(name: str) -> dict[str, str]:
    """``"token-classification"`` -> plugin (entry point) ``token-classification``, distribution
    ``finetune-token-classification``, package ``finetune_token_classification``, task
    ``token-classification``, class ``TokenClassificationTask``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if slug.startswith("finetune-"):
        slug = slug[len("finetune-"):]
    if not slug or not slug[0].isalpha():
        raise FinetuneError(f"new-plugin: {name!r} is not a usable name; use letters, digits and '-', "
                            "starting with a letter (e.g. token-classification).")
    snake = slug.replace("-", "_")
    return {"plugin": slug, "dist": f"finetune-{slug}", "package": f"finetune_{snake}", "task": slug,
            "cls": "".join(w.capitalize() for w in slug.split("-")) + "Task", "command": f"{slug}-summary"}


def choose_template(name: str) -> tuple[str, str]:
    """The template a plugin's name suggests, and why (e.g. "from 'token' in the name")."""
    slug = name.lower()
    for template, words in _HINTS.items():
        for word in words:
            if word in slug:
                return template, f"from {word.strip('-')!r} in the name"
    return "classification", "the default; choose with --template"


def create_plugin(name: str, parent: Path, task: str | None = None, template: str | None = None,
                  with_callback: bool = False, with_command: bool = False) -> Path:
    """Write the package ``finetune-NAME/`` under ``parent``; returns its folder."""
    names = plugin_names(name)
    if task:
        names["task"] = task
    template = template or choose_template(name)[0]
    if template not in TEMPLATE_NAMES:
        raise FinetuneError(f"new-plugin: unknown template {template!r}; choose one of {', '.join(TEMPLATE_NAMES)}.")
    extras = [part for part, wanted in (("a callback", with_callback), (f"the `{names['command']}` command",
                                                                        with_command)) if wanted]
    names["extras_readme"] = "".join(f", {e}" for e in extras[:-1]) + (f" and {extras[-1]}" if extras else "")
    root = parent / names["dist"]
    if root.exists() and any(root.iterdir()):
        raise FinetuneError(f"new-plugin: {root} already exists and is not empty; choose another name or folder.")
    files = {
        "pyproject.toml": "common/pyproject.toml.tmpl",
        f"{names['package']}/__init__.py": "common/__init__.py.tmpl",
        f"{names['package']}/task.py": f"{template}/task.py.tmpl",
        "README.md": f"{template}/README.md.tmpl",
        "example.toml": f"{template}/example.toml.tmpl",
        f"tests/test_{names['package']}.py": f"{template}/test_plugin.py.tmpl",
    }
    for target, source in files.items():
        text = _render(source, names)
        if target.endswith("__init__.py"):
            text += "".join(_render(f"common/{part}.py.tmpl", names)
                            for part, wanted in (("callbacks", with_callback), ("commands", with_command)) if wanted)
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _render(template: str, names: dict[str, str]) -> str:
    return Template((TEMPLATES / template).read_text()).substitute(names)
