"""One run end to end: recipe -> task -> backbone -> data -> LoRA -> loop -> run folder.

Everything that can fail on user input (recipe, task, backbone, data) is
checked before the run folder is touched, so bad input loses nothing.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from finetune.engine import loop
from finetune.engine.console import Console
from finetune.engine.distributed import make_accelerator
from finetune.engine.guard import GuardedCallback
from finetune.engine.quantize import describe as describe_quantization
from finetune.engine.run_folder import RunDir, write_json_atomic, write_text_atomic
from finetune.engine.stop import Interrupted
from finetune.errors import FinetuneError, RunError
from finetune.run.adapter import adapter_writer, best_adapter_loader, expected_adapter_tensors, restore_selected_state
from finetune.run.card import render_model_card
from finetune.run.curves import plot_curves
from finetune.run.data_files import data_changes, data_fingerprints
from finetune.run.recipe_view import recipe_view
from finetune.run.session import Session, build_model, check_train_settings, open_session, speed_settings


def run_recipe(recipe_path: str | Path, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
               console: Console | None = None, callbacks: list[Any] | None = None) -> RunDir:
    """Train as the recipe says. ``callbacks``: loop callbacks of the caller (e.g. ``finetune sweep``'s pruning),
    called after the plugins' ones."""
    console = console or Console()
    started, began = time.perf_counter(), time.time()
    session = open_session(recipe_path, overrides, announce=console.print)
    check_train_settings(session)
    recipe = session.recipe
    run = RunDir(recipe.output.dir)
    # What the run folder allows is known without the model: refuse now rather than after loading the
    # backbone (which can take a minute). Reads only, in every process.
    fingerprints = data_fingerprints(recipe.data)
    run.decide(recipe.to_dict(), overwrite, resume, ignore_locks_since=began)
    if not overwrite:
        check_data_unchanged(run, fingerprints)
    extra = [GuardedCallback(cb, "the core (run_recipe callbacks)") for cb in callbacks or []]
    try:
        return _train(session, run, fingerprints, resume=resume, overwrite=overwrite, console=console,
                      started=started, callbacks=extra)
    finally:
        run.unlock()  # held by the main process while it changes and trains in the folder


def _train(session: Session, run: RunDir, fingerprints: dict[str, Any], *, resume: bool, overwrite: bool,
           console: Console, started: float, callbacks: list[GuardedCallback]) -> RunDir:
    recipe, task = session.recipe, session.task
    # Build everything that can fail on user input before the run folder is touched.
    t0 = time.perf_counter()
    model, processor, report = build_model(session)
    load_s = time.perf_counter() - t0
    train_ds = task.build_dataset(session.splits.train, processor, training=True)
    eval_ds = task.build_dataset(session.splits.eval, processor, training=False)
    test = session.splits.test
    test_ds = None if test is None else task.build_dataset(test, processor, training=False)
    collate = task.collate_fn(processor)
    speed = speed_settings(task, recipe, train_ds, report)
    accelerator = make_accelerator(recipe, run.path)
    main = accelerator.is_main_process
    if not main:
        console = Console(enabled=False)  # one progress display, one summary
    # Only the main process touches the run folder, under its lock, deciding again (the folder may have
    # changed while the model loaded); the others learn its decision.
    outcome: list[Any] = [None]
    if main:
        try:
            run.lock()
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
                        speed_settings=speed, threads=session.threads.to_dict(),
                        quantization=describe_quantization(recipe))
        if not resuming or "data_files" not in run.info():
            run.update_info(data_files=fingerprints)
    console.print(f"run folder: {run.path}" + (f" ({accelerator.num_processes} processes)"
                                               if accelerator.num_processes > 1 else ""))
    if session.threads.wait_policy_from == "auto" and session.threads.wait_policy == "passive":
        console.print(f"busy machine: {session.threads.describe()}")
    try:
        console.print(f"backbone {session.backbone.name} ({session.backbone.source}); loaded in {load_s:.1f} s")
        console.print(report.describe(recipe.peft.method))
        baseline = task.baseline(session.splits)
        if baseline:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in baseline.items() if isinstance(v, float))
            console.print(f"baseline ({baseline.get('name', 'simple')}): {shown}")
        converted = report.initial_adapter is not None  # pissa/olora: saved as a plain LoRA
        result = loop.train(accelerator=accelerator, task=task, recipe=recipe, run=run, model=model,
                            processor=processor, train_ds=train_ds, eval_ds=eval_ds, collate=collate,
                            resume_from=resume_from,
                            callbacks=session.registry.callbacks() + callbacks,
                            save_adapter=adapter_writer(run, task, processor, recipe.peft.method,
                                                          expected_adapter_tensors(model, recipe.peft.method,
                                                                                   converted),
                                                          base_model=session.backbone.upstream_id,
                                                          initial_adapter=report.initial_adapter),
                            console=console, test_ds=test_ds,
                            load_best=best_adapter_loader(run, recipe.peft.method, task, converted))
        # Every process is here: leave together. Trackers are closed, and the process group is taken down
        # now rather than at interpreter exit, where gloo sometimes aborts a process that finished first.
        accelerator.wait_for_everyone()
        accelerator.end_training()
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
        "before": _scalars(state.before_eval),
        **({"test": _scalars(result.test_eval)} if result.test_eval else {}),
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
        "data": {"train_examples": len(session.splits.train), "eval_examples": len(session.splits.eval),
                 **({"test_examples": len(test)} if test is not None else {}),
                 **{k: v for k, v in session.splits.info.items() if k.startswith("dataset") and v is not None}},
    }
    changed = data_changes(fingerprints, data_fingerprints(recipe.data))
    if changed:  # the data was read at the start, so the model is consistent with run.json's record
        run.update_info(data_changed_during_run=changed)
        console.summary("warning: data files changed while the run was training (it used the content read at "
                        "the start, fingerprinted in run.json):\n  " + "\n  ".join(changed))
    plot_curves(run.read_metrics_log(), run.curves_file, result.metric, task_metrics=task.metric_names or (),
                epochs_completed=state.epoch, best_step=state.best_step)
    restore_selected_state(run, task)  # finalize_run and the card see the selected adapter's state
    task.finalize_run(run.path, metrics)  # may add entries to metrics
    _write_report_data(session, run, model, processor, accelerator, plugins, console,
                       {"train": train_ds, "eval": eval_ds, "test": test_ds})
    write_json_atomic(run.metrics_file, metrics)
    card = render_model_card(recipe=recipe.to_dict(), task=task, backbone=session.backbone.to_dict(),
                             metrics=metrics, lora={"target_modules": report.target_modules,
                                                    "modules_to_save": report.modules_to_save,
                                                    "trainable_params": report.trainable_params,
                                                    "total_params": report.total_params},
                             plugins=plugins, settings=recipe_view(recipe)[0], speed=speed,
                             quantization=describe_quantization(recipe))
    write_text_atomic(run.card_file, card)
    run.update_info(status="finished", finished_at=time.time())
    _write_report(run, console)
    _print_summary(console, run, metrics)
    if recipe.hub.push:
        from finetune.run.hub import HubError, push_run

        try:
            result = push_run(run.path, recipe.hub.repo_id, private=recipe.hub.private)
        except HubError as exc:
            raise HubError(f"the run finished, but pushing it failed: {exc} Retry with: finetune push {run.path} "
                           f"--repo-id {recipe.hub.repo_id}") from None
        console.summary(f"pushed to {result['repo_id']} (commit {result['commit'][:8]})")
    return run


def _write_report_data(session: Session, run: RunDir, model: Any, processor: Any, accelerator: Any,
                       plugins: list[dict[str, str]], console: Console, datasets: dict[str, Any]) -> None:
    """report_data.json: data summary, sample predictions of the selected adapter, memory, provenance. A
    failure here is a warning: the run itself finished."""
    from finetune.run.adapter import best_adapter_loader
    from finetune.run.report_data import collect_report_data, write_report_data

    recipe, task = session.recipe, session.task
    sharded = str(accelerator.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED")
    try:
        predict_with, why = None, None
        if sharded:
            why = "the weights are sharded across processes (FSDP / DeepSpeed), so no sample was predicted"
        else:
            unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            best_adapter_loader(run, recipe.peft.method, task)(unwrapped)  # the selected adapter, not the last
            predict_with = (unwrapped, processor)
        data = collect_report_data(task=task, splits=session.splits, datasets=datasets, run_path=run.path,
                                   predict_with=predict_with, why_no_samples=why,
                                   source_folder=recipe.source.parent if recipe.source else None)
        entry = session.registry.tasks.get(recipe.task.name)
        if entry is not None:
            version = next((p["version"] for p in plugins if p["name"] == entry.plugin), None)
            data["task_plugin"] = {"plugin": entry.plugin, "distribution": entry.distribution, "version": version}
        write_report_data(run.path, data)
    except Exception as exc:  # noqa: BLE001 - the report must not fail a run that finished training
        console.summary(f"warning: the run report's data could not be collected ({type(exc).__name__}: {exc}); "
                        "report.html shows what the other files hold.")


def _write_report(run: RunDir, console: Console) -> None:
    from finetune.run.report import write_report

    try:
        write_report(run.path)
    except Exception as exc:  # noqa: BLE001 - the report must not fail a run that finished training
        console.summary(f"warning: report.html could not be written ({type(exc).__name__}: {exc}); "
                        f"`finetune report {run.path}` tries again.")


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


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _print_summary(console: Console, run: RunDir, metrics: dict[str, Any]) -> None:
    best = metrics["best"]
    console.print("")  # apart from the progress above (with --quiet there is none)
    console.summary(f"finished in {metrics['train']['wall_time_s']:.1f} s "
                    f"({metrics['train']['samples_per_s']} samples/s training)")
    shown = _shown(best)
    console.summary(f"best ({metrics['selection_metric']}) at step {best.get('step')}: {shown}  [eval split: "
                    "selects the checkpoint, so optimistic]")
    if metrics.get("test"):
        console.summary(f"test (the selected adapter, scored once): {_shown(metrics['test'])}")
    if metrics.get("before"):
        console.summary(f"before training (step 0): {_shown(metrics['before'])}")
    if metrics["baseline"]:
        base = ", ".join(f"{k}={v:.4f}" for k, v in metrics["baseline"].items() if isinstance(v, float))
        console.summary(f"baseline ({metrics['baseline'].get('name')}): {base}")
    console.summary(f"run folder: {run.path} (adapter/, metrics.json, curves.png, README.md, report.html)")


def _shown(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                     if k not in ("step", "epoch"))


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("finetune")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
