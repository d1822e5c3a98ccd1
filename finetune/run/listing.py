"""``finetune runs [DIR]``: the run folders under a folder, one row each.

A run folder is one that holds ``recipe.toml`` and ``run.json`` (what :class:`~finetune.engine.run_folder.RunDir`
writes first). Each row says what the folder's files say, read only (nothing is loaded, nothing changes):

* ``task`` and ``backbone`` from ``recipe.toml`` (``run.json``'s resolved backbone name when the recipe lacks it);
* ``status``: ``finished`` (run.json says so), ``running`` (a process holds the folder's lock now,
  :mod:`~finetune.engine.run_lock`), otherwise unfinished (interrupted, killed, failed):
  ``resumable`` when a complete checkpoint exists (:meth:`RunDir.latest_checkpoint`; ``finetune run RECIPE``
  continues from it), else ``incomplete``;
* the selection metric and its best value: ``metrics.json`` for a finished run; for an unfinished one, the best
  so far as its latest checkpoint recorded it;
* ``started`` (run.json ``created_at``) and ``duration_s``: the training wall time of a finished run
  (metrics.json ``train.wall_time_s``), else training time so far (the latest checkpoint's ``train_time_s``).

A file that cannot be read (a corrupt run.json, metrics.json or recipe.toml) is named in the row's ``problems``;
it never stops the listing.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.engine.run_folder import RUN_FILE, RunDir
from finetune.engine.run_lock import holder_now
from finetune.errors import RunError

#: How many folder levels below DIR are searched for run folders (runs/<group>/<sweep>/<run> is 3).
MAX_DEPTH = 4
SORT_KEYS = ("when", "metric", "name", "task", "duration")


@dataclass
class RunRow:
    """One run folder as ``finetune runs`` shows it (``--json`` writes these fields)."""

    name: str  #: the folder, relative to the listed folder
    path: str  #: the folder, absolute
    task: str | None = None
    backbone: str | None = None
    status: str = "incomplete"  #: finished, running, resumable, incomplete, unreadable
    recorded_status: str | None = None  #: run.json's status (running / interrupted / failed / finished)
    resumable: bool = False  #: an unfinished run with a complete checkpoint
    metric: str | None = None  #: the selection metric's name
    mode: str | None = None  #: max or min (when known)
    best: float | None = None  #: its best value (so far, for an unfinished run)
    best_step: int | None = None
    started: float | None = None  #: seconds since the epoch (run.json created_at)
    duration_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def started_local(self) -> str:
        """Local time, ``YYYY-MM-DD HH:MM``; ``MM-DD HH:MM`` in the current year (the table's short form)."""
        if self.started is None:
            return "-"
        when = dt.datetime.fromtimestamp(self.started)
        return when.strftime("%m-%d %H:%M" if when.year == dt.datetime.now().year else "%Y-%m-%d %H:%M")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_iso"] = (None if self.started is None
                               else dt.datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds"))
        return data


def is_run_folder(path: Path) -> bool:
    return (path / "recipe.toml").is_file() and (path / RUN_FILE).is_file()


def find_run_folders(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Run folders at ``root`` or up to ``max_depth`` levels below it; a run folder's own subfolders and hidden
    folders (a run's temporary and overwritten folders) are not searched."""
    if is_run_folder(root):
        return [root]
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if is_run_folder(child):
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"{path.name} unreadable ({type(exc).__name__})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_run(path: Path, root: Path) -> RunRow:
    """The row of one run folder; never raises for what is in the folder's files."""
    run = RunDir(path)
    name = "." if path == root else path.relative_to(root).as_posix()
    row = RunRow(name=name, path=str(path.resolve()))

    try:
        recipe = run.resolved_recipe()
    except RunError:
        recipe = {}
        row.problems.append("recipe.toml unreadable")
    section = lambda key: recipe.get(key) if isinstance(recipe.get(key), dict) else {}  # noqa: E731
    row.task = section("task").get("name")
    row.backbone = section("model").get("backbone")
    wanted_metric = section("train").get("metric")

    info, problem = _read_json(run.run_file)
    if problem or not isinstance(info, dict):
        row.problems.append(problem or "run.json is not a JSON object")
        info = {}
    row.recorded_status = info.get("status")
    if not row.backbone and isinstance(info.get("backbone"), dict):
        row.backbone = info["backbone"].get("name")
    row.started = _number(info.get("created_at"))
    if row.started is None:
        try:
            row.started = run.recipe_file.stat().st_mtime
        except OSError:
            pass

    if holder_now(path) is not None:
        row.status = "running"
    elif row.recorded_status in ("finished", "pruned"):  # pruned: a `finetune sweep` trial stopped early
        row.status = row.recorded_status
    elif not info and problem:
        row.status = "unreadable"
    else:
        row.resumable = run.latest_checkpoint() is not None
        row.status = "resumable" if row.resumable else "incomplete"
        if row.recorded_status == "failed" and info.get("error"):
            row.problems.append(f"failed: {info['error']}"[:200])

    if row.status in ("finished", "pruned"):
        _from_metrics_file(run, row)
    else:
        _from_checkpoint(run, row, wanted_metric)
    return row


def _from_metrics_file(run: RunDir, row: RunRow) -> None:
    metrics, problem = _read_json(run.metrics_file)
    if problem or not isinstance(metrics, dict):
        row.problems.append(problem or ("metrics.json missing" if metrics is None else
                                        "metrics.json is not a JSON object"))
        return
    row.metric = metrics.get("selection_metric")
    row.mode = metrics.get("selection_mode")
    best = metrics.get("best") if isinstance(metrics.get("best"), dict) else {}
    if row.metric:
        row.best = _number(best.get(row.metric))
    step = best.get("step")
    row.best_step = step if isinstance(step, int) else None
    train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    row.duration_s = _number(train.get("wall_time_s"))
    if row.duration_s is None:
        row.duration_s = _number(train.get("train_time_s"))


def _from_checkpoint(run: RunDir, row: RunRow, wanted_metric: str | None) -> None:
    """The best so far and the training time so far, as the latest complete checkpoint saved them."""
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return
    state, problem = _read_json(ckpt / "loop_state.json")
    if problem or not isinstance(state, dict):
        row.problems.append(f"{ckpt.name}/{problem or 'loop_state.json is not a JSON object'}")
        return
    row.duration_s = _number(state.get("train_time_s"))
    best = _number(state.get("best_metric"))
    if best is None:
        return
    row.best = best
    row.best_step = state.get("best_step") if isinstance(state.get("best_step"), int) else None
    if wanted_metric:
        row.metric = wanted_metric
    else:  # the task's default metric: the one of the best evaluation that has the best value
        best_eval = state.get("best_eval") if isinstance(state.get("best_eval"), dict) else {}
        names = [k for k, v in best_eval.items() if k not in ("step", "epoch") and _number(v) == best]
        row.metric = names[0] if len(names) == 1 else None


def list_runs(root: str | Path, sort: str = "when") -> list[RunRow]:
    """The rows of the run folders under ``root``, sorted by ``sort`` (one of :data:`SORT_KEYS`):
    ``when`` newest first, ``metric`` best first (per metric: higher is better unless its mode is ``min``;
    runs without one last), ``name`` and ``task`` alphabetically, ``duration`` longest first.
    A RunError when ``root`` is not a folder."""
    root = Path(root)
    if not root.exists():
        raise RunError(f"runs: {root} does not exist. Pass the folder your runs are written to (output.dir of "
                       "the recipes; by default runs/ in the current folder).")
    if not root.is_dir():
        raise RunError(f"runs: {root} is a file, not a folder of runs.")
    rows = [read_run(path, root) for path in find_run_folders(root)]
    return sort_rows(rows, sort)


def sort_rows(rows: list[RunRow], sort: str = "when") -> list[RunRow]:
    if sort not in SORT_KEYS:
        raise RunError(f"runs: cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}.")
    rows = sorted(rows, key=lambda r: r.name)
    if sort == "when":
        return sorted(rows, key=lambda r: -(r.started or 0.0))
    if sort == "task":
        return sorted(rows, key=lambda r: (r.task is None, r.task or ""))
    if sort == "duration":
        return sorted(rows, key=lambda r: (r.duration_s is None, -(r.duration_s or 0.0)))
    if sort == "metric":
        def key(r: RunRow) -> tuple:
            if r.best is None:
                return (1, "", 0.0)
            return (0, r.metric or "", r.best if r.mode == "min" else -r.best)
        return sorted(rows, key=key)
    return rows


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_metric(row: RunRow) -> str:
    if row.best is None:
        return "-"
    return f"{row.metric or '?'} {row.best:.4g}"


def table_cells(row: RunRow) -> list[str]:
    """The row as the table shows it: run, task, backbone, status, best, started, took, notes."""
    return [row.name, row.task or "?", _short_backbone(row.backbone), row.status, format_metric(row),
            row.started_local, format_duration(row.duration_s), "; ".join(row.problems)]


HEADERS = ["run", "task", "backbone", "status", "best", "started", "took", "notes"]


def _short_backbone(backbone: str | None) -> str:
    """A local path as its folder name (a Hub id or a zoo name as it is)."""
    if not backbone:
        return "?"
    return Path(backbone).name if os.sep in backbone and Path(backbone).is_absolute() else backbone


def plain_table(rows: list[RunRow]) -> str:
    """Aligned plain text (for a pipe or a file); the notes column only when a row has notes."""
    cells = [table_cells(r) for r in rows]
    headers = list(HEADERS)
    if not any(c[-1] for c in cells):
        headers, cells = headers[:-1], [c[:-1] for c in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, *cells]]
    return "\n".join(lines)


def rich_table(rows: list[RunRow], title: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    styles = {"finished": "green", "running": "cyan", "resumable": "yellow", "incomplete": "red",
              "unreadable": "red"}
    cells = [table_cells(r) for r in rows]
    with_notes = any(c[-1] for c in cells)
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold underline")
    for header in HEADERS if with_notes else HEADERS[:-1]:
        # status, start and duration never wrap; the others fold on a narrow terminal (80 columns fit)
        folds = header not in ("status", "started", "took")
        table.add_column(header, overflow="fold", no_wrap=not folds, min_width=8 if folds else None,
                         justify="right" if header == "took" else "left")
    for row, line in zip(rows, cells, strict=True):
        texts = [Text(v, style=styles.get(row.status, "") if i == 3 else "") for i, v in enumerate(line)]
        table.add_row(*(texts if with_notes else texts[:-1]))
    return table
