"""``finetune init DATA``: look at a data path, let the plugins claim it, write a commented recipe.

Every plugin's ``finetune_claim_data(probe)`` gets the same cached :class:`DataProbe`; the best
:class:`Claim` wins unless it is unsure (score below :data:`MIN_SCORE`) or another task's claim comes within
:data:`MARGIN` of it: then ``init`` refuses, listing the candidates and the ``--task`` that picks each.
The written recipe's data paths are relative to the recipe file; a training file named like ``*train*``
with ``*eval*``/``*val*``/``*dev*`` and ``*test*`` siblings gets them as ``data.eval`` / ``data.test``.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.contract.probe import Claim, DataProbe
from finetune.errors import DataError, RecipeError

#: Below this, the best claim is a guess: ``init`` refuses and lists the candidates.
MIN_SCORE = 0.5
#: A claim for another task this close to the best one makes the data ambiguous.
MARGIN = 0.1
#: Order of the recipe's sections in the written file.
SECTIONS = ("task", "model", "data", "peft", "train", "output")
_EVAL_WORDS = ("eval", "val", "valid", "validation", "dev")


def choose(claims: list[Claim], task: str | None, path: Path, known_tasks: list[str]) -> tuple[Claim, list[Claim]]:
    """The claim to write and the others (alternatives), or a :class:`DataError` saying why none."""
    if task is not None:
        mine = [c for c in claims if c.task == task]
        if mine:
            best = max(mine, key=lambda c: c.score)
            return best, [c for c in claims if c is not best]
        if task not in known_tasks:
            from finetune.errors import did_you_mean

            raise RecipeError(f"--task: unknown task {task!r}{did_you_mean(task, known_tasks)}; installed: "
                              f"{', '.join(sorted(known_tasks))}")
        claimed = ", ".join(sorted({c.task for c in claims})) or "none"
        raise DataError(f"{path}: the plugin of task {task!r} does not recognise this data (tasks that do: "
                        f"{claimed}). Write the recipe by hand (docs/recipes.md lists each task's [data] keys).")
    if not claims:
        raise DataError(f"{path}: no installed plugin recognises this data (see what was found above). Write the "
                        "recipe by hand: `finetune tasks` lists the tasks, docs/recipes.md each task's [data] keys "
                        "(a plugin adds its own data forms through the finetune_claim_data hook).")
    best = claims[0]
    rivals = [c for c in claims[1:] if c.task != best.task and c.score >= best.score - MARGIN]
    if best.score < MIN_SCORE or rivals:
        candidates = [best] + [c for c in claims[1:] if c.task != best.task and c.score >= min(best.score - MARGIN,
                                                                                                 MIN_SCORE - MARGIN)]
        seen: set[str] = set()
        lines = []
        for c in candidates:
            if c.task in seen:
                continue
            seen.add(c.task)
            lines.append(f"  --task {c.task}  (score {c.score:.2f}, plugin {c.plugin}): "
                         + ("; ".join(c.reasons) or "no reason given"))
        why = "no claim is sure of it" if best.score < MIN_SCORE else "several tasks fit it equally well"
        raise DataError(f"{path}: ambiguous data: {why}. Candidates:\n" + "\n".join(lines)
                        + f"\nRun again with the --task you mean, e.g. `finetune init {path} --task {best.task}`.")
    return best, [c for c in claims[1:]]


def sibling_splits(train: Path) -> dict[str, Path]:
    """``{"eval": ..., "test": ...}``: files beside ``train`` named like it with ``train`` replaced by an eval
    word (eval, val, valid, validation, dev) or by ``test``."""
    found: dict[str, Path] = {}
    name = train.name
    if not re.search(r"train", name, re.IGNORECASE) or not train.exists():
        return found
    for role, words in (("eval", _EVAL_WORDS), ("test", ("test",))):
        for word in words:
            candidate = train.with_name(re.sub(r"train", word, name, count=1, flags=re.IGNORECASE))
            if candidate != train and candidate.exists() and candidate.is_file() == train.is_file():
                found[role] = candidate
                break
    return found


def _relative(value: Path, recipe_dir: Path) -> str:
    return Path(os.path.relpath(value.resolve(), recipe_dir.resolve())).as_posix()


def toml_value(value: Any) -> str:
    """One TOML value (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value}")
        if value != 0 and abs(value) < 0.01:  # 0.0005 -> 5e-4, as recipes write learning rates
            mantissa, exponent = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        text = repr(value)
        return text if any(ch in text for ch in ".e") else text + ".0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def recipe_text(claim: Claim, settings: dict[str, dict[str, Any]], comments: dict[str, str], header: list[str]) -> str:
    """The commented TOML of a recipe."""
    lines = [f"# {h}" if h else "#" for h in header]
    order = list(SECTIONS) + [s for s in settings if s not in SECTIONS]
    for section in order:
        values = settings.get(section)
        if not values:
            continue
        lines += ["", f"[{section}]"]
        width = max(len(f"{_key(k)} = {toml_value(v)}") for k, v in values.items())
        for key, value in values.items():
            text = f"{_key(key)} = {toml_value(value)}"
            note = comments.get(f"{section}.{key}")
            lines.append(f"{text:<{min(width, 48)}}   # {note}" if note else text)
    return "\n".join(lines) + "\n"


def build_recipe(claim: Claim, data: Path, recipe: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """The recipe text for ``claim`` (data paths made relative to ``recipe``'s folder) and its settings."""
    recipe_dir = recipe.parent
    settings: dict[str, dict[str, Any]] = {s: dict(v) for s, v in claim.settings.items()}
    comments = dict(claim.comments)
    settings.setdefault("task", {})
    settings["task"] = {"name": claim.task, **{k: v for k, v in settings["task"].items() if k != "name"}}
    comments.setdefault("task.name", f"chosen by finetune init (plugin {claim.plugin}, score {claim.score:.2f})")
    section = settings.setdefault("data", {})
    train = section.get("train")
    if isinstance(train, Path) and "eval" not in section and "dataset" not in section:
        found = sibling_splits(train)
        if found:
            new = {}
            for key, value in section.items():
                if key in ("split", "group_column"):
                    continue
                new[key] = value
                if key == "train":
                    for role, path in found.items():
                        new[role] = path
                        comments[f"data.{role}"] = ("selects the best checkpoint" if role == "eval" else
                                                    "scored once at the end, never used to select")
            settings["data"] = new
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", (data.stem if data.is_file() else data.name) or "data").strip("-")
    settings.setdefault("output", {}).setdefault("dir", Path(recipe_dir / "runs" / f"{stem}-{claim.task}"))
    comments.setdefault("output.dir", "the run folder (relative to this file)")
    for values in settings.values():
        for key, value in values.items():
            if isinstance(value, Path):
                values[key] = _relative(value, recipe_dir)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [f"Written by `finetune init {data}` ({when}).",
              f"Task {claim.task} (plugin {claim.plugin}, score {claim.score:.2f}), because:"]
    header += [f"  - {reason}" for reason in claim.reasons]
    header += ["Paths are relative to this file. Every key: docs/recipes.md; try it: finetune validate <this file>."]
    return recipe_text(claim, settings, comments, header), settings


def init_recipe(data: str | Path, output: str | Path | None, *, task: str | None = None, force: bool = False,
                backbone: str | None = None, claims_of: Callable[[DataProbe], list[Claim]] | None = None,
                known_tasks: list[str] | None = None, echo: Callable[[str], None] = print) -> Path:
    """Probe ``data``, choose a claim, write the recipe to ``output`` (default ``<data stem>.toml`` in the
    current folder) and return its path. Validation is the caller's (``finetune init`` runs validate)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"DATA: not found: {data}. Give a data file (a table, JSON lines, CoNLL, SQuAD JSON, "
                        "an annotations file) or a folder (class folders, images + masks, a detection layout).")
    if claims_of is None or known_tasks is None:
        from finetune.engine.plugins import get_registry

        registry = get_registry()
        claims_of = claims_of or registry.claims
        known_tasks = known_tasks if known_tasks is not None else list(registry.tasks)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", data.stem if data.is_file() else data.resolve().name).strip("-")
    recipe = Path(output) if output is not None else Path(f"{stem or 'recipe'}.toml")
    if recipe.suffix.lower() != ".toml":
        raise RecipeError(f"-o: {recipe}: a recipe file ends in .toml; give e.g. -o {recipe.with_suffix('.toml')}")
    if recipe.exists() and not force:
        raise RecipeError(f"-o: {recipe} exists; finetune init never overwrites a recipe. Give another -o, or "
                          "--force to replace it.")
    probe = DataProbe(data)
    echo("found:")
    for line in probe.describe():
        echo(f"  {line}")
    claims = claims_of(probe)
    claim, others = choose(claims, task, data, known_tasks)
    if backbone:
        claim.settings.setdefault("model", {})["backbone"] = backbone
        claim.comments["model.backbone"] = "given with --backbone"
    echo(f"task: {claim.task} (plugin {claim.plugin}, score {claim.score:.2f}"
         + (", chosen with --task" if task else "") + "), because:")
    for reason in claim.reasons:
        echo(f"  - {reason}")
    for note in claim.notes:
        echo(f"  note: {note}")
    seen = {claim.task}
    for other in others:
        if other.task in seen:
            continue
        seen.add(other.task)
        echo(f"  also possible: --task {other.task} (score {other.score:.2f}): "
             + ("; ".join(other.reasons[:2]) or "no reason given"))
    text, _ = build_recipe(claim, data, recipe)
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(text, encoding="utf-8")
    echo(f"wrote {recipe}")
    return recipe
