"""report_data.json: what the run report needs beyond recipe.toml, run.json, metrics.json and metrics.jsonl.

Collected once at the end of a run (also a resumed run's end), on the main process, where the data and the
trained model already are: rows and example lengths per split, the task's data summary
(:meth:`finetune.Task.data_summary`), a few eval examples predicted with the selected adapter
(:meth:`finetune.Task.report_samples`), peak memory and provenance (command, git commit). Saved in the run
folder so that ``finetune report`` rebuilds report.html without loading a model. A task method that fails
here does not fail the finished run: the error is recorded and the report says why the section is empty.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

REPORT_DATA_FILE = "report_data.json"
#: Eval examples the report shows with the model's predictions.
SAMPLES_LIMIT = 20
#: Longest text kept per sample field (the page shows each sample on one or a few lines).
SAMPLE_TEXT_LIMIT = 600
#: A sample's picture: a small PNG or JPEG as a data: URI, at most this many characters.
IMAGE_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,")
IMAGE_LIMIT = 200_000
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def collect_report_data(*, task: Any, splits: Any, datasets: dict[str, Any], run_path: Path,
                        predict_with: tuple[Any, Any] | None, why_no_samples: str | None = None,
                        source_folder: Path | None = None) -> dict[str, Any]:
    """The report's data for a run that just finished. ``datasets``: split name -> the dataset built by
    ``task.build_dataset`` (for :meth:`~finetune.Task.example_lengths`); ``predict_with``: ``(model,
    processor)`` holding the selected adapter, or None (then ``why_no_samples`` says why); ``source_folder``:
    the recipe's folder (its git commit is recorded)."""
    errors: dict[str, str] = {}
    data: dict[str, Any] = {"rows": {}, "lengths": {}, "info": _jsonable(splits.info or {})}
    for name, examples in (("train", splits.train), ("eval", splits.eval), ("test", splits.test)):
        if examples is not None:
            data["rows"][name] = len(examples)
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        try:
            stats = length_stats(task.example_lengths(dataset))
        except FinetuneError as exc:
            errors["lengths"] = str(exc)
            break
        if stats:
            data["lengths"][name] = stats
    try:
        data.update(_jsonable(task.data_summary(splits)))
    except FinetuneError as exc:
        errors["data_summary"] = str(exc)
    samples: list[dict[str, Any]] = []
    note = why_no_samples
    if predict_with is not None:
        try:
            samples = [_sample(row) for row in _report_samples(task, *predict_with, splits.eval, run_path)]
        except FinetuneError as exc:
            errors["samples"] = str(exc)
        if not samples and "samples" not in errors:
            note = (f"the task ({task.name}) gives no sample predictions (its plugin does not implement "
                    "Task.report_samples)" if not _implements(task, "report_samples") else
                    "the task returned no sample predictions")
    return {"version": 1, "data": data, "samples": samples[:SAMPLES_LIMIT], "samples_note": note, "errors": errors,
            "memory": {"peak_rss_mib": peak_rss_mib()}, "provenance": provenance(source_folder or Path.cwd())}


def _report_samples(task: Any, model: Any, processor: Any, examples: Any, run_path: Path) -> list[dict[str, Any]]:
    import torch

    model.eval()
    with torch.no_grad():
        return task.report_samples(model, processor, examples, run_path, SAMPLES_LIMIT)


def _implements(task: Any, method: str) -> bool:
    implements = getattr(task, "implements", None)
    return bool(implements(method)) if callable(implements) else True


def length_stats(lengths: Any) -> dict[str, float] | None:
    """min / mean / median / max of a task's example lengths (None when it reports none)."""
    if lengths is None:
        return None
    values = [float(v) for v in lengths]
    if not values:
        return None
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
            "max": max(values)}


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("input", "reference", "prediction", "before"):
        if row.get(key) is not None:
            text = row[key] if isinstance(row[key], str) else json.dumps(_jsonable(row[key]))
            out[key] = text if len(text) <= SAMPLE_TEXT_LIMIT else text[:SAMPLE_TEXT_LIMIT - 3] + "..."
    image = row.get("image")
    if isinstance(image, str) and image.startswith(IMAGE_PREFIXES) and len(image) <= IMAGE_LIMIT:
        out["image"] = image
    if isinstance(row.get("correct"), bool):
        out["correct"] = row["correct"]
    score = row.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        out["score"] = float(score)
    return out


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (numpy numbers and arrays included; anything else as text)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    return str(value)


def peak_rss_mib() -> float | None:
    """The peak resident memory of this process so far, in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def provenance(folder: Path) -> dict[str, Any]:
    """The command that finished the run (a Hub token in it masked), where, when, and the git commit of
    ``folder`` (the recipe's), where that is in a git work tree."""
    command = " ".join([_program(sys.argv[0]), *(shlex.quote(a) for a in sys.argv[1:])]) if sys.argv else None
    return {"command": _TOKEN.sub("hf_***", command) if command else None, "cwd": os.getcwd(),
            "host": socket.gethostname(), "finished_at": time.time(), "git": git_state(folder),
            "finetune_git": git_state(Path(__file__).resolve().parent)}


def _program(argv0: str) -> str:
    """How the program was started: ``finetune``, or ``python -m finetune.cli`` for a package's __main__.py."""
    path = Path(argv0)
    if path.name != "__main__.py":
        return path.name
    parts, folder = [], path.resolve().parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return f"python -m {'.'.join(parts)}" if parts else path.name


def git_state(folder: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git work tree holding ``folder``, or None (not one, or no git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "top": git("rev-parse", "--show-toplevel")}


def write_report_data(run_path: Path, data: dict[str, Any]) -> Path:
    from finetune.engine.run_folder import write_json_atomic

    path = Path(run_path) / REPORT_DATA_FILE
    write_json_atomic(path, data)
    return path
