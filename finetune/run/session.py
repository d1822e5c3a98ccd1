"""Setting up a run: recipe -> task -> backbone -> data -> model with LoRA attached.

Everything that can fail on user input (recipe, task, backbone, data) is checked here, before a
run folder is touched, so bad input loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.contract.backbone import ResolvedBackbone
from finetune.contract.recipe import Recipe
from finetune.contract.task import DataSplits
from finetune.engine import fast_dropout, threads
from finetune.engine.backbones import resolve_backbone
from finetune.engine.guard import GuardedTask
from finetune.engine.lora import LoraReport, attach_lora, check_peft, load_start_adapter
from finetune.engine.plugins import PluginRegistry, get_registry
from finetune.engine.quantize import check_quantization, prepare_for_training
from finetune.engine.recipe_file import load_recipe
from finetune.errors import RecipeError, did_you_mean


@dataclass
class Session:
    """A recipe read and checked, its task (guarded: errors name its plugin), backbone and data."""

    recipe: Recipe
    registry: PluginRegistry
    task: GuardedTask
    backbone: ResolvedBackbone
    splits: DataSplits
    threads: threads.ThreadChoice


def open_session(recipe_path: str | Path, overrides: list[str] | None = None,
                 announce: Callable[[str], None] | None = None) -> Session:
    """Read and validate the recipe, resolve the backbone, read the data (``Task.prepare_data``).

    A backbone from the Hub pins its commit into the recipe (``model.revision``), so the run folder's
    recipe.toml says exactly which weights it trained; ``announce`` hears about a download first."""
    registry = get_registry()
    recipe = load_recipe(recipe_path, overrides, registry.get_task)
    # Before the backbone: resolving it imports torch, and OpenMP reads its settings once, then.
    chosen = threads.apply(threads.choose(recipe.train.threads, recipe.train.wait_policy))
    task = registry.create_task(recipe)
    backbone = resolve_backbone(recipe.model.backbone, recipe.model.trust_remote_code, registry=registry,
                                revision=recipe.model.revision, allow_pickled=recipe.model.allow_pickled_weights,
                                announce=announce)
    if backbone.revision:
        recipe.model.revision = backbone.revision
    splits = task.prepare_data()
    check_test_split(recipe, task, splits)
    return Session(recipe=recipe, registry=registry, task=task, backbone=backbone, splits=splits, threads=chosen)


def check_test_split(recipe: Recipe, task: GuardedTask, splits: DataSplits) -> None:
    """A recipe that asks for a test split gets one, or a clear refusal (a task that ignores the keys
    would otherwise report no test numbers without saying why)."""
    keys = [f"data.{k}" for k in ("test", "test_split", "dataset_test_split") if getattr(recipe.data, k, None)]
    if keys and splits.test is None:
        raise RecipeError(f"{keys[0]}: task {task.name!r} ({task.owner}) does not read a test split; unset "
                          f"{keys[0]} and score the trained run with `finetune evaluate RUN --input FILE`.")
    if not keys and splits.test is not None:
        raise task.fail("prepare_data", "returned a test split although the recipe sets no data.test, "
                                        "data.test_split or data.dataset_test_split")


def build_model(session: Session) -> tuple[Any, Any, LoraReport]:
    """The task's model with what trains attached (LoRA, the head, or everything) and fast dropout."""
    from accelerate.utils import set_seed

    set_seed(session.recipe.train.seed)
    task = session.task
    check_peft(session.recipe, task)
    check_quantization(session.recipe, task)
    model, processor = task.load_model(session.backbone)
    model = prepare_for_training(model)  # a quantized base (model.quantize): PEFT's k-bit preparation
    model, report = attach_lora(model, session.recipe.peft, task)
    if session.recipe.model.start_from:
        report.started_from = load_start_adapter(model, session.recipe)
    if fast_dropout.fast_dropout_applies(session.recipe):
        report.fast_dropout_modules = fast_dropout.install_fast_dropout(model)
    return model, processor, report


def speed_settings(task: GuardedTask, recipe: Recipe, train_ds: Any, report: LoraReport | None = None) -> list[str]:
    """Speed options in effect that change results compared with plain training, one line each, in a user's
    words: the setting, what it does, what it gains, how results compare, how to turn it off."""
    notes = []
    if report is not None and report.fast_dropout_modules:
        notes.append(fast_dropout.describe(report.fast_dropout_modules))
    plain_batches = not task.implements("train_batches")
    if recipe.train.group_by_length and plain_batches and task.example_lengths(train_ds) is not None:
        notes.append("train.group_by_length: examples of similar length are batched together: less padding, so "
                     "faster; the batches are not a plain shuffle, so results differ slightly (set it to false for "
                     "plain shuffled batches)")
    return notes + list(task.speed_notes() or [])


def check_train_settings(session: Session) -> None:
    """Settings that are only checkable against the task or the environment, checked before training."""
    cfg, task = session.recipe.train, session.task
    from finetune.engine.tracking import check_trackers

    check_trackers(session.recipe.track)
    from finetune.run.card import check_project_url

    check_project_url()
    hub = session.recipe.hub
    if hub.push:
        from finetune.run.hub import HUB_ID

        if not hub.repo_id or not HUB_ID.match(hub.repo_id):
            raise RecipeError(f"hub.repo_id: {hub.repo_id!r} is not a Hub repo id; [hub] push = true needs "
                              "repo_id = \"user/name\".")
    from finetune.engine.distributed import check_distributed

    check_distributed(session.recipe)
    names = getattr(task, "metric_names", None)
    if cfg.metric and names is not None and cfg.metric not in ("eval_loss", *names):
        raise RecipeError(f"train.metric: task {task.name!r} does not compute {cfg.metric!r}"
                          f"{did_you_mean(cfg.metric, ('eval_loss', *names))}; available: "
                          f"{', '.join(('eval_loss', *names))}.")
