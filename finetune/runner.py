"""One run end to end: recipe -> task -> backbone -> data -> LoRA -> loop -> run folder.

Everything that can fail on user input (recipe, task, backbone, data) is
checked before the run folder is touched, so bad input loses nothing.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.backbones import LoraReport, ResolvedBackbone, attach_lora, resolve_backbone
from finetune.console import Console
from finetune.data import data_changes, data_fingerprints
from finetune.errors import FinetuneError, PluginError, RunError
from finetune.fast_dropout import fast_dropout_applies
from finetune.plugins import PluginRegistry, get_registry
from finetune.recipe import Recipe, load_recipe
from finetune.runs import RunDir, plot_curves, replace_dir_atomic, write_json_atomic, write_text_atomic
from finetune.task import DataSplits, Task

TASK_STATE_FILE = "finetune_task.json"
TRAINED_WEIGHTS_FILE = "trained.safetensors"  # peft.method "none"/"full": the weights that changed


def save_trained_weights(model: Any, path: Path, method: str, state_dict: dict[str, Any] | None = None) -> None:
    """Trainable parameters (and, for full fine-tuning, every buffer such as BatchNorm statistics).
    ``state_dict``: the full state dict gathered from a sharded model, used instead of the model's own."""
    from safetensors.torch import save_file

    full = state_dict if state_dict is not None else model.state_dict()
    if method == "full":  # every weight and persistent buffer (BatchNorm statistics, ...)
        tensors = {n: t.detach().cpu().contiguous() for n, t in full.items()}
    else:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if state_dict is None:
            params = dict(model.named_parameters())
            tensors = {n: params[n].detach().cpu().contiguous() for n in names}
        else:
            names = [n.replace("_fsdp_wrapped_module.", "") for n in names]  # FSDP's wrapper prefixes
            tensors = {n: state_dict[n].detach().cpu().contiguous() for n in names if n in state_dict}
    save_file(tensors, str(path))


def load_trained_weights(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RunError(f"{path}: weights do not fit the model (unexpected {result.unexpected_keys[:3]}...).")


@dataclass
class Session:
    recipe: Recipe
    registry: PluginRegistry
    task: Task
    backbone: ResolvedBackbone
    splits: DataSplits


def _owner(task: Task) -> str:
    entry = get_registry().tasks.get(task.name)
    return f"plugin {entry.plugin!r} ({entry.distribution})" if entry else "the task plugin"


def _guard(plugin_task: Task, what: str, fn, *args, **kwargs):
    """Call a task method; a non-finetune exception is reported naming the plugin."""
    try:
        return fn(*args, **kwargs)
    except FinetuneError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        raise PluginError(f"{_owner(plugin_task)} raised in {type(plugin_task).__name__}.{what}: "
                          f"{type(exc).__name__}: {exc}") from exc


class GuardedTask:
    """Passes everything through to a task; exceptions from its methods name the plugin."""

    def __init__(self, task: Task) -> None:
        object.__setattr__(self, "_task", task)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._task, name)
        if callable(value) and not isinstance(value, type):
            def guarded(*args: Any, **kwargs: Any) -> Any:
                return _guard(self._task, name, value, *args, **kwargs)
            return guarded
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._task, name, value)


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
    if fast_dropout_applies(session.recipe):
        from finetune.fast_dropout import install_fast_dropout

        report.fast_dropout_modules = install_fast_dropout(model)
    return model, processor, report


def speed_settings(task: Task, recipe: Recipe, train_ds: Any, report: LoraReport | None = None) -> list[str]:
    """Speed options in effect that change results compared with plain training, one line each."""
    notes = []
    if report is not None and report.fast_dropout_modules:
        notes.append(f"train.fast_dropout: {report.fast_dropout_modules} dropout layers draw masks with numpy's PCG64 "
                     "on CPU (same probability, different masks than torch's; set it to false for torch's)")
    plain_batches = getattr(type(task), "train_batches", None) is Task.train_batches
    if recipe.train.group_by_length and plain_batches and task.example_lengths(train_ds) is not None:
        notes.append("train.group_by_length: examples of similar length share a batch (less padding); batches "
                     "differ from a plain shuffle (set it to false for plain shuffled batches)")
    return notes + list(task.speed_notes() or [])


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
    from finetune.loop import check_distributed

    check_distributed(session.recipe)
    model, processor, report = build_model(session)
    task = session.task
    train_ds = _guard(task, "build_dataset", task.build_dataset, session.splits.train, processor, training=True)
    _guard(task, "build_dataset", task.build_dataset, session.splits.eval, processor, training=False)
    collate = task.collate_fn(processor)
    n = min(session.recipe.train.batch_size, len(train_ds))
    batch = _guard(task, "collate_fn", collate, [train_ds[i] for i in range(n)])
    speed = _guard(task, "speed_notes", speed_settings, task, session.recipe, train_ds, report)
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
        "speed_settings": speed,
    }
    console.print(f"task:             {info['task']}")
    console.print(f"backbone:         {session.backbone.name} -> {session.backbone.path}")
    console.print(f"                  ({session.backbone.source})")
    console.print(f"LoRA targets:     {report.target_modules}"
                  + (f" in layers {report.layers}" if report.layers is not None else ""))
    console.print(f"trained in full:  {report.modules_to_save}")
    console.print(f"trainable params: {report.trainable_params:,} of {report.total_params:,} "
                  f"({100 * report.trainable_fraction:.2f}%)")
    for key, value in session.splits.info.items():
        console.print(f"data.{key}: {value}")
    for note in speed:
        console.print(f"speed setting:    {note}")
    console.print("one collated batch:")
    for key, value in info["batch"].items():
        console.print(f"  {key}: {value}")
    console.print("recipe is valid; nothing was trained or written.")
    return info


ADAPTER_FILE = "adapter_model.safetensors"


def expected_adapter_tensors(model: Any, method: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor the saved adapter must hold, taken from the whole (not yet
    sharded) model: PEFT's adapter state dict for LoRA, else what :func:`save_trained_weights` writes."""
    if method == "lora":
        from peft import get_peft_model_state_dict

        return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if method == "full":
        return {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def verify_adapter(folder: Path, method: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Reload the weights file just written to ``folder`` and check it against ``expected``
    (every tensor present, non-empty, right shape); a RunError names what is missing."""
    from safetensors import safe_open

    from finetune.loop import check_complete

    name = ADAPTER_FILE if method == "lora" else TRAINED_WEIGHTS_FILE
    try:  # shapes from the file's header: nothing but the header is read
        with safe_open(str(folder / name), framework="pt") as fh:
            tensors = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - a missing or truncated file
        raise RunError(f"the adapter was not written completely ({name}: {type(exc).__name__}: {exc}); the "
                       "previous adapter is intact.") from None
    check_complete(tensors, expected, f"adapter ({name})")


def _save_adapter_fn(run: RunDir, task: Task, processor: Any, method: str,
                     expected: dict[str, tuple[int, ...]] | None = None):
    """``save(unwrapped_model, state_dict=None)``: write the adapter to a temp folder, verify it holds
    every trained tensor (``expected``), then swap it in; on any failure the previous adapter stays.
    ``state_dict`` is the full state dict gathered from a sharded model (FSDP/DeepSpeed)."""
    import shutil

    def save(unwrapped_model: Any, state_dict: dict[str, Any] | None = None) -> None:
        tmp = run.path / f".adapter.tmp-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            if state_dict is not None:  # gathered from a sharded model: every trained tensor must be in it
                trained = [n.replace("_fsdp_wrapped_module.", "") for n, p in unwrapped_model.named_parameters()
                           if p.requires_grad]
                missing = [n for n in trained if n not in state_dict]
                if missing:
                    raise RunError(f"the adapter is incomplete: {len(missing)} of {len(trained)} trained tensors "
                                   f"are missing from the gathered state dict ({', '.join(missing[:5])}). It was "
                                   "not written; the previous one is intact. This happens when weights are taken "
                                   "from one shard of a sharded (FSDP/DeepSpeed) model; please report it with the "
                                   "recipe's [distributed] section.")
            if method == "lora":
                try:
                    unwrapped_model.save_pretrained(str(tmp), state_dict=state_dict)
                except KeyError as exc:  # PEFT looks up each adapter tensor in the (gathered) state dict
                    raise RunError(f"the adapter is incomplete: {exc} is missing from the model's state dict. "
                                   "It was not written; the previous one is intact. This happens when weights are "
                                   "taken from one shard of a sharded (FSDP/DeepSpeed) model; please report it "
                                   "with the recipe's [distributed] section.") from None
            else:
                save_trained_weights(unwrapped_model, tmp / TRAINED_WEIGHTS_FILE, method, state_dict=state_dict)
            if processor is not None and hasattr(processor, "save_pretrained"):
                processor.save_pretrained(str(tmp))
            (tmp / TASK_STATE_FILE).write_text(json.dumps({"task": task.name, "state": task.state}, indent=2))
            if expected is not None:
                verify_adapter(tmp, method, expected)
            replace_dir_atomic(tmp, run.adapter_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = "the previous adapter is intact; " if run.adapter_dir.exists() else ""
            raise RunError(f"cannot write the adapter to {run.adapter_dir} ({exc.strerror or exc}); {kept}the run "
                           "resumes from its last checkpoint with --resume once the folder is writable and has "
                           "space.") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return save


def run_recipe(recipe_path: str | Path, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
               console: Console | None = None) -> RunDir:
    console = console or Console()
    started = time.perf_counter()
    session = open_session(recipe_path, overrides)
    recipe, task = session.recipe, session.task
    check_train_settings(session)
    # Build everything that can fail on user input before the run folder is touched.
    t0 = time.perf_counter()
    model, processor, report = build_model(session)
    load_s = time.perf_counter() - t0
    train_ds = _guard(task, "build_dataset", task.build_dataset, session.splits.train, processor, training=True)
    eval_ds = _guard(task, "build_dataset", task.build_dataset, session.splits.eval, processor, training=False)
    collate = _guard(task, "collate_fn", task.collate_fn, processor)
    speed = _guard(task, "speed_notes", speed_settings, task, recipe, train_ds, report)
    run = RunDir(recipe.output.dir)
    from finetune import loop

    accelerator = loop.make_accelerator(recipe, run.path)
    main = accelerator.is_main_process
    if not main:
        console = Console(enabled=False)  # one progress display, one summary
    # Only the main process touches the run folder; the others learn its decision.
    outcome: list[Any] = [None]
    fingerprints: dict[str, Any] = {}
    if main:
        try:
            fingerprints = data_fingerprints(recipe.data)
            if not overwrite:
                check_data_unchanged(run, fingerprints)
            outcome[0] = ("ok", run.prepare(recipe.to_dict(), recipe.to_toml(), overwrite=overwrite, resume=resume))
        except FinetuneError as exc:
            outcome[0] = ("error", exc)
        except OSError as exc:  # e.g. a read-only or full output folder
            outcome[0] = ("error", RunError(f"output.dir: cannot write the run folder {run.path} "
                                            f"({exc.strerror or exc}); nothing in it was changed. Make it "
                                            "writable (or free space), or choose another output.dir."))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if outcome[0][0] == "error":
        raise outcome[0][1]
    resuming = outcome[0][1]
    resume_from = run.latest_checkpoint() if resuming else None
    if resuming and resume_from is None and main:
        console.print(f"{run.path}: unfinished run without a complete checkpoint; starting it again.")
        run.metrics_log.unlink(missing_ok=True)
    plugins = session.registry.loaded()
    if main:
        run.update_info(status="running", backbone=session.backbone.to_dict(), plugins=plugins,
                        finetune_version=_version(), python=platform.python_version(), data=session.splits.info,
                        trust_remote_code=recipe.model.trust_remote_code,
                        processes=accelerator.num_processes, distributed=recipe.distributed.strategy,
                        speed_settings=speed)
        if not resuming or "data_files" not in run.info():
            run.update_info(data_files=fingerprints)
    console.print(f"run folder: {run.path}" + (f" ({accelerator.num_processes} processes)"
                                               if accelerator.num_processes > 1 else ""))
    try:
        console.print(f"backbone {session.backbone.name} ({session.backbone.source}); loaded in {load_s:.1f} s")
        where = f" in layers {report.layers}" if report.layers is not None else ""
        console.print(f"LoRA on {report.target_modules}{where}; trained in full: {report.modules_to_save}; "
                      f"trainable {report.trainable_params:,} of {report.total_params:,} "
                      f"({100 * report.trainable_fraction:.2f}%)")
        baseline = _guard(task, "baseline", task.baseline, session.splits)
        if baseline:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in baseline.items() if isinstance(v, float))
            console.print(f"baseline ({baseline.get('name', 'simple')}): {shown}")
        result = loop.train(accelerator=accelerator, task=GuardedTask(task), recipe=recipe, run=run, model=model,
                            processor=processor, train_ds=train_ds, eval_ds=eval_ds,
                            collate=functools.partial(_guard, task, "collate_fn() collator", collate),
                            resume_from=resume_from,
                            callbacks=session.registry.callbacks(),
                            save_adapter=_save_adapter_fn(run, task, processor, recipe.peft.method,
                                                          expected_adapter_tensors(model, recipe.peft.method)),
                            console=console)
    except KeyboardInterrupt:
        if main:
            _record_status(run, status="interrupted")
        raise
    except BaseException as exc:
        if main:
            _record_status(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if result.interrupted:
        if main:
            run.update_info(status="interrupted")
        from finetune.loop import Interrupted

        raise Interrupted(f"training stopped at step {result.state.global_step}; the run is resumable: "
                          f"finetune run {recipe.source} --resume")
    state = result.state
    if not main:
        return run  # the main process writes the results
    metrics = {
        "selection_metric": result.metric,
        "selection_mode": result.mode,
        "best": _scalars(state.best_eval),
        "last": _scalars(state.last_eval),
        "baseline": baseline or {},
        "best_details": {k: v for k, v in state.best_eval.items() if k not in _scalars(state.best_eval)},
        "train": {"steps": state.global_step, "steps_planned": result.steps_total,
                  "epochs_completed": state.epoch, "samples_seen": state.samples_seen,
                  "stopped_early": state.stopped_early,
                  "train_time_s": round(state.train_time_s, 2),
                  "samples_per_s": round(state.samples_seen / state.train_time_s, 2) if state.train_time_s else None,
                  "wall_time_s": round(time.perf_counter() - started, 2), "model_load_s": round(load_s, 2),
                  "mixed_precision": result.mixed_precision, **_gpu_memory()},
        "params": {"trainable": report.trainable_params, "total": report.total_params},
        "data": {"train_examples": len(session.splits.train), "eval_examples": len(session.splits.eval)},
    }
    changed = data_changes(fingerprints, data_fingerprints(recipe.data))
    if changed:  # the data was read at the start, so the model is consistent with run.json's record
        run.update_info(data_changed_during_run=changed)
        console.print("warning: data files changed while the run was training (it used the content read at "
                      "the start, fingerprinted in run.json):\n  " + "\n  ".join(changed))
    plot_curves(run.read_metrics_log(), run.curves_file, result.metric)
    _guard(task, "finalize_run", task.finalize_run, run.path, metrics)  # may add entries to metrics
    write_json_atomic(run.metrics_file, metrics)
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
    if recipe.hub.push:
        from finetune.hub import HubError, push_run

        try:
            result = push_run(run.path, recipe.hub.repo_id, private=recipe.hub.private)
        except HubError as exc:
            raise HubError(f"the run finished, but pushing it failed: {exc} Retry with: finetune push {run.path} "
                           f"--repo-id {recipe.hub.repo_id}") from None
        console.print(f"pushed to {result['repo_id']} (commit {result['commit'][:8]})")
    return run


def _record_status(run: RunDir, **fields: Any) -> None:
    """Best effort while an error is on its way out: a read-only or full folder must not replace the
    clear error with a traceback from writing run.json (which then still says "running": resumable)."""
    try:
        run.update_info(**fields)
    except (OSError, RunError):
        pass


def check_data_unchanged(run: RunDir, fingerprints: dict[str, Any]) -> None:
    """An unfinished run resumes only on the data it started with (fingerprints in run.json)."""
    if not run.run_file.exists():
        return
    info = run.info()
    if info.get("status") == "finished" or "data_files" not in info:
        return
    changes = data_changes(info["data_files"], fingerprints)
    if changes:
        raise RunError(f"output.dir: {run.path} holds an unfinished run that started on other data, so it "
                       "cannot be resumed:\n  " + "\n  ".join(changes) + "\nRestore the file(s) to resume, or "
                       "pass --overwrite to start over (or set output.dir for a new run).")


def _gpu_memory() -> dict[str, int]:
    """Peak GPU memory of this process (allocated by tensors), when training ran on a GPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"peak_gpu_memory_mib": int(torch.cuda.max_memory_allocated() // 2**20)}


def check_train_settings(session: Session) -> None:
    """Settings that are only checkable against the task or the environment, checked before training."""
    from finetune.errors import RecipeError

    cfg, task = session.recipe.train, session.task
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RecipeError("train.tensorboard = true needs TensorBoard, which is not installed: "
                              "pip install 'finetune[tensorboard]' (or set it to false).") from None
    hub = session.recipe.hub
    if hub.push:
        from finetune.hub import HUB_ID

        if not hub.repo_id or not HUB_ID.match(hub.repo_id):
            raise RecipeError(f"hub.repo_id: {hub.repo_id!r} is not a Hub repo id; [hub] push = true needs "
                              "repo_id = \"user/name\".")
    from finetune.loop import check_distributed

    check_distributed(session.recipe)
    names = getattr(task, "metric_names", None)
    if cfg.metric and names is not None and cfg.metric not in ("eval_loss", *names):
        from finetune.errors import did_you_mean

        raise RecipeError(f"train.metric: task {task.name!r} does not compute {cfg.metric!r}"
                          f"{did_you_mean(cfg.metric, ('eval_loss', *names))}; available: "
                          f"{', '.join(('eval_loss', *names))}.")


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

def load_run(run_path: str | Path, overrides: list[str] | None = None) -> tuple[Task, Any, Any, RunDir]:
    """Task, trained model (eval mode) and processor from a run folder's best adapter.

    ``overrides`` (``SECTION.KEY=VALUE``) change prediction-time settings of the run's recipe."""
    from peft import PeftModel

    run = RunDir(run_path)
    if not run.recipe_file.exists():
        raise RunError(f"{run.path}: not a finetune run folder (no recipe.toml).")
    if not (run.adapter_dir / TASK_STATE_FILE).exists():
        raise RunError(f"{run.path}: has no trained adapter yet (adapter/ is missing); "
                       "train first, or wait for the first evaluation.")
    registry = get_registry()
    from finetune.recipe import apply_overrides, validate_recipe

    recipe = validate_recipe(apply_overrides(run.resolved_recipe(), overrides or []), registry=registry)
    task = registry.get_task(recipe.task.name)(recipe)
    saved = json.loads((run.adapter_dir / TASK_STATE_FILE).read_text())
    task.state = saved.get("state", {})
    backbone = resolve_backbone(recipe.model.backbone, recipe.model.trust_remote_code, registry=registry)
    model, processor = _guard(task, "load_model", task.load_model, backbone)
    if recipe.peft.method == "lora":
        model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    else:
        load_trained_weights(model, run.adapter_dir / TRAINED_WEIGHTS_FILE)
    model.eval()
    return task, model, processor, run
