"""What ``finetune validate`` and the model card show of a recipe: the keys the user set and the ones that
matter for this run, not every default (``finetune validate --all`` shows every key).

Shown: every key the recipe file or ``--set`` gave; every key whose value is not the schema's default (a
resolved value such as the pinned ``model.revision`` or the default ``output.dir``); and :data:`ESSENTIAL`.
Left out: defaults, and keys that do not apply to this run (:func:`unused_keys`: ``data.split`` when
``data.eval`` is set, ``[distributed.fsdp]`` unless the strategy is FSDP, ``[hub]`` options when nothing is
pushed...). A key the user set that does not apply is shown, with a note saying why it is not used.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from finetune.contract.recipe import METHOD_KEYS, PROMPT_METHODS, Recipe, Section

#: Keys shown even at their default value: what a reader needs to know what the run does.
ESSENTIAL = ("task.name", "model.backbone", "peft.method", "peft.r", "train.epochs", "train.batch_size",
             "train.learning_rate", "train.seed", "output.dir")


def unused_keys(recipe: Recipe) -> dict[str, str]:
    """``dotted key (or section) -> why it does not apply to this run``, for keys that have no effect given
    the rest of the recipe."""
    data, unused = recipe.data, {}
    if getattr(data, "eval", None):
        unused["data.split"] = unused["data.group_column"] = "data.eval gives the evaluation data"
    elif getattr(data, "dataset_eval_split", None):
        unused["data.split"] = unused["data.group_column"] = "data.dataset_eval_split gives the evaluation data"
    if not getattr(data, "dataset", None):
        for key in ("dataset_config", "dataset_split", "dataset_eval_split", "dataset_revision"):
            unused[f"data.{key}"] = "data.dataset is not set"
    strategy = recipe.distributed.strategy
    for name in ("fsdp", "deepspeed"):
        if strategy != name:
            unused[f"distributed.{name}"] = f"distributed.strategy is {strategy!r}"
    if not recipe.hub.push:
        unused["hub.repo_id"] = unused["hub.private"] = "hub.push is false (nothing is pushed to the Hub)"
    backends = recipe.track.backends
    if not backends:
        for key in ("project", "run_name", "tags"):
            unused[f"track.{key}"] = "track.backends is empty (no tracker)"
    for key, backend in (("mlflow_tracking_uri", "mlflow"), ("wandb_mode", "wandb")):
        if backend not in backends:
            unused[f"track.{key}"] = f"track.backends does not name {backend!r}"
    method = recipe.peft.method
    used = set(METHOD_KEYS[method]) | ({"modules_to_save"} if method not in PROMPT_METHODS else set())
    for key in sorted({"modules_to_save", *(k for keys in METHOD_KEYS.values() for k in keys)} - used):
        unused[f"peft.{key}"] = f"peft.method is {method!r} (it does not use {key})"
    return unused


def recipe_view(recipe: Recipe, everything: bool = False) -> tuple[dict[str, Any], list[str], int]:
    """``(table, notes, hidden)``: the recipe as TOML-ready data with only the keys worth showing (every key
    with ``everything``), a note for each key the user set that this run does not use, and how many keys
    were left out."""
    full = recipe.to_dict()
    if everything:
        return full, [], 0
    defaults = _defaults(type(recipe))
    unused = unused_keys(recipe)
    notes, kept, hidden = [], {}, 0
    for key, value in _flatten(full).items():
        why_unused = next((reason for prefix, reason in unused.items()
                           if key == prefix or key.startswith(prefix + ".")), None)
        if key in recipe.user_keys:
            kept[key] = value
            if why_unused:
                notes.append(f"{key} is not used: {why_unused}.")
        elif why_unused is None and (key in ESSENTIAL or key not in defaults or value != defaults[key]):
            kept[key] = value
        else:
            hidden += 1
    return _nest(kept), notes, hidden


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in _LEAF_TABLES:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: Tables whose keys are data, not recipe keys (``"train.learning_rate" = {...}`` of ``[sweep.params]``).
_LEAF_TABLES = ("sweep.params",)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = table
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return table


def _defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """``dotted key -> default`` (as ``to_dict`` writes it) for every field of a recipe model that has one."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        optional = [a for a in get_args(annotation) if a is not type(None)]
        if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], Section):
            annotation = optional[0]  # an optional section ([sweep])
        if isinstance(annotation, type) and issubclass(annotation, Section):
            out.update(_defaults(annotation, f"{prefix}{name}."))
        elif not info.is_required():
            default = info.get_default(call_default_factory=True)
            out[f"{prefix}{name}"] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    return out
