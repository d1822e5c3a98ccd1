"""``finetune evaluate RUN --input FILE``: score a trained run on any labelled file with its task's metrics.

The run is loaded as for ``predict`` (its best adapter), the file is read by the task's
``read_examples`` (so it takes what ``data.train`` takes: a table, or a folder for image and audio
tasks), and one evaluation runs exactly as during training: the same batching, ``evaluation_step``,
``compute_metrics`` and ``finalize_eval``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.errors import DataError, RecipeError


def evaluate_run(run_path: str | Path, input_path: Path, overrides: list[str] | None = None, *,
                 batch_size: int | None = None, trust_remote_code: bool = False,
                 announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{"run", "input", "examples", "adapter_step", "metrics", "details"}``: the scalar metrics of the
    run's best adapter on ``input_path`` (``metrics``) and the nested ones (``details``, e.g. a per-class
    report)."""
    import torch
    from accelerate import Accelerator

    from finetune.engine.evaluation import evaluate, evaluation_loader
    from finetune.engine.precision import resolve_mixed_precision
    from finetune.run.inference import load_run

    if not input_path.exists():
        raise DataError(f"--input: {input_path} not found.")
    task, model, processor, run = load_run(run_path, overrides, trust_remote_code=trust_remote_code,
                                           announce=announce)
    if not task.implements("read_examples"):
        raise RecipeError(f"--input: task {task.name!r} ({task.owner}) cannot read a labelled file (it does not "
                          "implement Task.read_examples); score its predictions from `finetune predict` instead.")
    examples = task.read_examples(input_path, "--input")
    dataset = task.build_dataset(examples, processor, training=False)
    if len(dataset) == 0:
        raise DataError(f"--input: {input_path} holds no examples.")
    cfg = task.recipe.train
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                              cpu=not torch.cuda.is_available())
    model = accelerator.prepare(model)
    loader = evaluation_loader(task, dataset, task.collate_fn(processor), accelerator,
                               batch_size=batch_size or cfg.eval_batch_size or 2 * cfg.batch_size,
                               longest_first=cfg.group_by_length)
    metrics = evaluate(task, model, loader, accelerator, "input")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"run": str(run.path), "input": str(input_path), "examples": len(dataset),
            "adapter_step": _adapter_step(run.metrics_file), "metrics": scalars,
            "details": {k: v for k, v in metrics.items() if k not in scalars}}


def _adapter_step(metrics_file: Path) -> int | None:
    """The step of the adapter in the run folder (the best evaluation), when the run finished."""
    try:
        return json.loads(metrics_file.read_text()).get("best", {}).get("step")
    except (OSError, ValueError):
        return None
