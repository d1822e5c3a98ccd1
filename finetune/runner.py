"""One run end to end: recipe -> task -> backbone -> data -> LoRA -> loop -> run folder.

Everything that can fail on user input (recipe, task, backbone, data) is
checked before the run folder is touched, so bad input loses nothing.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.backbones import LoraReport, ResolvedBackbone, attach_lora, resolve_backbone
from finetune.console import Console
from finetune.errors import FinetuneError, PluginError, RunError
from finetune.plugins import PluginRegistry, get_registry
from finetune.recipe import Recipe, load_recipe
from finetune.runs import RunDir, plot_curves, replace_dir_atomic, write_json_atomic, write_text_atomic
from finetune.task import DataSplits, Task

TASK_STATE_FILE = "finetune_task.json"


@dataclass
class Session:
    recipe: Recipe
    registry: PluginRegistry
    task: Task
    backbone: ResolvedBackbone
    splits: DataSplits


def _guard(plugin_task: Task, what: str, fn, *args, **kwargs):
    """Call a task method; a non-finetune exception is reported naming the plugin."""
    try:
        return fn(*args, **kwargs)
    except FinetuneError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        entry = get_registry().tasks.get(plugin_task.name)
        owner = f"plugin {entry.plugin!r} ({entry.distribution})" if entry else "the task plugin"
        raise PluginError(f"{owner} raised in {type(plugin_task).__name__}.{what}: "
                          f"{type(exc).__name__}: {exc}") from exc


def open_session(recipe_path: str | Path, overrides: list[str] | None = None) -> Session:
    registry = get_registry()
    recipe = load_recipe(recipe_path, overrides, registry=registry)
    task_cls = registry.get_task(recipe.task.name)
    task = task_cls(recipe)
    backbone = resolve_backbone(recipe.model.backbone, recipe.model.trust_remote_code, registry=registry)
    splits = _guard(task, "prepare_data", task.prepare_data)
    return Session(recipe=recipe, registry=registry, task=task, backbone=backbone, splits=splits)


def build_model(session: Session) -> tuple[Any, Any, LoraReport]:
    from accelerate.utils import set_seed

    set_seed(session.recipe.train.seed)
    task = session.task
    model, processor = _guard(task, "load_model", task.load_model, session.backbone)
    model, report = attach_lora(model, session.recipe.peft, task)
    return model, processor, report


def describe_batch(batch: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in batch.items():
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        out[key] = f"{tuple(shape)} {str(dtype).replace('torch.', '')}" if shape is not None else type(value).__name__
    return out


def dry_run(recipe_path: str | Path, overrides: list[str], console: Console) -> dict[str, Any]:
    """Everything up to the first batch, no training, no run folder. Returns the report shown."""
    session = open_session(recipe_path, overrides)
    model, processor, report = build_model(session)
    task = session.task
    train_ds = _guard(task, "build_dataset", task.build_dataset, session.splits.train, processor, training=True)
    _guard(task, "build_dataset", task.build_dataset, session.splits.eval, processor, training=False)
    collate = task.collate_fn(processor)
    n = min(session.recipe.train.batch_size, len(train_ds))
    batch = _guard(task, "collate_fn", collate, [train_ds[i] for i in range(n)])
    console.print("# resolved recipe\n" + session.recipe.to_toml())
    info = {
        "task": f"{task.name} ({type(task).__module__}.{type(task).__name__})",
        "backbone": session.backbone.to_dict(),
        "lora_targets": report.target_modules,
        "modules_to_save": report.modules_to_save,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "data": session.splits.info,
        "batch": describe_batch(batch),
    }
    console.print(f"task:             {info['task']}")
    console.print(f"backbone:         {session.backbone.name} -> {session.backbone.path}")
    console.print(f"                  ({session.backbone.source})")
    console.print(f"LoRA targets:     {report.target_modules}")
    console.print(f"trained in full:  {report.modules_to_save}")
    console.print(f"trainable params: {report.trainable_params:,} of {report.total_params:,} "
                  f"({100 * report.trainable_fraction:.2f}%)")
    for key, value in session.splits.info.items():
        console.print(f"data.{key}: {value}")
    console.print("one collated batch:")
    for key, value in info["batch"].items():
        console.print(f"  {key}: {value}")
    console.print("recipe is valid; nothing was trained or written.")
    return info


def _save_adapter_fn(run: RunDir, task: Task, processor: Any):
    def save(unwrapped_model: Any) -> None:
        tmp = run.path / f".adapter.tmp-{os.getpid()}"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        unwrapped_model.save_pretrained(str(tmp))
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(str(tmp))
        (tmp / TASK_STATE_FILE).write_text(json.dumps({"task": task.name, "state": task.state}, indent=2))
        replace_dir_atomic(tmp, run.adapter_dir)
    return save


def run_recipe(recipe_path: str | Path, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
               console: Console | None = None) -> RunDir:
    console = console or Console()
    started = time.perf_counter()
    session = open_session(recipe_path, overrides)
    recipe, task = session.recipe, session.task
    run = RunDir(recipe.output.dir)
    resuming = run.prepare(recipe.to_dict(), recipe.to_toml(), overwrite=overwrite, resume=resume)
    resume_from = run.latest_checkpoint() if resuming else None
    if resuming and resume_from is None:
        console.print(f"{run.path}: unfinished run without a complete checkpoint; starting it again.")
        for stale in (run.metrics_log,):
            stale.unlink(missing_ok=True)
    plugins = session.registry.loaded()
    run.update_info(status="running", backbone=session.backbone.to_dict(), plugins=plugins,
                    finetune_version=_version(), python=platform.python_version(), data=session.splits.info)
    console.print(f"run folder: {run.path}")
    try:
        result, report, baseline, load_s = _train(session, run, resume_from, console)
    except KeyboardInterrupt:
        run.update_info(status="interrupted")
        raise
    except BaseException as exc:
        run.update_info(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if result.interrupted:
        run.update_info(status="interrupted")
        from finetune.loop import Interrupted

        raise Interrupted(f"training stopped at step {result.state.global_step}; the run is resumable: "
                          f"finetune run {recipe.source} --resume")
    state = result.state
    metrics = {
        "selection_metric": result.metric,
        "selection_mode": result.mode,
        "best": _scalars(state.best_eval),
        "last": _scalars(state.last_eval),
        "baseline": baseline or {},
        "per_class": state.best_eval.get("per_class", {}),
        "train": {"steps": state.global_step, "steps_planned": result.steps_total,
                  "epochs_completed": state.epoch, "samples_seen": state.samples_seen,
                  "stopped_early": state.stopped_early,
                  "train_time_s": round(state.train_time_s, 2),
                  "samples_per_s": round(state.samples_seen / state.train_time_s, 2) if state.train_time_s else None,
                  "wall_time_s": round(time.perf_counter() - started, 2), "model_load_s": round(load_s, 2),
                  "mixed_precision": result.mixed_precision},
        "params": {"trainable": report.trainable_params, "total": report.total_params},
        "data": {"train_examples": len(session.splits.train), "eval_examples": len(session.splits.eval)},
    }
    write_json_atomic(run.metrics_file, metrics)
    plot_curves(run.read_metrics_log(), run.curves_file, result.metric)
    from finetune.card import render_model_card

    card = render_model_card(recipe=recipe.to_dict(), task=task, backbone=session.backbone.to_dict(),
                             metrics=metrics, lora={"target_modules": report.target_modules,
                                                    "modules_to_save": report.modules_to_save,
                                                    "trainable_params": report.trainable_params,
                                                    "total_params": report.total_params},
                             plugins=plugins)
    write_text_atomic(run.card_file, card)
    run.update_info(status="finished", finished_at=time.time())
    _print_summary(console, run, metrics)
    return run


def _train(session: Session, run: RunDir, resume_from: Path | None, console: Console):
    from finetune import loop

    recipe, task = session.recipe, session.task
    t0 = time.perf_counter()
    model, processor, report = build_model(session)
    load_s = time.perf_counter() - t0
    console.print(f"backbone {session.backbone.name} ({session.backbone.source}); loaded in {load_s:.1f} s")
    console.print(f"LoRA on {report.target_modules}; trained in full: {report.modules_to_save}; trainable "
                  f"{report.trainable_params:,} of {report.total_params:,} ({100 * report.trainable_fraction:.2f}%)")
    train_ds = _guard(task, "build_dataset", task.build_dataset, session.splits.train, processor, training=True)
    eval_ds = _guard(task, "build_dataset", task.build_dataset, session.splits.eval, processor, training=False)
    collate = task.collate_fn(processor)
    baseline = _guard(task, "baseline", task.baseline, session.splits)
    if baseline:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in baseline.items() if isinstance(v, float))
        console.print(f"baseline ({baseline.get('name', 'simple')}): {shown}")
    callbacks = session.registry.callbacks()
    result = loop.train(task=task, recipe=recipe, run=run, model=model, processor=processor, train_ds=train_ds,
                        eval_ds=eval_ds, collate=collate, resume_from=resume_from, callbacks=callbacks,
                        save_adapter=_save_adapter_fn(run, task, processor), console=console)
    return result, report, baseline, load_s


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _print_summary(console: Console, run: RunDir, metrics: dict[str, Any]) -> None:
    best = metrics["best"]
    console.print("")
    console.print(f"finished in {metrics['train']['wall_time_s']:.1f} s "
                  f"({metrics['train']['samples_per_s']} samples/s training)")
    shown = ", ".join(f"{k}={v:.4f}" for k, v in best.items() if k not in ("step", "epoch"))
    console.print(f"best ({metrics['selection_metric']}) at step {best.get('step')}: {shown}")
    if metrics["baseline"]:
        base = ", ".join(f"{k}={v:.4f}" for k, v in metrics["baseline"].items() if isinstance(v, float))
        console.print(f"baseline ({metrics['baseline'].get('name')}): {base}")
    console.print(f"run folder: {run.path} (adapter/, metrics.json, curves.png, README.md)")


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("finetune")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------------------
# inference from a run folder

def load_run(run_path: str | Path) -> tuple[Task, Any, Any, RunDir]:
    """Task, PEFT model (eval mode) and processor from a run folder's best adapter."""
    from peft import PeftModel

    run = RunDir(run_path)
    if not run.recipe_file.exists():
        raise RunError(f"{run.path}: not a finetune run folder (no recipe.toml).")
    if not (run.adapter_dir / "adapter_config.json").exists():
        raise RunError(f"{run.path}: has no trained adapter yet (adapter/ is missing); "
                       "train first, or wait for the first evaluation.")
    registry = get_registry()
    from finetune.recipe import validate_recipe

    recipe = validate_recipe(run.resolved_recipe(), registry=registry)
    task = registry.get_task(recipe.task.name)(recipe)
    saved = json.loads((run.adapter_dir / TASK_STATE_FILE).read_text())
    task.state = saved.get("state", {})
    backbone = resolve_backbone(recipe.model.backbone, recipe.model.trust_remote_code, registry=registry)
    model, processor = _guard(task, "load_model", task.load_model, backbone)
    model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    model.eval()
    return task, model, processor, run
