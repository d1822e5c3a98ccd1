"""Loading a finished (or running) run for inference: the task, the model with its best adapter, the processor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.contract.recipe import is_adapter_method
from finetune.contract.task import Task
from finetune.engine.backbones import resolve_backbone
from finetune.engine.plugins import get_registry
from finetune.engine.quantize import check_quantization, keep_training_layout
from finetune.engine.recipe_file import apply_overrides, validate_recipe
from finetune.engine.run_folder import RunDir, missing_run_folder
from finetune.errors import RecipeError, RunError
from finetune.run.adapter import TASK_STATE_FILE, TRAINED_WEIGHTS_FILE, load_trained_weights


def load_run(run_path: str | Path, overrides: list[str] | None = None, *, trust_remote_code: bool = False,
             announce: Callable[[str], None] | None = None,
             full_precision: bool = False) -> tuple[Task, Any, Any, RunDir]:
    """``(task, model, processor, run)`` from a run folder's best adapter, ready for ``task.predict``.

    The task is built from the run's resolved recipe, its ``state`` restored from
    ``adapter/finetune_task.json`` *before* ``load_model`` is called; the model (eval mode) carries the
    adapter (or, for ``peft.method = "none"/"full"``, the trained weights). ``overrides``
    (``SECTION.KEY=VALUE``) change prediction-time settings of the run's recipe. The task is guarded like
    in training: its errors and bad return values name its plugin.

    A run folder may come from elsewhere (``finetune pull``, a copied folder), so its recipe never turns
    on remote code by itself: when the run's backbone needs its own modelling code, the caller's
    ``trust_remote_code=True`` (the user's ``--trust-remote-code``) or the user's own override
    ``model.trust_remote_code=true`` is required. The backbone is the run's pinned revision (downloaded
    when online and not cached); ``announce`` hears about a download first.

    A run trained on a quantized base (``model.quantize``) loads it quantized again, as it trained (bitsandbytes
    is checked first); ``full_precision=True`` loads the full-precision base instead, the one to merge the
    adapter into (merging into 4-bit weights would round the update away)."""
    from peft import PeftModel

    run = RunDir(run_path)
    if not run.path.exists():
        raise missing_run_folder(run.path)
    if not run.recipe_file.exists():
        raise RunError(f"{run.path}: not a finetune run folder (no recipe.toml).")
    if not (run.adapter_dir / TASK_STATE_FILE).exists():
        raise RunError(f"{run.path}: has no trained adapter yet (adapter/ is missing); "
                       "train first, or wait for the first evaluation.")
    registry = get_registry()
    raw = run.resolved_recipe()
    wanted = bool(raw.get("model", {}).get("trust_remote_code"))
    raw.setdefault("model", {})["trust_remote_code"] = False  # the run's own say does not count
    recipe = validate_recipe(apply_overrides(raw, overrides or []), registry.get_task)
    if trust_remote_code:
        recipe.model.trust_remote_code = True
    if wanted and not recipe.model.trust_remote_code:
        raise RecipeError(
            f"{run.path}: this run was trained with model.trust_remote_code = true: its backbone "
            f"{recipe.model.backbone!r} runs its own modelling code on this machine when it loads. A run folder "
            "does not turn that on by itself; if you trust that code, pass --trust-remote-code.")
    if full_precision:
        recipe.model.quantize, recipe.model.quant_type, recipe.model.double_quant = "none", "nf4", True
    task = registry.create_task(recipe)
    check_quantization(recipe, task)
    saved = json.loads((run.adapter_dir / TASK_STATE_FILE).read_text())
    task.state = saved.get("state", {})
    backbone = resolve_backbone(recipe.model.backbone, recipe.model.trust_remote_code, registry=registry,
                                revision=recipe.model.revision, allow_pickled=recipe.model.allow_pickled_weights,
                                announce=announce)
    model, processor = task.load_model(backbone)
    keep_training_layout(model)  # a 4-bit base: bitsandbytes' CPU repacking fails on small layers
    if is_adapter_method(recipe.peft.method):
        model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    else:
        load_trained_weights(model, run.adapter_dir / TRAINED_WEIGHTS_FILE)
    model.eval()
    return task, model, processor, run
