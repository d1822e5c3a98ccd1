"""Helpers for the `finetune init` tests of each plugin family: run init in-process with every installed
plugin claiming (so a detector is tested against the others' claims too) and read back what it wrote."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from finetune.engine.plugins import get_registry
from finetune.engine.recipe_file import load_recipe
from finetune.run.init import init_recipe


def init_and_read(data: Path, out: Path, **options: Any) -> tuple[dict[str, Any], list[str]]:
    """Run ``finetune init`` in-process on ``data`` writing ``out``; return the recipe as TOML data (after
    checking it loads against the task's schema) and the lines init printed."""
    said: list[str] = []
    init_recipe(data, out, echo=said.append, **options)
    recipe = tomllib.loads(out.read_text())
    load_recipe(out, [], get_registry().get_task)  # every key written is one the task knows
    return recipe, said
