"""A test kit for plugin authors (and the built-in plugins, which pass the same checks).

    from finetune.testing import check_plugin, run_task_smoke

    def test_conforms():
        report = check_plugin("my_plugin")          # the entry-point name
        assert report.ok, report.problems

    def test_trains(tmp_path):
        result = run_task_smoke("my-task", tmp_path, rows=[...])   # a real `finetune run`
        assert result.metrics["best"]

Nothing here imports torch until a function that needs it is called.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAVY_MODULES = ("torch", "transformers", "peft", "timm", "accelerate")
_REQUIRED_METHODS = ("prepare_data", "build_dataset", "collate_fn", "load_model", "predict")


@dataclass
class ConformanceReport:
    plugin: str
    tasks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_plugin(entry_point_name: str) -> ConformanceReport:
    """Check an installed plugin against the contract in finetune/hookspecs.py and finetune/task.py."""
    from finetune.plugins import HOOK_VERSION, PluginRegistry
    from finetune.recipe import DataOptions, TaskOptions, recipe_model_for
    from finetune.task import Task

    report = ConformanceReport(plugin=entry_point_name)
    registry = PluginRegistry()
    registry.load_entry_points()
    info = next((p for p in registry.plugins if p.name == entry_point_name), None)
    if info is None:
        report.problems.append(f"no entry point named {entry_point_name!r} in the 'finetune' group; "
                               "is the plugin installed (pip install -e .)?")
        return report
    if info.error:
        report.problems.append(f"plugin failed to load: {info.error}")
        return report
    report.tasks = list(info.tasks)
    module = registry.pm.get_plugin(entry_point_name)
    declared = getattr(module, "finetune_hook_version", None)
    if declared is None:
        report.problems.append(f"declare finetune_hook_version = {HOOK_VERSION!r} at module level")
    for conflict in registry.conflicts:
        if f"{entry_point_name!r}" in conflict:
            report.problems.append(conflict)

    heavy = _heavy_imports_of(info.module)
    if heavy:
        report.problems.append(f"importing {info.module!r} imports {', '.join(heavy)}; move those imports into "
                               "hook or Task method bodies (the CLI imports every plugin at start-up)")

    for task_name in info.tasks:
        cls = registry.tasks[task_name].cls
        where = f"task {task_name!r} ({cls.__module__}.{cls.__name__})"
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", task_name):
            report.problems.append(f"{where}: name should be lower-case words joined by '-'")
        if not cls.description:
            report.problems.append(f"{where}: set a one-line description (shown by `finetune tasks`)")
        if not (isinstance(cls.task_options, type) and issubclass(cls.task_options, TaskOptions)):
            report.problems.append(f"{where}: task_options must subclass finetune.TaskOptions")
        if not (isinstance(cls.data_options, type) and issubclass(cls.data_options, DataOptions)):
            report.problems.append(f"{where}: data_options must subclass finetune.DataOptions")
        for method in _REQUIRED_METHODS:
            if getattr(cls, method) is getattr(Task, method):
                report.problems.append(f"{where}: implement {method}()")
        if cls.lora_targets is Task.lora_targets:
            report.problems.append(f"{where}: implement lora_targets() so target_modules = \"auto\" works")
        names = cls.metric_names
        if names is not None and cls.default_metric not in ("eval_loss", *names):
            report.problems.append(f"{where}: default_metric {cls.default_metric!r} is not in metric_names {names}")
        if cls.library_name not in ("peft", "transformers", "timm"):
            report.problems.append(f"{where}: library_name should be peft, transformers or timm (Hub metadata)")
        try:
            recipe_model_for(cls)
        except Exception as exc:  # noqa: BLE001 - report any schema error
            report.problems.append(f"{where}: its options do not form a recipe schema: {exc}")
    return report


def _heavy_imports_of(module: str) -> list[str]:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return [f"(import failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'})"]
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


# ---------------------------------------------------------------------------
# tiny models and an end-to-end smoke run

def tiny_text_backbone(folder: str | Path, words: list[str] | None = None, seed: int = 0,
                       **config: Any) -> Path:
    """Save a 2-layer, 32-wide, randomly initialised BERT with a word-level vocabulary in ``folder``
    (``config`` overrides BertConfig fields, e.g. ``hidden_dropout_prob=0.0``)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = base + sorted(set(words or []) - set(base)) + list("abcdefghijklmnopqrstuvwxyz0123456789")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))  # transformers 5: vocab=, not vocab_file=
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        **{"initializer_range": 0.2, **config})  # a wide init: token identity survives to [CLS]
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class SmokeResult:
    run: Any
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


def run_task_smoke(task: str, tmp_path: str | Path, *, rows: list[dict[str, Any]] | None = None,
                   data: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                   backbone: str | Path | None = None, predict_records: list[dict[str, Any]] | None = None,
                   ) -> SmokeResult:
    """Train ``task`` for real through the same path as ``finetune run``, reload the best adapter
    from the run folder and predict.

    ``rows`` (a list of dicts) is written to a CSV used as ``data.train``; ``data`` adds keys to
    ``[data]``; ``recipe`` adds/overrides whole sections. Without ``backbone`` a tiny random BERT
    whose vocabulary covers the words in ``rows`` is used (for text tasks).
    """
    import tomli_w

    from finetune.console import Console
    from finetune.runner import load_run, run_recipe

    tmp_path = Path(tmp_path)
    sections: dict[str, Any] = {"task": {"name": task}, "data": dict(data or {}),
                                "peft": {"r": 4, "alpha": 8},
                                "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2,
                                          "mixed_precision": "no", "log_every_steps": 2, "seed": 0},
                                "output": {"dir": str(tmp_path / "smoke-run")}}
    if rows is not None:
        import csv

        train = tmp_path / "smoke-train.csv"
        with open(train, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        sections["data"].setdefault("train", str(train))
    if backbone is None:
        words = sorted({w for r in rows or [] for v in r.values() if isinstance(v, str) for w in v.lower().split()})
        backbone = tiny_text_backbone(tmp_path / "tiny-backbone", words)
    sections["model"] = {"backbone": str(backbone)}
    for key, value in (recipe or {}).items():
        sections.setdefault(key, {}).update(value)
    recipe_path = tmp_path / "smoke.toml"
    recipe_path.write_text(tomli_w.dumps(sections))
    run = run_recipe(recipe_path, [], console=Console(quiet=True))
    assert run.is_finished(), f"run did not finish: {run.info()}"
    for name in ("recipe.toml", "metrics.json", "README.md", "curves.png"):
        assert (run.path / name).exists(), f"run folder lacks {name}"
    metrics = json.loads(run.metrics_file.read_text())
    task_obj, model, processor, _ = load_run(run.path)
    if predict_records is None and rows is not None:
        columns = task_obj.predict_input_columns()
        predict_records = [{c: r[c] for c in columns} for r in rows[:4]]
    predictions: list[dict[str, Any]] = []
    if predict_records:
        import torch

        with torch.no_grad():
            predictions = task_obj.predict(model, processor, predict_records)
        assert len(predictions) == len(predict_records), "predict() must return one row per input record"
    return SmokeResult(run=run, metrics=metrics, predictions=predictions)
