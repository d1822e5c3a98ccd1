"""A test kit for plugin authors (and the built-in plugins, which pass the same checks).

    from finetune.testing import check_plugin, run_task_smoke

    def test_conforms():
        report = check_plugin("my-plugin")          # the entry-point name
        assert report.ok, report.problems

    def test_trains(tmp_path):
        result = run_task_smoke("my-task", tmp_path, rows=[...])   # a real `finetune run`
        assert result.metrics["best"]

:func:`check_plugin` checks what can be checked without running: the hook version, a light import, the
task's attributes, and its methods' names and signatures against :class:`finetune.Task` (a misspelled
method would silently never be called). :func:`run_task_smoke` trains for real through the same path as
``finetune run``, with examples of different lengths and small eval batches (so outputs whose width
differs between batches are exercised), reloads the best adapter from the run folder and predicts.

Nothing here imports torch until a function that needs it is called.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAVY_MODULES = ("torch", "transformers", "peft", "timm", "accelerate")
_REQUIRED_METHODS = ("prepare_data", "build_dataset", "collate_fn", "load_model", "lora_targets", "predict")


@dataclass
class ConformanceReport:
    """What :func:`check_plugin` found: the plugin's tasks, and one line per problem."""

    plugin: str
    tasks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_plugin(entry_point_name: str) -> ConformanceReport:
    """Check an installed plugin against the contract (docs/plugin-reference.md): it loads, declares the
    hook version, imports no heavy library at module level, and each of its tasks has the required
    attributes and methods, with method names and signatures that match ``finetune.Task``."""
    from finetune.contract.hookspecs import HOOK_VERSION
    from finetune.contract.recipe import recipe_model_for
    from finetune.engine.plugins import PluginRegistry

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
        report.problems += [f"task {task_name!r} ({cls.__module__}.{cls.__name__}): {p}" for p in task_problems(cls)]
        try:
            recipe_model_for(cls)
        except Exception as exc:  # noqa: BLE001 - report any schema error
            report.problems.append(f"task {task_name!r}: its options do not form a recipe schema: {exc}")
    return report


def task_problems(cls: type) -> list[str]:
    """What is wrong with a Task subclass against the contract: attributes, required methods, and
    methods whose name or signature does not match ``finetune.Task`` (one line each)."""
    from finetune.contract.recipe import DataOptions, TaskOptions
    from finetune.contract.task import Task
    from finetune.engine.conformance import method_problems
    from finetune.engine.guard import PREDICTION_PREFIXES

    problems = []
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", cls.name or ""):
        problems.append(f"name {cls.name!r} should be lower-case words joined by '-'")
    if not cls.description:
        problems.append("set a one-line description (shown by `finetune tasks`)")
    if not (isinstance(cls.task_options, type) and issubclass(cls.task_options, TaskOptions)):
        problems.append("task_options must subclass finetune.TaskOptions")
    if not (isinstance(cls.data_options, type) and issubclass(cls.data_options, DataOptions)):
        problems.append("data_options must subclass finetune.DataOptions")
    for method in _REQUIRED_METHODS:
        if getattr(cls, method, None) is getattr(Task, method):
            problems.append(f"implement {method}()")
    names = cls.metric_names
    if names is not None and (not isinstance(names, tuple) or not all(isinstance(n, str) for n in names)):
        problems.append(f"metric_names must be a tuple of str, not {names!r}")
    elif names is not None and cls.default_metric not in ("eval_loss", *names):
        problems.append(f"default_metric {cls.default_metric!r} is not in metric_names {names}")
    if not isinstance(cls.lower_is_better, tuple):
        problems.append(f"lower_is_better must be a tuple of metric names, not {cls.lower_is_better!r}")
    fields = cls.prediction_fields
    if not (isinstance(fields, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())):
        problems.append(f"prediction_fields must be a dict of field name -> meaning (str), not {fields!r}")
    else:
        unprefixed = [k for k in fields if not k.startswith(PREDICTION_PREFIXES)]
        if unprefixed:
            problems.append(f"prediction_fields {unprefixed} should start with pred_ (prob_ for a class probability), "
                            "so that a prediction never takes an input column's name")
    if cls.library_name not in ("peft", "transformers", "timm"):
        problems.append("library_name should be peft, transformers or timm (Hub metadata)")
    errors, warnings = method_problems(cls)
    problems += errors + warnings
    return problems


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


def tiny_causal_backbone(folder: str | Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """Save a 2-layer, 32-wide, randomly initialised GPT-2 with a byte-level BPE tokenizer trained on ``texts``
    (in milliseconds) in ``folder``; EOS is ``<|endoftext|>``, the tokenizer has no pad token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(texts or ["a quick answer"]) * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class SmokeResult:
    """A finished smoke run: its folder, metrics.json, and the predictions of the reloaded adapter."""

    run: Any
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


#: The kit's [train] section: fast, deterministic, small eval batches (so their widths differ).
SMOKE_TRAIN = {"epochs": 2, "batch_size": 8, "eval_batch_size": 4, "learning_rate": 1e-2, "mixed_precision": "no",
               "log_every_steps": 2, "seed": 0}


def run_task_smoke(task: str, tmp_path: str | Path, *, rows: list[dict[str, Any]] | None = None,
                   data: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                   backbone: str | Path | None = None, predict_records: list[dict[str, Any]] | None = None,
                   vary_lengths: bool = True) -> SmokeResult:
    """Train ``task`` for real through the same path as ``finetune run``, reload the best adapter from the
    run folder and predict.

    ``rows`` (a list of dicts) is written to ``data.train``: a CSV when every value is a plain scalar,
    else JSON lines (lists, e.g. tokens and tags, stay lists). With ``vary_lengths`` (the default) every
    other row's input fields (the task's ``predict_input_columns``) are made twice as long, strings
    repeated and lists concatenated, together with any list of the same length in that row (e.g. the tags
    of the tokens), so batches differ in width as real data does. ``data`` adds keys to ``[data]``;
    ``recipe`` overrides the kit's recipe key by key (``{"train": {"epochs": 4}}`` keeps the kit's other
    ``[train]`` keys). Without ``backbone`` a tiny random BERT whose vocabulary covers the words in
    ``rows`` is used (for text tasks). The folder ``tmp_path`` is created if needed."""
    import tomli_w

    from finetune.engine.console import Console, quiet_libraries
    from finetune.run.inference import load_run
    from finetune.run.training import run_recipe

    quiet_libraries()
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections: dict[str, Any] = {"task": {"name": task}, "data": dict(data or {}), "peft": {"r": 4, "alpha": 8},
                                "train": dict(SMOKE_TRAIN), "output": {"dir": str(tmp_path / "smoke-run")}}
    _merge(sections, recipe or {})
    original_rows = rows
    if rows is not None:
        if vary_lengths:
            rows = _vary_lengths(rows, _input_fields(task, sections))
        sections["data"].setdefault("train", str(_write_rows(tmp_path, rows)))
    if backbone is not None:
        sections.setdefault("model", {})["backbone"] = str(backbone)
    elif "backbone" not in sections.get("model", {}):
        words = sorted({w for r in rows or [] for v in r.values() for w in _words(v)})
        sections.setdefault("model", {})["backbone"] = str(tiny_text_backbone(tmp_path / "tiny-backbone", words))
    recipe_path = tmp_path / "smoke.toml"
    recipe_path.write_text(tomli_w.dumps(sections))
    run = run_recipe(recipe_path, [], console=Console(quiet=True))
    assert run.is_finished(), f"run did not finish: {run.info()}"
    for name in ("recipe.toml", "metrics.json", "README.md", "curves.png"):
        assert (run.path / name).exists(), f"run folder lacks {name}"
    metrics = json.loads(run.metrics_file.read_text())
    task_obj, model, processor, _ = load_run(run.path)
    if predict_records is None and original_rows is not None:
        columns = task_obj.predict_input_columns()
        predict_records = [{c: r[c] for c in columns if c in r} for r in original_rows[:4]]
    predictions: list[dict[str, Any]] = []
    if predict_records:
        import torch

        with torch.no_grad():
            predictions = task_obj.predict(model, processor, predict_records)
    return SmokeResult(run=run, metrics=metrics, predictions=predictions)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Overrides into ``base`` key by key (sections and sub-tables merge; values replace)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _input_fields(task: str, sections: dict[str, Any]) -> list[str]:
    """The task's ``predict_input_columns`` for the kit's recipe (no data is read to ask)."""
    from finetune.engine.plugins import get_registry
    from finetune.engine.recipe_file import validate_recipe

    registry = get_registry()
    raw = copy.deepcopy(sections)
    raw["data"].setdefault("train", "rows")
    raw.setdefault("model", {}).setdefault("backbone", "tiny")
    try:
        return list(registry.create_task(validate_recipe(raw, registry.get_task)).predict_input_columns())
    except Exception:  # noqa: BLE001 - a task that cannot say: lengths stay as they are
        return []


def _vary_lengths(rows: list[dict[str, Any]], inputs: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        row = copy.deepcopy(row)
        if i % 2:
            lengths = {len(row[c]) for c in inputs if isinstance(row.get(c), list)}
            for key, value in row.items():
                if key in inputs and isinstance(value, str) and value.strip():
                    row[key] = f"{value} {value}"
                elif isinstance(value, list) and (key in inputs or len(value) in lengths):
                    row[key] = value + value
        out.append(row)
    return out


def _write_rows(folder: Path, rows: list[dict[str, Any]]) -> Path:
    if any(isinstance(v, (list, dict)) for r in rows for v in r.values()):
        path = folder / "smoke-train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    import csv

    path = folder / "smoke-train.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _words(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.lower().split()
    if isinstance(value, list):
        return [w for v in value for w in _words(v)]
    return []
