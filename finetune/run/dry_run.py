"""``finetune validate`` (``run --dry-run``): everything up to one collated batch; no training, no run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.engine.console import Console
from finetune.engine.distributed import check_distributed
from finetune.engine.loop import metric_mode
from finetune.engine.tracking import check_trackers
from finetune.run.recipe_view import recipe_view
from finetune.run.session import build_model, open_session, speed_settings


def describe_batch(batch: dict[str, Any]) -> dict[str, str]:
    """``key -> "(shape) dtype"`` of a collated batch, as ``finetune validate`` shows it."""
    out = {}
    for key, value in batch.items():
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        out[key] = f"{tuple(shape)} {str(dtype).replace('torch.', '')}" if shape is not None else type(value).__name__
    return out


def dry_run(recipe_path: str | Path, overrides: list[str], console: Console,
            everything: bool = False) -> dict[str, Any]:
    """Everything up to the first batch, no training, no run folder. Returns the report shown.

    The recipe is shown as the keys the user set and those that matter for this run
    (:mod:`finetune.run.recipe_view`); ``everything`` shows every key, defaults included."""
    session = open_session(recipe_path, overrides, announce=console.print)
    check_distributed(session.recipe)
    check_trackers(session.recipe.track)
    model, processor, report = build_model(session)
    task = session.task
    train_ds = task.build_dataset(session.splits.train, processor, training=True)
    task.build_dataset(session.splits.eval, processor, training=False)
    collate = task.collate_fn(processor)
    n = min(session.recipe.train.batch_size, len(train_ds))
    batch = collate([train_ds[i] for i in range(n)])
    speed = speed_settings(task, session.recipe, train_ds, report)
    unused = recipe_view(session.recipe)[1]
    console.print(show_recipe(session.recipe, everything))
    info = {
        "task": f"{task.name} ({type(task.task).__module__}.{type(task.task).__name__})",
        "backbone": session.backbone.to_dict(),
        "lora_targets": report.target_modules,
        "modules_to_save": report.modules_to_save,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "data": session.splits.info,
        "batch": describe_batch(batch),
        "speed_settings": speed,
        "not_used": unused,
    }
    console.print(f"task:             {info['task']}")
    console.print(f"backbone:         {session.backbone.name} -> {session.backbone.path}")
    console.print(f"                  ({session.backbone.source})")
    method = session.recipe.peft.method
    if method != "lora":
        console.print(f"peft.method:      {method}")
    label = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}.get(method)
    if label:
        console.print(f"{label + ' targets:':<18}{report.target_modules}"
                      + (f" in layers {report.layers}" if report.layers is not None else ""))
    console.print(f"trained in full:  {report.modules_to_save}")
    console.print(f"trainable params: {report.trainable_params:,} of {report.total_params:,} "
                  f"({100 * report.trainable_fraction:.2f}%)")
    metric = session.recipe.train.metric or task.default_metric
    mode = metric_mode(metric, session.recipe.train.metric_mode, tuple(task.lower_is_better or ()))
    info["selection"] = {"metric": metric, "mode": mode}
    console.print(f"best checkpoint:  by {metric} ({'higher' if mode == 'max' else 'lower'} is better; "
                  f"{'train.metric' if session.recipe.train.metric else 'the task default'})")
    for key, value in session.splits.info.items():
        console.print(f"data.{key}: {value}")
    for note in speed:
        console.print(f"speed setting:    {note}")
    for note in unused:
        console.print(f"note:             {note}")
    console.print("one collated batch:")
    for key, value in info["batch"].items():
        console.print(f"  {key}: {value}")
    console.summary("recipe is valid; nothing was trained or written.")
    return info


def show_recipe(recipe: Any, everything: bool = False) -> str:
    """The ``# resolved recipe`` block of ``finetune validate``: TOML of the keys worth showing (or every key)."""
    import tomli_w

    table, _, hidden = recipe_view(recipe, everything)
    if everything:
        head = "# resolved recipe: every key, defaults included"
    else:
        head = ("# resolved recipe: the keys you set and what this run uses"
                + (f" ({hidden} defaults not shown; --all shows every key)" if hidden else ""))
    return f"{head}\n{tomli_w.dumps(table)}"
