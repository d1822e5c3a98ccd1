"""Plugin code, attributed: the one place the core calls a plugin's task or callbacks through.

Anything a plugin raises (other than a :class:`finetune.FinetuneError`, which is already a message
for the user) becomes a :class:`PluginError` naming the plugin, its distribution, the task class and
the method. What a task *returns* is checked against the contract here too (a dict where a dict is
due, a loss that is a scalar with a gradient, one prediction per example, ...), so a bad value is
reported where it was made, not as a numpy or torch error deep inside the loop. The CLI prints these
errors without a traceback (``--debug`` shows one).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune.contract.task import DataSplits, Task
from finetune.errors import FinetuneError, PluginError, did_you_mean

#: Keys ``Task.evaluation_step`` may return.
EVAL_KEYS = ("loss", "predictions", "references")


def attributed(owner: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an exception other than a FinetuneError becomes a PluginError
    "``owner`` raised in ``where``: Type: message" (chained, so ``--debug`` shows the plugin's traceback)."""
    try:
        return fn(*args, **kwargs)
    except FinetuneError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        raise PluginError(f"{owner} raised in {where}: {type(exc).__name__}: {exc}") from exc


class GuardedTask:
    """A task whose methods the core calls: exceptions name the plugin, return values are checked.

    Attributes pass through (reading and setting), so the core reads ``task.name``, ``task.state``,
    ``task.default_metric`` as usual; ``task.task`` is the plugin's own object."""

    def __init__(self, task: Task, owner: str) -> None:
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "owner", owner)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.task, name)
        if not inspect.ismethod(value):  # data, classes, models stored on the task: as they are
            return value

        if name == "predict":
            return self.guarded_predict(value)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attributed(self.owner, self.where(name), value, *args, **kwargs)
            check = _RETURN_CHECKS.get(name)
            problem = check(result, *args, **kwargs) if check is not None else None
            if problem:
                raise self.fail(name, problem)
            if name == "collate_fn":  # the collator it returns is plugin code too
                return self.guarded_collator(result)
            return result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.task, name, value)

    def implements(self, method: str) -> bool:
        """Whether the task overrides ``Task.method`` (rather than inheriting the default)."""
        return getattr(type(self.task), method, None) is not getattr(Task, method, None)

    def where(self, method: str) -> str:
        return f"{type(self.task).__name__}.{method}"

    def fail(self, method: str, problem: str) -> PluginError:
        """The error for a value the task returned from ``method`` that breaks the contract."""
        return PluginError(f"{self.owner}: {self.where(method)} {problem} (see docs/plugin-reference.md, "
                           f"Task.{method})")

    def guarded_collator(self, collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
        def collator(items: list[Any]) -> Any:
            batch = attributed(self.owner, f"{self.where('collate_fn')}() collator", collate, items)
            problem = _check_batch(batch, items)
            if problem:
                raise self.fail("collate_fn", f"returned a collator that {problem}")
            return batch

        return collator


    def guarded_predict(self, predict: Callable[..., Any]) -> Callable[..., Any]:
        """``predict`` whose rows are checked against the records as they were given (a copy taken before
        the call, so that a record changed in place is caught too)."""

        def call(model: Any, processor: Any, records: Any, *args: Any, **kwargs: Any) -> Any:
            given = [dict(r) if isinstance(r, Mapping) else r for r in records]
            rows = attributed(self.owner, self.where("predict"), predict, model, processor, records, *args, **kwargs)
            problem = (_check_predictions(rows, model, processor, given)
                       or prediction_row_problem(rows, given, type(self.task).prediction_fields))
            if problem:
                raise self.fail("predict", problem)
            return rows

        return call


class GuardedCallback:
    """A callback registered by a plugin: its methods are optional, and its exceptions name the plugin."""

    def __init__(self, callback: Any, owner: str) -> None:
        self.callback = callback
        self.owner = f"{owner}, callback {type(callback).__name__}"

    def notify(self, event: str, **kwargs: Any) -> None:
        fn = getattr(self.callback, event, None)
        if fn is not None:
            try:
                attributed(self.owner, event, fn, **kwargs)
            except PluginError as exc:
                raise PluginError(f"{exc}; the run is resumable (finetune run RECIPE --resume) once that is "
                                  "fixed") from exc.__cause__


# ---------------------------------------------------------------------------
# what each method must return (None: fine; else the problem, phrased after "Task.method ...")

def _kind(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"a {type(value).__name__} of shape {tuple(shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"{type(value).__name__} {value!r}"[:120]


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "detach")


def _batch_size(batch: Mapping[str, Any]) -> int | None:
    for value in batch.values():
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape):
            return int(shape[0])
    return None


def _check_splits(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(value, DataSplits):
        return f"returned {_kind(value)}; it must return finetune.DataSplits(train=..., eval=...)"
    for split in ("train", "eval", "test"):
        part = getattr(value, split)
        if part is None and split == "test":
            continue
        if not hasattr(part, "__len__"):
            return f"returned DataSplits whose {split} ({type(part).__name__}) has no len(); give a sized sequence"
        if len(part) == 0:
            return (f"returned an empty {split} split; raise finetune.DataError naming the file when the data "
                    "has no examples")
    return None


def _check_model(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not (isinstance(value, tuple) and len(value) == 2):
        return f"returned {_kind(value)}; it must return a tuple (model, processor) (processor may be None)"
    if not hasattr(value[0], "named_parameters"):
        return f"returned a model of type {type(value[0]).__name__}, which is not a torch.nn.Module"
    return None


def _check_names(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return f"returned {_kind(value)}; it must return module names (a list of str) or a regex (str)"


def _check_name_list(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return None
    return f"returned {_kind(value)}; it must return a list of str"


def _check_dataset(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        return (f"returned {type(value).__name__}, which has no len() or [i]; it must return a map-style dataset "
                "(a list works)")
    return None


def _check_callable(value: Any, *args: Any, **kwargs: Any) -> str | None:
    return None if callable(value) else f"returned {_kind(value)}; it must return a function (items -> batch)"


def _check_batch(batch: Any, items: list[Any]) -> str | None:
    if not isinstance(batch, Mapping) or not batch:
        return f"returned {_kind(batch)}; a batch must be a non-empty dict of tensors"
    size = _batch_size(batch)
    if size is None:
        return f"returned a batch with no tensor ({', '.join(map(str, batch))}); a batch is a dict of tensors"
    if size != len(items):
        return f"returned a batch of {size} rows for {len(items)} examples"
    return None


def _check_loss(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not _is_tensor(value) or value.numel() != 1:
        return f"returned {_kind(value)}; it must return the batch's loss as a scalar tensor"
    if not value.requires_grad:
        return ("returned a loss that does not require grad (computed under no_grad, detached, or not from the "
                "model's trainable parameters); return the tensor the model computed")
    return None


def _check_eval_output(value: Any, model: Any = None, batch: Any = None, **kwargs: Any) -> str | None:
    if not isinstance(value, Mapping):
        return f"returned {_kind(value)}; it must return a dict with 'loss' and/or 'predictions' + 'references'"
    unknown = [k for k in value if k not in EVAL_KEYS]
    if unknown:
        return (f"returned the key {unknown[0]!r}{did_you_mean(str(unknown[0]), EVAL_KEYS)}; the keys are "
                f"{', '.join(EVAL_KEYS)}")
    loss = value.get("loss")
    if loss is not None and (not _is_tensor(loss) or loss.numel() != 1):
        return f"returned a 'loss' that is {_kind(loss)}; it must be a scalar tensor (or leave it out)"
    has = [k for k in ("predictions", "references") if value.get(k) is not None]
    if len(has) == 1:
        missing = "references" if has == ["predictions"] else "predictions"
        return f"returned {has[0]!r} without {missing!r}; give both (compute_metrics receives them together)"
    size = _batch_size(batch) if isinstance(batch, Mapping) else None
    for key in has:
        out = value[key]
        if _is_tensor(out):
            if out.dim() == 0:
                return f"returned {key!r} as a 0-d tensor; give one row per example (shape [batch, ...])"
            rows = int(out.shape[0])
        elif isinstance(out, (list, tuple)):
            rows = len(out)
        else:
            return (f"returned {key!r} as {type(out).__name__}; give a tensor [batch, ...] or a list (one item per "
                    "example)")
        if size is not None and rows != size:
            return (f"returned {key!r} of {_kind(out)} for a batch of {size} examples; the first dimension must be "
                    "the batch (one row per example)")
    if loss is None and not has:
        return "returned neither 'loss' nor 'predictions'; an evaluation needs at least one"
    return None


def _check_metrics(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        return f"returned {_kind(value)}; it must return a dict of metric name -> number (or a nested dict)"
    for key, metric in value.items():
        # a numpy or torch scalar would silently not count as a scalar metric (and not be logged)
        if getattr(metric, "ndim", None) == 0 and not isinstance(metric, (int, float)):
            return (f"returned {key!r} as {type(metric).__module__}.{type(metric).__name__}; give Python numbers "
                    f"(float(value)) so it is logged, shown and can select the best checkpoint")
    return None


def _check_batches(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(b, (list, tuple)) for b in value):
        return f"returned {_kind(value)}; it must return a list of batches, each a list of example indices"
    return None


def _check_lengths(value: Any, dataset: Any = None, *args: Any, **kwargs: Any) -> str | None:
    if value is None:
        return None
    if not hasattr(value, "__len__") or (dataset is not None and len(value) != len(dataset)):
        return (f"returned {_kind(value)} for a dataset of {len(dataset) if dataset is not None else '?'} "
                "examples; give one length per example, in dataset order, or None")
    return None


def _check_optional_dict(value: Any, *args: Any, **kwargs: Any) -> str | None:
    return None if value is None or isinstance(value, Mapping) else f"returned {_kind(value)}; give a dict or None"


def _check_predictions(value: Any, model: Any = None, processor: Any = None, records: Any = None,
                       **kwargs: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(r, Mapping) for r in value):
        return f"returned {_kind(value)}; it must return a list of dicts (one per input record)"
    if records is not None and len(value) != len(records):
        return f"returned {len(value)} rows for {len(records)} input records; give one row per record, in order"
    return None


#: Prefixes of the fields a prediction adds (``Task.predict``): never the name of an input column.
PREDICTION_PREFIXES = ("pred_", "prob_")


def prediction_row_problem(rows: list[Mapping[str, Any]], records: list[Mapping[str, Any]],
                           declared: Mapping[str, str]) -> str | None:
    """What is wrong with predicted ``rows`` against their input ``records`` (None: nothing): an input field
    changed or left out (encoded bytes may be left out: no output file holds them), or an added field not
    named ``pred_*``/``prob_*``, or (when the task declares ``prediction_fields``) not declared there."""
    patterns = [re.compile(re.sub(r"<[^>]*>", ".+", re.escape(name))) for name in declared]
    for number, (row, record) in enumerate(zip(rows, records), start=1):
        for key, value in record.items():
            if key not in row:
                if isinstance(value, (bytes, bytearray)):
                    continue
                return (f"left out the input field {key!r} of record {number}; a row keeps every field of its "
                        "input record (the user's data) and adds its own")
            if not _same(row[key], value):
                return (f"changed the input field {key!r} of record {number} ({_short(value)} -> "
                        f"{_short(row[key])}); a prediction must not overwrite the user's data: give it a field "
                        "of its own named pred_<name> (prob_<class> for a class probability)")
        for key in row:
            if key in record:
                continue
            if not (isinstance(key, str) and key.startswith(PREDICTION_PREFIXES)):
                return (f"added the field {key!r} to record {number}; name prediction fields pred_<name> "
                        "(prob_<class> for a class probability) so that they never take an input column's name")
            if patterns and not any(p.fullmatch(key) for p in patterns):
                return (f"added the field {key!r} to record {number}, which its prediction_fields do not list "
                        f"({', '.join(declared)}); list it there (`finetune predict --help` shows them)")
    return None


def _same(a: Any, b: Any) -> bool:
    """Whether two field values are equal (NaN equals NaN: an empty table cell; arrays compare whole)."""
    if a is b:
        return True
    try:
        equal = a == b
        if hasattr(equal, "all"):
            return bool(equal.all())
        return bool(equal) or (a != a and b != b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_optional_text(value: Any, *args: Any, **kwargs: Any) -> str | None:
    return None if value is None or isinstance(value, str) else f"returned {_kind(value)}; give a str or None"


def _check_drawn(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(p, (str, Path)) for p in value):
        return f"returned {_kind(value)}; it must return the list of paths it wrote"
    missing = [str(p) for p in value if not Path(p).is_file()]
    if missing:
        return f"returned paths that are not files: {missing[:3]}; return only the files it wrote"
    return None


def _check_records(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(r, Mapping) for r in value):
        return f"returned {_kind(value)}; it must return a list of dicts (one per input record)"
    return None


def _check_data_summary(value: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(value, Mapping):
        return f"returned {_kind(value)}; give a dict (label_counts, facts) or {{}}"
    unknown = [k for k in value if k not in ("label_counts", "facts")]
    if unknown:
        return f"returned the key {unknown[0]!r}; the keys it may return are 'label_counts' and 'facts'"
    counts = value.get("label_counts", {})
    if not isinstance(counts, Mapping) or not all(isinstance(c, Mapping) for c in counts.values()):
        return "returned 'label_counts' that is not {split: {label: count}}"
    if not isinstance(value.get("facts", {}), Mapping):
        return f"returned 'facts' as {_kind(value['facts'])}; give a dict {{name: value}}"
    return None


def _check_report_samples(value: Any, model: Any = None, processor: Any = None, examples: Any = None,
                          run_path: Any = None, limit: Any = None, **kwargs: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(r, Mapping) for r in value):
        return f"returned {_kind(value)}; it must return a list of dicts (input, prediction, ...)"
    for number, row in enumerate(value, start=1):
        missing = [k for k in ("input", "prediction") if k not in row]
        if missing:
            return f"returned sample {number} without {missing[0]!r}; each sample has 'input' and 'prediction'"
        if "correct" in row and row["correct"] is not None and not isinstance(row["correct"], bool):
            return f"returned sample {number} with 'correct' = {_short(row['correct'])}; give True, False or None"
    return None


CORE_LOG_KEYS = ("loss", "lr", "samples_per_s", "kind", "step", "epoch")


def _check_training_logs(result: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(result, dict):
        return f"must return a dict of numbers, got {_kind(result)}"
    for key, value in result.items():
        if not isinstance(key, str) or key in CORE_LOG_KEYS:
            return f"returned the key {key!r}; the core logs {', '.join(CORE_LOG_KEYS)} itself: use other names"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"returned {key!r}: {_kind(value)}; values must be Python numbers (float(tensor))"
    return None


_RETURN_CHECKS: dict[str, Callable[..., str | None]] = {
    "prepare_data": _check_splits,
    "load_model": _check_model,
    "lora_targets": _check_names,
    "modules_to_save": _check_name_list,
    "build_dataset": _check_dataset,
    "collate_fn": _check_callable,
    "training_loss": _check_loss,
    "evaluation_step": _check_eval_output,
    "compute_metrics": _check_metrics,
    "finalize_eval": _check_metrics,
    "train_batches": _check_batches,
    "example_lengths": _check_lengths,
    "baseline": _check_optional_dict,
    "training_logs": _check_training_logs,
    "speed_notes": _check_name_list,
    "predict_input_columns": _check_name_list,
    "read_predict_input": _check_records,
    "draw_predictions": _check_drawn,
    "usage_snippet": _check_optional_text,
    "data_summary": _check_data_summary,
    "report_samples": _check_report_samples,
}
