"""Reading a recipe file: TOML -> ``--set`` overrides -> a validated, resolved :class:`Recipe`.

Relative paths in a recipe resolve against the recipe file's folder; the resolved recipe written
to the run folder records them absolute. Validation needs the task's option classes, so the
caller says how to find a task class by name (the plugin registry's ``get_task``).
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune.contract.recipe import (
    CORE_SECTIONS,
    OPTIONAL_SECTIONS,
    Recipe,
    Section,
    is_path_field,
    recipe_model_for,
    upgrade_legacy_keys,
)
from finetune.engine.recipe_messages import format_validation_error
from finetune.errors import RecipeError, did_you_mean

#: ``task name -> Task class`` (e.g. the plugin registry's ``get_task``); raises RecipeError for unknown names.
TaskLookup = Callable[[str], Any]


# ---------------------------------------------------------------------------
# loading

def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning syntax errors into a RecipeError with line and column."""
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found.")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the path of a .toml recipe file.")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: is {size / 1e6:.1f} MB; a recipe is a few KB of settings (the limit is "
                          f"{MAX_RECIPE_BYTES // 1_000_000} MB). Is this a data file? Put data in a file that "
                          "data.train names.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc}); save the recipe as UTF-8.") from None
    return parse_toml(text, str(path))


#: A recipe is a few KB; anything this large is a mistake (and would take seconds to parse).
MAX_RECIPE_BYTES = 1_000_000
#: Arrays/inline tables nested deeper than this are refused before tomllib recurses into them.
MAX_NESTING = 50


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """tomllib.loads with clear errors: syntax (line and column), absurd nesting (tomllib recurses)."""
    depth = _max_bracket_depth(text)
    if depth > MAX_NESTING:
        raise RecipeError(f"{where}: arrays or inline tables nested {depth} levels deep (the limit is "
                          f"{MAX_NESTING}); a recipe needs at most a list of names. Fix the value.")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11 puts "(at line X, column Y)" in the message only.
        raise RecipeError(f"{where}: malformed TOML: {exc}. Fix the syntax at that line.") from None
    except RecursionError:
        raise RecipeError(f"{where}: values nested too deeply to read; fix the value.") from None


def _max_bracket_depth(text: str) -> int:
    """Deepest [ / { nesting outside strings and comments (a cheap upper bound of TOML value depth;
    table headers such as [a.b] count 1)."""
    depth = deepest = 0
    quote: str | None = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-4"`` -> (["train", "learning_rate"], 0.0001).

    The value parses as a TOML literal (numbers, booleans, quoted strings, arrays),
    falling back to a plain string.
    """
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    key, _, raw_value = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise RecipeError(f"--set {item!r}: the key must be SECTION.KEY, e.g. train.epochs "
                          f"(sections: {', '.join(CORE_SECTIONS)})")
    raw_value = raw_value.strip()
    if _max_bracket_depth(raw_value) > MAX_NESTING:
        raise RecipeError(f"--set {key}: the value is nested more than {MAX_NESTING} levels deep.")
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                task_lookup: TaskLookup | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    path = Path(path).expanduser().resolve()
    raw = apply_overrides(read_toml(path), overrides or [])
    try:
        recipe = validate_recipe(raw, task_lookup, base_dir=path.parent,
                                 default_output=path.parent / "runs" / path.stem)
    except RecipeError as exc:
        # Name the file, and the --set values, so the user knows where to fix it.
        note = f"\n  (recipe: {path}"
        if overrides:
            note += "; --set " + " --set ".join(overrides)
        raise RecipeError(f"{exc}{note})") from None
    recipe.source = path
    recipe.user_keys = frozenset(dotted_keys(upgrade_legacy_keys(raw)))
    return recipe


def dotted_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"data": {"split": 0.2}}`` -> ``["data.split"]``: every leaf key of a TOML table, dotted."""
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys



def validate_recipe(raw: dict[str, Any], task_lookup: TaskLookup | None = None,
                    base_dir: Path | None = None, default_output: Path | None = None) -> Recipe:
    """Validate a recipe dict; errors name the key path, the value and the fix."""
    if task_lookup is None:
        from finetune.engine.plugins import get_registry

        task_lookup = get_registry().get_task
    unknown = [k for k in raw if k not in CORE_SECTIONS]
    if unknown:
        key = unknown[0]
        raise RecipeError(f"[{key}]: unknown section{did_you_mean(key, CORE_SECTIONS)}. "
                          f"Valid sections: {', '.join(CORE_SECTIONS)}.")
    for section in CORE_SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise RecipeError(f"{section}: expected a [{section}] table, got {type(raw[section]).__name__} "
                              f"{raw[section]!r}")
        if section not in raw and section not in OPTIONAL_SECTIONS:
            fields = CORE_SECTIONS[section].model_fields
            required = [name for name, info in fields.items() if info.is_required()]
            raise RecipeError(f"[{section}]: required section is missing; add a [{section}] table to the "
                              f"recipe with at least: {', '.join(required)} (see docs/recipes.md).")
    task_name = raw["task"].get("name")
    if task_name is None or task_name == "":
        raise RecipeError("task.name: required key is missing; add e.g. name = \"text-classification\" "
                          "under [task] (run `finetune tasks` for the list).")
    if not isinstance(task_name, str):
        raise RecipeError(f"task.name: invalid value {task_name!r} ({type(task_name).__name__}): expected a "
                          "string such as \"text-classification\" (run `finetune tasks` for the list).")
    task_cls = task_lookup(task_name)
    model_cls = recipe_model_for(task_cls)
    try:
        recipe = model_cls.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, model_cls)) from None
    keys = type(recipe.data).source_keys
    if not any(getattr(recipe.data, key, None) for key in keys):
        others = ", ".join("data." + k for k in keys[1:])
        raise RecipeError(f"data.{keys[0]}: required key is missing; add it under [data]"
                          + (f" (or {others} instead)" if others else "") + ":\n"
                          + _describe(type(recipe.data), keys))
    given = [key for key in keys if getattr(recipe.data, key, None)]
    if len(given) > 1:
        raise RecipeError(f"data.{given[1]} is set together with data.{given[0]}; keep one source of training data.")
    if getattr(recipe.data, "dataset", None) and getattr(recipe.data, "eval", None):
        raise RecipeError("data.eval cannot be combined with data.dataset; name the eval split with "
                          "data.dataset_eval_split (or leave it unset to hold out data.split of the train split).")
    tests = [f"data.{key}" for key in ("test", "test_split", "dataset_test_split") if getattr(recipe.data, key, None)]
    if len(tests) > 1:
        raise RecipeError(f"{tests[1]} is set together with {tests[0]}; keep one test split.")
    if getattr(recipe.data, "dataset", None) and getattr(recipe.data, "test", None):
        raise RecipeError("data.test cannot be combined with data.dataset; name the test split with "
                          "data.dataset_test_split (or hold out a fraction with data.test_split).")
    if base_dir is not None:
        _resolve_paths(recipe, base_dir)
    if not recipe.output.dir and default_output is not None:
        recipe.output.dir = str(default_output)
    return recipe


def _check_link(key: str, path: Path) -> None:
    """Symbolic links are followed (the resolved recipe records where they point); a link whose target
    is missing is named with its target, not reported as a missing file at a path the user never wrote."""
    import os

    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        if current.is_symlink() and not current.exists():
            raise RecipeError(f"{key}: {current} is a symbolic link to {os.readlink(current)}, which does not "
                              f"exist; fix the link or point {key} at the real file.")
        if not current.exists():
            return



def _resolve_paths(recipe: Recipe, base_dir: Path) -> None:
    def resolve(value: str) -> str:
        return str((base_dir / Path(value).expanduser()).resolve())

    def resolve_section(section: BaseModel, prefix: str) -> None:
        for field_name, info in type(section).model_fields.items():
            value = getattr(section, field_name)
            if isinstance(value, Section):  # a sub-table such as [distributed.deepspeed]
                resolve_section(value, f"{prefix}{field_name}.")
                continue
            if not is_path_field(info):
                continue
            if isinstance(value, str) and value:
                _check_link(f"{prefix}{field_name}", base_dir / Path(value).expanduser())
                setattr(section, field_name, resolve(value))
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                for v in value:
                    if v:
                        _check_link(f"{prefix}{field_name}", base_dir / Path(v).expanduser())
                setattr(section, field_name, [resolve(v) if v else v for v in value])

    for section_name in CORE_SECTIONS:
        if getattr(recipe, section_name) is not None:  # [sweep] is None unless the recipe has one
            resolve_section(getattr(recipe, section_name), f"{section_name}.")
    # A backbone written as a path ("./x", "../x", "~/x") is always a path relative to the recipe, so a
    # missing folder is reported with its full path; a bare name ("models/x") is a path when that folder
    # exists beside the recipe, else a Hub id or a name a plugin resolves.
    backbone = recipe.model.backbone
    if Path(backbone).is_absolute():
        return
    candidate = base_dir / Path(backbone).expanduser()
    explicit = backbone in (".", "..", "~") or backbone.startswith(("./", "../", "~/"))
    if explicit or candidate.is_dir():
        recipe.model.backbone = str(candidate.resolve())


def _describe(section: type[BaseModel], keys: tuple[str, ...]) -> str:
    return "\n".join(f"  data.{key}: {section.model_fields[key].description}" for key in keys
                     if key in section.model_fields)
