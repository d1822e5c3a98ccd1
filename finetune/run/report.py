"""report.html: a run folder as one self-contained page, and several runs compared side by side.

Everything comes from the run folder, so ``finetune report RUN`` rebuilds the page without loading a
model: recipe.toml, run.json, metrics.json, metrics.jsonl and report_data.json (rows, lengths, label counts,
sample predictions, memory, provenance: :mod:`finetune.run.report_data`). A file that is missing (an
unfinished run, a run from before the report existed) leaves its sections saying so and why.

The page needs nothing from the network: inline CSS, curves drawn as inline SVG, no script, no font
files (the system's own sans-serif). Every text that comes from the run (labels, inputs, recipe values,
file names) is escaped with :func:`html.escape`, so a label such as ``<script>`` is shown, never run.
Elements the tests look for carry ids: ``metrics-table``, ``curve-loss``, ``curve-metrics``,
``per-class-table``, ``confusion-matrix``, ``samples-table``, ``data-table``, ``recipe-toml``,
``provenance``; the comparison page ``compare-table``, ``recipe-diff-table``, ``compare-curve``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tomllib
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from finetune.engine.run_folder import flatten, missing_run_folder, write_text_atomic
from finetune.errors import RunError
from finetune.run.curves import epoch_ends, metrics_to_plot, y_limits
from finetune.run.report_data import IMAGE_PREFIXES, REPORT_DATA_FILE

REPORT_FILE = "report.html"
#: Above this many classes the confusion matrix is left out (the per-class table still lists them).
MATRIX_MAX_LABELS = 30
#: At most this many rows of a per-class table.
PER_CLASS_MAX_ROWS = 200
_COLORS = ("#2563a8", "#c2410c", "#15803d", "#7c3aed", "#b91c1c", "#0e7490", "#a16207", "#4b5563")
_STEP_KEYS = ("step", "epoch")


@dataclass
class RunFacts:
    """What a run folder holds, read without loading anything. ``problems``: files missing or unreadable."""

    path: Path
    recipe_text: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name or str(self.path)

    @property
    def task(self) -> str:
        return str(self.recipe.get("task", {}).get("name") or "?")

    @property
    def backbone(self) -> str:
        return str(self.info.get("backbone", {}).get("name") or self.recipe.get("model", {}).get("backbone") or "?")

    @property
    def selection_metric(self) -> str | None:
        return self.metrics.get("selection_metric") or self.recipe.get("train", {}).get("metric")


def read_run(path: str | Path) -> RunFacts:
    """The facts of the run folder ``path``; a RunError when it is not a run folder."""
    path = Path(path)
    if not path.exists():
        raise missing_run_folder(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a folder; give a run folder (the output.dir of a run).")
    # run.json is created with the folder; a folder pulled from the Hub has the recipe and the final metrics
    if not (path / "run.json").is_file() and not ((path / "recipe.toml").is_file()
                                                  and (path / "metrics.json").is_file()):
        raise RunError(f"{path}: not a run folder (it has no run.json); give the output.dir of a run "
                       "(`finetune runs` lists them).")
    facts = RunFacts(path=path)
    recipe_file = path / "recipe.toml"
    if recipe_file.is_file():
        try:
            facts.recipe_text = recipe_file.read_text(encoding="utf-8", errors="replace")
            facts.recipe = tomllib.loads(facts.recipe_text)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            facts.problems.append(f"recipe.toml is unreadable ({exc})")
    else:
        facts.problems.append("recipe.toml is missing")
    facts.info = _read_json(path / "run.json", facts.problems) or {}
    facts.metrics = _read_json(path / "metrics.json", facts.problems, quiet=True) or {}
    facts.extra = _read_json(path / REPORT_DATA_FILE, facts.problems, quiet=True) or {}
    log = path / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if isinstance(record, dict):
                facts.log.append(record)
    return facts


def _read_json(path: Path, problems: list[str], quiet: bool = False) -> Any:
    if not path.is_file():
        if not quiet:
            problems.append(f"{path.name} is missing")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} is unreadable ({exc})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} does not hold a JSON object")
        return None
    return value


def write_report(run_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's report.html (or ``out``) and return its path."""
    facts = read_run(run_path)
    target = Path(out) if out is not None else facts.path / REPORT_FILE
    _write(target, render_report(facts))
    return target


def write_comparison(run_paths: list[str | Path], out: str | Path) -> Path:
    """Write a page comparing the runs side by side to ``out`` and return its path."""
    runs = [read_run(p) for p in run_paths]
    target = Path(out)
    _write(target, render_comparison(runs))
    return target


def _write(target: Path, text: str) -> None:
    if target.is_dir():
        raise RunError(f"-o: {target} is a folder; give a file name such as {target / 'report.html'}.")
    if not target.parent.is_dir():
        raise RunError(f"-o: the folder {target.parent} does not exist; create it or write elsewhere.")
    try:
        write_text_atomic(target, text)
    except OSError as exc:
        raise RunError(f"{target}: cannot write the report ({exc.strerror or exc}).") from None


# -- formatting ------------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """A value as the page shows it (not yet escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "–"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        return "–"
    return dt.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _td(value: Any, cls: str = "") -> str:
    numeric = _is_number(value) or value is None
    classes = " ".join(dict.fromkeys(c for c in ("num" if numeric else "", cls) if c))
    attr = f' class="{classes}"' if classes else ""
    return f"<td{attr}>{escape(fmt(value))}</td>"


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _table(head: list[str], rows: list[str], table_id: str = "", numeric_from: int = 1) -> str:
    num = ' class="num"'
    cells = "".join(f"<th{num if i >= numeric_from else ''}>{_heading(h)}</th>" for i, h in enumerate(head))
    ident = f' id="{table_id}"' if table_id else ""
    return (f'<div class="scroll"><table{ident}><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody>'
            "</table></div>")


def _heading(text: str) -> str:
    """A column heading; a second line after a newline is shown smaller (e.g. the step, a baseline's name)."""
    first, _, second = text.partition("\n")
    return escape(first) + (f'<br><span class="detail">{escape(second)}</span>' if second else "")


def _facts(pairs: list[tuple[str, Any]], list_id: str = "") -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{v if isinstance(v, _Html) else escape(fmt(v))}</dd>"
                    for k, v in pairs if v is not None)
    ident = f' id="{list_id}"' if list_id else ""
    return f'<dl class="facts"{ident}>{items}</dl>'


class _Html(str):
    """Markup built here (already escaped), as opposed to a value to escape."""


def _code(text: Any) -> _Html:
    return _Html(f"<code>{escape(str(text))}</code>")


# -- charts ----------------------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (``whole``: integers only, for steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if whole:
        step = max(1.0, math.ceil(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + 1e-9 * step and len(ticks) < 50:
        ticks.append(round(value, 12))
        value += step
    return ticks


def line_chart(series: list[tuple[str, list[tuple[float, float]], bool]], *, chart_id: str, title: str,
               y_label: str, bounded: bool = False, marks: list[tuple[float, str]] = (),
               star: tuple[float, float, str] | None = None) -> str:
    """An inline SVG line chart. ``series``: (label, points (step, value), dots?); ``marks``: dotted vertical
    lines (epoch ends); ``star``: (step, value, label) marking the best checkpoint."""
    width, height, left, right, top, bottom = 720, 290, 64, 16, 24, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts]
    if not xs:
        return ""
    x_lo, x_hi = min(0.0, min(xs)), max(xs)
    if x_hi <= x_lo:
        x_hi = x_lo + 1
    y_lo, y_hi = y_limits(ys, bounded)
    if y_hi <= y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [f'<svg id="{chart_id}" class="chart" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#cfd5df"/>']
    for tick in nice_ticks(y_lo, y_hi):
        if y_lo - 1e-12 <= tick <= y_hi + 1e-12:
            y = sy(tick)
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f4"/>'
                         f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{tick:g}</text>')
    for tick in nice_ticks(x_lo, x_hi, 6, whole=True):
        if x_lo <= tick <= x_hi:
            x = sx(tick)
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">{tick:g}</text>')
    for x_mark, label in marks:
        x = sx(x_mark)
        anchor = "end" if x > left + plot_w - 25 else "middle"  # the last epoch's label stays inside
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#9aa3b2" '
                     f'stroke-dasharray="2 3"/><text x="{x:.1f}" y="{top - 6}" text-anchor="{anchor}" '
                     f'class="mark">{escape(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle" class="axis">'
                 "optimizer step</text>"
                 f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    legend_x = left
    for i, (label, points, dots) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="{2 if dots else 1.5}" points="{path}" '
                     f'data-series="{escape(label)}"/>')
        if dots:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>{escape(label)} at step '
                      f'{x:g}: {escape(fmt(y))}</title></circle>' for x, y in points]
        y_legend = height - 12
        parts.append(f'<rect x="{legend_x}" y="{y_legend - 9}" width="14" height="4" fill="{color}"/>'
                     f'<text x="{legend_x + 19}" y="{y_legend - 4}" class="legend">{escape(label)}</text>')
        legend_x += 30 + 7 * len(label)
    if star is not None:
        x, y = sx(star[0]), sy(star[1])
        points = " ".join(f"{x + r * math.sin(a):.1f},{y - r * math.cos(a):.1f}" for k in range(10)
                          for r, a in [((8 if k % 2 == 0 else 3.5), k * math.pi / 5)])
        parts.append(f'<polygon points="{points}" fill="#f5b301" stroke="#333" stroke-width="0.8" '
                     f'data-best="{star[0]:g}"><title>{escape(star[2])}</title></polygon>')
    parts.append("</svg>")
    return "".join(parts)


def _points(records: list[dict[str, Any]], name: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[name])) for r in records
            if _is_number(r.get(name)) and _is_number(r.get("step"))]


# -- one run ---------------------------------------------------------------------------------------------
def render_report(facts: RunFacts) -> str:
    """The report page of one run."""
    status = facts.info.get("status", "unknown")
    title = f"{facts.name}: {facts.task}"
    sub = f"{facts.task} · {facts.backbone} · {status}"
    if facts.info.get("finished_at"):
        sub += f" · finished {when(facts.info['finished_at'])}"
    body = [f"<header><h1>{escape(facts.name)}</h1><p class=\"sub\">{escape(sub)}</p>",
            _status_note(facts), _kpis(facts), "</header>",
            _section("metrics", "Metrics", _metrics_section(facts)),
            _section("curves", "Training curves", _curves_section(facts)),
            _section("per-class", "Per class", _per_class_section(facts)),
            _section("samples", "Sample predictions", _samples_section(facts)),
            _section("data", "Data", _data_section(facts)),
            _section("speed", "Speed and memory", _speed_section(facts)),
            _section("recipe", "Recipe (resolved)", _recipe_section(facts)),
            _section("provenance-section", "Provenance", _provenance_section(facts))]
    return _page(title, "".join(body), f"finetune report {facts.path}")


def _section(ident: str, heading: str, content: str) -> str:
    return f'<section id="{ident}"><h2>{escape(heading)}</h2>{content}</section>'


def _status_note(facts: RunFacts) -> str:
    notes = []
    status = facts.info.get("status")
    if status and status != "finished":
        notes.append(f"This run is {status}: metrics.json, the final metrics, is written when a run finishes, so the "
                     "numbers below come from metrics.jsonl (what was logged so far).")
    if status == "failed" and facts.info.get("error"):
        notes.append(f"error: {facts.info['error']}")
    notes += [f"Note: {p}." for p in facts.problems]
    return "".join(f'<p class="warn">{escape(n)}</p>' for n in notes)


def _kpis(facts: RunFacts) -> str:
    metric = facts.selection_metric
    best, before = facts.metrics.get("best", {}), facts.metrics.get("before", {})
    test, baseline = facts.metrics.get("test", {}), facts.metrics.get("baseline", {})
    train = facts.metrics.get("train", {})
    cards = []
    if metric and _is_number(best.get(metric)):
        cards.append((fmt(best[metric]), f"{metric}, best (eval, step {best.get('step', '?')})"))
        if _is_number(before.get(metric)):
            cards.append((fmt(before[metric]), f"{metric} before training"))
        if _is_number(test.get(metric)):
            cards.append((fmt(test[metric]), f"{metric} on the test split"))
        if _is_number(baseline.get(metric)):
            cards.append((fmt(baseline[metric]), f"{metric}, baseline"))
    if _is_number(train.get("wall_time_s")):
        cards.append((duration(train["wall_time_s"]), "wall time"))
    if _is_number(train.get("samples_per_s")):
        cards.append((f"{train['samples_per_s']:,.1f}", "samples/s training"))
    if not cards:
        return ""
    return '<div class="kpis">' + "".join(f'<div class="kpi"><b>{escape(v)}</b><span>{escape(k)}</span></div>'
                                          for v, k in cards) + "</div>"


def _scalar_names(*dicts: dict[str, Any]) -> list[str]:
    names: dict[str, None] = {}
    for d in dicts:
        for k, v in d.items():
            if k not in _STEP_KEYS and k != "name" and _is_number(v):
                names[k] = None
    return list(names)


def _metrics_section(facts: RunFacts) -> str:
    m = facts.metrics
    columns: list[tuple[str, dict[str, Any]]] = []
    if m:
        for key, label in (("before", "before training"), ("best", "best (eval)"), ("last", "last (eval)"),
                           ("test", "test (selected adapter)")):
            values = m.get(key) or {}
            if values:
                step = values.get("step")
                columns.append((f"{label}\nstep {step}" if step is not None else label, values))
        if m.get("baseline"):
            columns.append((f"baseline\n{m['baseline'].get('name', 'simple')}", m["baseline"]))
    else:
        evals = [r for r in facts.log if r.get("kind") == "eval"]
        if evals:
            columns = [(f"first eval\nstep {evals[0].get('step')}", evals[0]),
                       (f"latest eval\nstep {evals[-1].get('step')}", evals[-1])]
    if not columns:
        return _note("No metrics yet: the run has logged no evaluation (metrics.json and metrics.jsonl hold none).")
    names = _scalar_names(*(values for _, values in columns))
    metric = facts.selection_metric
    names.sort(key=lambda n: (n != metric, n != "eval_loss"))
    rows = []
    for name in names:
        label = f"{name} (selects the best)" if name == metric else name
        cls = ' class="selects"' if name == metric else ""
        rows.append(f"<tr{cls}><td>{escape(label)}</td>" + "".join(_td(values.get(name)) for _, values in columns)
                    + "</tr>")
    mode = m.get("selection_mode")
    explain = (f"The eval split selects the checkpoint ({metric}, {'higher' if mode == 'max' else 'lower'} is better), "
               "so its best value is optimistic; a test split, where the recipe has one, is scored once with the "
               "selected adapter." if metric and mode else "")
    return _table(["metric", *[c for c, _ in columns]], rows, "metrics-table") + (_note(explain) if explain else "")


def _curves_section(facts: RunFacts) -> str:
    log = facts.log
    if not log:
        return _note("No curves: metrics.jsonl is missing or empty (nothing was logged).")
    train = [r for r in log if r.get("kind") == "train"]
    evals = [r for r in log if r.get("kind") == "eval"]
    metric = facts.selection_metric
    epochs = facts.metrics.get("train", {}).get("epochs_completed")
    marks = [(float(step), f"epoch {epoch}") for epoch, step in epoch_ends(log, epochs if isinstance(epochs, int)
                                                                            else None)]
    best = facts.metrics.get("best", {})
    out = []
    loss_series = [(name, pts, dots) for name, pts, dots in
                   (("train loss", _points(train, "loss"), False), ("eval loss", _points(evals, "eval_loss"), True))
                   if pts]
    if loss_series:
        star = None
        if metric == "eval_loss" and _is_number(best.get("eval_loss")) and _is_number(best.get("step")):
            star = (float(best["step"]), float(best["eval_loss"]),
                    f"best checkpoint: eval_loss = {fmt(best['eval_loss'])}")
        out.append("<h3>Loss</h3>" + line_chart(loss_series, chart_id="curve-loss", title="loss by optimizer step",
                                                y_label="loss", marks=marks, star=star))
    task_metrics = [k for k in _scalar_names(*evals) if k not in ("eval_loss",)]
    shown = metrics_to_plot(log, metric, task_metrics)
    if shown:
        series = [(name + (" (selects)" if name == metric else ""), _points(evals, name), True) for name in shown]
        values = [v for _, pts, _ in series for _, v in pts]
        bounded = all(0.0 <= v <= 1.0 for v in values)
        star = None
        if metric in shown and _is_number(best.get(metric)) and _is_number(best.get("step")):
            star = (float(best["step"]), float(best[metric]), f"best checkpoint: {metric} = {fmt(best[metric])}")
        out.append(f"<h3>Evaluation: {escape(', '.join(shown))}</h3>" + line_chart(
            series, chart_id="curve-metrics", title="evaluation metrics by optimizer step",
            y_label="score (0 to 1)" if bounded else "value", bounded=bounded, marks=marks, star=star))
    elif evals:
        out.append(_note("The evaluations logged no metric besides the loss."))
    if not out:
        return _note("metrics.jsonl holds no loss or metric values to draw.")
    return "".join(out) + _note("Dotted lines: ends of epochs; the star: the selected (best) checkpoint. "
                                "Training loss is averaged over each logging window.")


#: best_details entries shown as a per-class table: {label: {name: number}} or {label: number}.
PER_CLASS_KEYS = {"per_class": "class", "per_label": "label", "per_type": "entity type", "per_class_iou": "class"}


def per_class_table(details: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """The first per-class entry of ``best_details`` as ``(what a row is, {label: {name: value}})``; a plain
    ``{label: number}`` entry (``per_class_iou``) becomes one column named after it."""
    for key, noun in PER_CLASS_KEYS.items():
        value = details.get(key)
        if isinstance(value, dict) and value:
            table = {}
            for label, entry in value.items():
                if isinstance(entry, dict):
                    table[str(label)] = entry
                else:
                    table[str(label)] = {key.removeprefix("per_class_") if key != "per_class" else "value": entry}
            pixels = details.get("per_class_pixels")
            if key == "per_class_iou" and isinstance(pixels, dict):
                for label, count in pixels.items():
                    table.setdefault(str(label), {})["pixels"] = count
            return noun, table
    return None


def _per_class_section(facts: RunFacts) -> str:
    details = facts.metrics.get("best_details") or {}
    found = per_class_table(details)
    noun, per_class = found if found else ("class", None)
    matrix = details.get("confusion_matrix")
    out = []
    if isinstance(per_class, dict) and per_class:
        columns = list(dict.fromkeys(k for v in per_class.values() if isinstance(v, dict) for k in v))
        rows = []
        for label, values in list(per_class.items())[:PER_CLASS_MAX_ROWS]:
            values = values if isinstance(values, dict) else {}
            weak = _is_number(values.get("f1")) and values["f1"] < 0.5
            attr = ' class="weak"' if weak else ""
            rows.append(f"<tr{attr}><td>{escape(str(label))}</td>"
                        + "".join(_td(values.get(c)) for c in columns) + "</tr>")
        more = len(per_class) - PER_CLASS_MAX_ROWS
        out.append(f"<h3>At the best checkpoint (step {escape(fmt(facts.metrics.get('best', {}).get('step')))})</h3>"
                   + _table([noun, *columns], rows, "per-class-table")
                   + (_note(f"... and {more} more (metrics.json best_details).") if more > 0 else ""))
    if isinstance(matrix, list) and matrix:
        labels = list(per_class) if isinstance(per_class, dict) and len(per_class) == len(matrix) else \
            [str(i) for i in range(len(matrix))]
        if len(labels) > MATRIX_MAX_LABELS:
            out.append(_note(f"The confusion matrix has {len(labels)} classes, too many to show here; "
                             "metrics.json best_details.confusion_matrix holds it."))
        else:
            out.append("<h3>Confusion matrix (rows: reference, columns: prediction)</h3>" + _matrix(matrix, labels))
    elif out:
        out.append(_note("The task reports no confusion matrix."))
    if not out:
        return _note(f"The task ({facts.task}) reports no per-class metrics or confusion matrix in metrics.json "
                     "(best_details.per_class / confusion_matrix).")
    return "".join(out)


def _matrix(matrix: list[list[Any]], labels: list[str]) -> str:
    head = "".join(f'<th class="num">{escape(label)}</th>' for label in labels)
    rows = []
    for i, row in enumerate(matrix):
        counts = [v if _is_number(v) else 0 for v in row] if isinstance(row, list) else []
        total = sum(counts) or 1
        cells = []
        for j, count in enumerate(counts):
            share = count / total
            color = (f"rgba(21,128,61,{0.12 + 0.6 * share:.2f})" if i == j else
                     f"rgba(185,28,28,{0.7 * share:.2f})" if count else "transparent")
            cells.append(f'<td class="num cm" style="background:{color}" title="{escape(labels[i])} predicted as '
                         f'{escape(labels[j] if j < len(labels) else str(j))}: {count}">{escape(fmt(count))}</td>')
        name = labels[i] if i < len(labels) else str(i)
        rows.append(f"<tr><th>{escape(name)}</th>{''.join(cells)}</tr>")
    return (f'<table id="confusion-matrix" class="matrix"><thead><tr><th>reference \\ predicted</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _samples_section(facts: RunFacts) -> str:
    samples = facts.extra.get("samples") or []
    source = "report_data.json: eval examples predicted with the selected adapter"
    if not samples:
        found = (facts.metrics.get("best_details") or {}).get("samples")
        if isinstance(found, list) and found and all(isinstance(s, dict) for s in found):
            samples = [{"input": "", "reference": s.get("reference"), "prediction": s.get("prediction"),
                        "correct": (str(s.get("reference")).strip() == str(s.get("prediction")).strip())
                        if s.get("reference") is not None else None} for s in found]
            source = "metrics.json best_details.samples (the best evaluation)"
    if not samples:
        errors = facts.extra.get("errors", {})
        if "samples" in errors:
            why = f"collecting them failed: {errors['samples']}"
        elif facts.extra.get("samples_note"):
            why = facts.extra["samples_note"]
        elif not facts.extra:
            why = (f"{REPORT_DATA_FILE} is missing (the run has not finished, or finished before finetune wrote "
                   "reports): rerunning the recipe with --overwrite writes it")
        else:
            why = "the task gave none"
        return _note(f"No sample predictions: {why}.")
    has = {k: any(k in s for s in samples) for k in ("input", "reference", "before", "score", "correct")}
    head = ["", *(["input"] if has["input"] and any(s.get("input") for s in samples) else []),
            *(["reference"] if has["reference"] else []), *(["before training"] if has["before"] else []),
            "prediction", *(["score"] if has["score"] else [])]
    rows = []
    for s in samples:
        correct = s.get("correct")
        mark = ('<span class="mark-bad" title="wrong">✗</span>' if correct is False else
                '<span class="mark-good" title="right">✓</span>' if correct is True else "")
        cls = "wrong" if correct is False else "right" if correct is True else ""
        cells = [f"<td>{mark}</td>"]
        if "input" in head:
            image = s.get("image")
            picture = (f'<img class="thumb" src="{escape(image)}" alt="{escape(str(s.get("input", "")))}">'
                       if isinstance(image, str) and image.startswith(IMAGE_PREFIXES) else "")
            cells.append(f'<td class="text">{picture}{escape(str(s.get("input", "")))}</td>')
        if has["reference"]:
            cells.append(f'<td class="text">{escape(fmt(s.get("reference")))}</td>')
        if has["before"]:
            cells.append(f'<td class="text">{escape(fmt(s.get("before")))}</td>')
        cells.append(f'<td class="text pred">{escape(fmt(s.get("prediction")))}</td>')
        if has["score"]:
            cells.append(_td(s.get("score")))
        state = "true" if correct is True else "false" if correct is False else "unknown"
        rows.append(f'<tr class="{cls}" data-correct="{state}">{"".join(cells)}</tr>')
    wrong = sum(1 for s in samples if s.get("correct") is False)
    judged = sum(1 for s in samples if isinstance(s.get("correct"), bool))
    summary = f"{len(samples)} examples from {source}" + (
        f"; {wrong} of {judged} wrong, highlighted (a task may pick mistakes first: this is not the error rate, "
        "the metrics above are)." if judged else ".")
    return _note(summary) + _table(head, rows, "samples-table", numeric_from=len(head) - 1 if has["score"] else 99)


def _data_section(facts: RunFacts) -> str:
    data = facts.extra.get("data") or {}
    info = data.get("info") or facts.info.get("data") or {}
    rows_per_split = data.get("rows") or {k.removesuffix("_examples"): v
                                          for k, v in (facts.metrics.get("data") or info).items()
                                          if k.endswith("_examples") and _is_number(v)}
    out = []
    if rows_per_split:
        lengths = data.get("lengths") or {}
        head = ["split", "rows"] + (["shortest", "mean length", "median", "longest"] if lengths else [])
        rows = []
        for split, count in rows_per_split.items():
            stats = lengths.get(split) or {}
            rows.append(f"<tr><td>{escape(split)}</td>{_td(count)}"
                        + ("".join(_td(_whole(stats.get(k)), "num") for k in ("min", "mean", "median", "max"))
                           if lengths else "")
                        + "</tr>")
        out.append(_table(head, rows, "data-table"))
        if lengths:
            out.append(_note("Lengths are what the task measures per example (tokens for text, samples for audio) "
                             "after its preprocessing (truncation included)."))
        elif facts.extra:
            out.append(_note("The task reports no example lengths (Task.example_lengths)."))
    else:
        out.append(_note("No row counts: run.json and report_data.json hold none."))
    counts = data.get("label_counts") or ({"train": info["train_label_counts"]}
                                          if isinstance(info.get("train_label_counts"), dict) else {})
    if counts:
        splits = list(counts)
        labels = list(dict.fromkeys(label for split in splits for label in (counts[split] or {})))
        rows = [f"<tr><td>{escape(str(label))}</td>" + "".join(_td((counts[s] or {}).get(label, 0)) for s in splits)
                + "</tr>" for label in labels[:PER_CLASS_MAX_ROWS]]
        out.append("<h3>Classes per split</h3>" + _table(["class", *splits], rows, "label-counts"))
    facts_list: list[tuple[str, Any]] = []
    for key, value in info.items():
        if key.endswith("_examples") or key in ("train_label_counts", "labels"):
            continue
        if isinstance(value, (dict, list)) and len(json.dumps(value)) > 200:
            continue
        facts_list.append((key, value))
    facts_list += list((data.get("facts") or {}).items())
    if isinstance(info.get("labels"), list) and not counts:
        facts_list.append(("labels", ", ".join(map(str, info["labels"][:50]))))
    if facts_list:
        out.append("<h3>Facts</h3>" + _facts(facts_list))
    sources = [(key, entry.get("path")) for key, entry in (facts.info.get("data_files") or {}).items()
               if isinstance(entry, dict)]
    if sources:
        out.append("<h3>Files</h3>" + _facts([(k, _code(v)) for k, v in sources]))
    return "".join(out)


def _whole(value: Any) -> Any:
    """A length: whole numbers without decimals, a mean with one."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else f"{value:,.1f}"
    return value


def _mib(value: Any) -> str | None:
    return f"{value:,.0f} MiB" if _is_number(value) else None


def _speed_section(facts: RunFacts) -> str:
    train = facts.metrics.get("train") or {}
    memory = facts.extra.get("memory") or {}
    params = facts.metrics.get("params") or {}
    if not train and not memory:
        return _note("No speed figures: metrics.json (written when a run finishes) is missing.")
    trainable = params.get("trainable")
    total = params.get("total")
    share = f" ({100 * trainable / total:.2f}%)" if _is_number(trainable) and _is_number(total) and total else ""
    pairs: list[tuple[str, Any]] = [
        ("training time", duration(train.get("train_time_s")) if "train_time_s" in train else None),
        ("wall time (whole command)", duration(train.get("wall_time_s")) if "wall_time_s" in train else None),
        ("model loading", duration(train.get("model_load_s")) if "model_load_s" in train else None),
        ("samples/s (training)", f"{train['samples_per_s']:,.1f}" if _is_number(train.get("samples_per_s"))
         else None),
        ("optimizer steps", f"{fmt(train.get('steps'))} of {fmt(train.get('steps_planned'))} planned"
         if "steps" in train else None),
        ("epochs completed", train.get("epochs_completed")),
        ("samples seen", train.get("samples_seen")),
        ("stopped early", train.get("stopped_early")),
        ("precision", {"no": "fp32 (no mixed precision)"}.get(train.get("mixed_precision"),
                                                               train.get("mixed_precision"))),
        ("processes", facts.info.get("processes")),
        ("peak memory (RSS, main process)", _mib(memory.get("peak_rss_mib")) or "not recorded"),
        ("peak GPU memory (tensors)", _mib(train.get("peak_gpu_memory_mib")) or "no GPU used"),
        ("trainable parameters", f"{fmt(trainable)} of {fmt(total)}{share}" if trainable is not None else None),
    ]
    out = _facts(pairs, "speed-facts")
    notes = facts.info.get("speed_settings") or []
    if notes:
        out += "<h3>Speed settings in effect</h3><ul>" + "".join(f"<li>{escape(str(n))}</li>" for n in notes) + "</ul>"
    return out


def _recipe_section(facts: RunFacts) -> str:
    if facts.recipe_text is None:
        return _note("recipe.toml is missing from the run folder.")
    return (_note("recipe.toml in the run folder: every key, defaults filled in, paths resolved. "
                  "`finetune run` takes this file as it is.")
            + f'<pre id="recipe-toml">{escape(facts.recipe_text)}</pre>')


def _provenance_section(facts: RunFacts) -> str:
    info, extra = facts.info, facts.extra
    prov = extra.get("provenance") or {}
    backbone = info.get("backbone") or {}
    task_plugin = extra.get("task_plugin") or {}
    git = prov.get("git") or None
    plugin_line = (f"{task_plugin.get('plugin')} ({task_plugin.get('distribution')} "
                   f"{task_plugin.get('version')})" if task_plugin else None)
    pairs: list[tuple[str, Any]] = [
        ("run folder", _code(facts.path.resolve())),
        ("task", facts.task),
        ("task plugin", plugin_line),
        ("finetune version", info.get("finetune_version")),
        ("python", info.get("python")),
        ("backbone", backbone.get("name") or facts.backbone),
        ("backbone source", backbone.get("source")),
        ("backbone path", _code(backbone["path"]) if backbone.get("path") else None),
        ("backbone revision", backbone.get("revision") or facts.recipe.get("model", {}).get("revision")
         or "none recorded (a local folder or package)"),
        ("seed", facts.recipe.get("train", {}).get("seed")),
        ("command", _code(prov["command"]) if prov.get("command") else "not recorded"),
        ("working folder", _code(prov["cwd"]) if prov.get("cwd") else None),
        ("host", prov.get("host")),
        ("git commit (recipe's folder)", _git(git) or "not in a git work tree"),
        ("git commit (finetune's source)", _git(prov.get("finetune_git")) or "not a git checkout"),
        ("started", when(info.get("created_at"))),
        ("finished", when(info.get("finished_at")) if info.get("finished_at") else None),
    ]
    out = _facts(pairs, "provenance")
    plugins = info.get("plugins") or []
    if plugins:
        rows = [f"<tr><td>{escape(str(p.get('name')))}</td><td>{escape(str(p.get('distribution')))}</td>"
                f"<td>{escape(str(p.get('version')))}</td></tr>" for p in plugins if isinstance(p, dict)]
        out += "<h3>Plugins loaded</h3>" + _table(["plugin", "distribution", "version"], rows, "plugins-table", 9)
    errors = extra.get("errors") or {}
    if errors:
        out += "<h3>Report data not collected</h3><ul>" + "".join(
            f"<li>{escape(k)}: {escape(str(v))}</li>" for k, v in errors.items()) + "</ul>"
    return out


def _git(state: Any) -> _Html | None:
    if not isinstance(state, dict) or not state.get("commit"):
        return None
    return _code(f"{state['commit']}{' (uncommitted changes)' if state.get('dirty') else ''}"
                 f"{' in ' + state['top'] if state.get('top') else ''}")


# -- several runs ----------------------------------------------------------------------------------------
def recipe_differences(runs: list[RunFacts]) -> dict[str, list[Any]]:
    """The recipe keys whose values differ between runs (``output.dir`` aside), key -> one value per run
    (None where a run's recipe lacks the key)."""
    flats = [flatten(r.recipe) for r in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    _missing = object()
    differ = {}
    for key in keys:
        if key == "output.dir":
            continue
        values = [flat.get(key, _missing) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            differ[key] = [None if v is _missing else v for v in values]
    return differ


def recipe_value(value: Any) -> str:
    """A recipe value as TOML writes it (``true``, ``0.001``, ``["a", "b"]``); a key a recipe lacks: "–"."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _labels(runs: list[RunFacts]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.path.resolve().parent.name}/{r.name}" for r in runs]


def render_comparison(runs: list[RunFacts]) -> str:
    """A page comparing runs side by side: metrics, speed, and the recipe keys that differ."""
    labels = _labels(runs)
    head = ["", *labels]
    rows = [
        "<tr><td>report</td>" + "".join(
            f'<td><a href="{escape((r.path.resolve() / REPORT_FILE).as_uri())}">{escape(r.name)}</a></td>'
            if (r.path / REPORT_FILE).is_file() else "<td>–</td>" for r in runs) + "</tr>",
        "<tr><td>task</td>" + "".join(f"<td>{escape(r.task)}</td>" for r in runs) + "</tr>",
        "<tr><td>backbone</td>" + "".join(f"<td>{escape(r.backbone)}</td>" for r in runs) + "</tr>",
        "<tr><td>status</td>" + "".join(f"<td>{escape(str(r.info.get('status', '?')))}</td>" for r in runs) + "</tr>",
        "<tr><td>selection metric</td>" + "".join(f"<td>{escape(str(r.selection_metric or '–'))}</td>"
                                                   for r in runs) + "</tr>",
        "<tr><td>best step</td>" + "".join(_td(r.metrics.get("best", {}).get("step")) for r in runs) + "</tr>",
    ]
    metric_rows = []
    for split in ("best", "test", "before"):
        names = _scalar_names(*(r.metrics.get(split) or {} for r in runs))
        for name in names:
            values = [(r.metrics.get(split) or {}).get(name) for r in runs]
            winner = _winner(runs, name, values) if split != "before" else None
            cells = "".join(_td(v, "winner" if i == winner else "") for i, v in enumerate(values))
            label = {"best": f"{name} (best, eval)", "test": f"{name} (test)", "before": f"{name} (before training)"}
            metric_rows.append(f"<tr><td>{escape(label[split])}</td>{cells}</tr>")
    speed = [
        "<tr><td>training time</td>" + "".join(
            f'<td class="num">{escape(duration((r.metrics.get("train") or {}).get("train_time_s")))}</td>'
            for r in runs) + "</tr>",
        "<tr><td>samples/s</td>" + "".join(_td((r.metrics.get("train") or {}).get("samples_per_s")) for r in runs)
        + "</tr>",
        "<tr><td>peak RSS (MiB)</td>" + "".join(_td((r.extra.get("memory") or {}).get("peak_rss_mib")) for r in runs)
        + "</tr>",
    ]
    table = _table(head, rows + metric_rows + speed, "compare-table")
    differ = recipe_differences(runs)
    if differ:
        diff_rows = [f"<tr><td><code>{escape(k)}</code></td>" + "".join(
            f'<td class="text">{escape(recipe_value(v))}</td>' for v in values) + "</tr>"
                     for k, values in differ.items()]
        diff = _table(["recipe key", *labels], diff_rows, "recipe-diff-table", len(labels) + 2)
    else:
        diff = (_note("The recipes are the same (output.dir aside).")
                + '<table id="recipe-diff-table"><tbody></tbody></table>')
    body = [f"<header><h1>{len(runs)} runs compared</h1><p class=\"sub\">"
            f"{escape(' · '.join(labels))}</p>",
            "".join(f'<p class="warn">{escape(r.name)}: {escape(p)}.</p>' for r in runs for p in r.problems),
            "</header>",
            _section("comparison", "Metrics and speed", table + _note(
                "The highlighted cell is the best value of a row where the runs share the metric and its direction.")),
            _section("recipe-diff", "Recipe keys that differ", diff),
            _section("curves", "Curves", _compare_curves(runs, labels))]
    return _page(f"{len(runs)} runs compared", "".join(body),
                 "finetune report " + " ".join(str(r.path) for r in runs))


def _winner(runs: list[RunFacts], name: str, values: list[Any]) -> int | None:
    numbers = [(i, v) for i, v in enumerate(values) if _is_number(v)]
    if len(numbers) < 2:
        return None
    modes = {r.metrics.get("selection_mode") for r in runs if r.selection_metric == name}
    if len(modes) == 1 and None not in modes:
        mode = modes.pop()
    elif any(word in name.lower() for word in ("loss", "perplexity", "mse", "mae", "rmse", "wer", "cer", "error")):
        mode = "min"
    else:
        return None
    best = (min if mode == "min" else max)(numbers, key=lambda p: p[1])
    return best[0]


def _compare_curves(runs: list[RunFacts], labels: list[str]) -> str:
    metrics = {r.selection_metric for r in runs}
    out = []
    if len(metrics) == 1 and None not in metrics:
        metric = metrics.pop()
        series = [(label, _points([x for x in r.log if x.get("kind") == "eval"], metric), True)
                  for label, r in zip(labels, runs)]
        series = [s for s in series if s[1]]
        if series:
            values = [v for _, pts, _ in series for _, v in pts]
            out.append(f"<h3>{escape(metric)} at each evaluation</h3>" + line_chart(
                series, chart_id="compare-curve", title=f"{metric} by optimizer step",
                y_label=metric, bounded=all(0 <= v <= 1 for v in values)))
    series = [(label, _points([x for x in r.log if x.get("kind") == "eval"], "eval_loss"), True)
              for label, r in zip(labels, runs)]
    series = [s for s in series if s[1]]
    if series:
        chart_id = "compare-curve" if not out else "compare-loss"
        out.append("<h3>eval loss at each evaluation</h3>" + line_chart(
            series, chart_id=chart_id, title="eval loss by optimizer step", y_label="eval loss"))
    return "".join(out) or _note("No evaluations logged in these runs (metrics.jsonl).")


# -- the page --------------------------------------------------------------------------------------------
_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde2ea;--soft:#f6f7f9;--bad:#b91c1c;--bad-bg:#fdecec;--good:#15803d}
*{box-sizing:border-box}
html{background:#eef0f3}
body{margin:0;color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,
sans-serif}
main{max-width:1000px;margin:0 auto;padding:28px 36px 48px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 2px;word-break:break-all}
h2{font-size:18px;margin:34px 0 10px;padding-bottom:5px;border-bottom:2px solid var(--line)}
h3{font-size:13px;margin:18px 0 6px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.sub{color:var(--muted);margin:0 0 10px}
.scroll{overflow-x:auto}
th .detail{font-weight:400;color:var(--muted);font-size:12px}
tbody td:first-child{white-space:nowrap}
.note{color:var(--muted);font-size:13px;margin:6px 0}
.warn{background:#fff7e6;border-left:3px solid #d97706;padding:6px 10px;margin:6px 0}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600;border-bottom:1px solid #c9d0db}
td.num,th.num{text-align:right;white-space:nowrap}
td.text{max-width:420px;white-space:pre-wrap;word-break:break-word}
tr.selects td{font-weight:650}
tr.selects td:first-child{box-shadow:inset 3px 0 #2563a8}
tr.weak td:first-child{color:var(--bad)}
tr.wrong td{background:var(--bad-bg)}
tr.wrong td:first-child{box-shadow:inset 3px 0 var(--bad)}
td.winner{font-weight:700;background:#e8f5ec}
.mark-bad{color:var(--bad);font-weight:700}
.mark-good{color:var(--good)}
table.matrix td.cm{min-width:44px}
img.thumb{display:block;max-width:96px;max-height:96px;margin-bottom:2px;border:1px solid var(--line)}
table.matrix th{white-space:nowrap}
pre{background:var(--soft);border:1px solid var(--line);border-radius:4px;padding:10px 12px;overflow:auto;
max-height:460px;font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.chart{display:block;width:100%;max-width:720px;height:auto;margin:4px 0}
.chart .tick{font-size:11px;fill:#5b6475}
.chart .axis{font-size:12px;fill:#1d2330}
.chart .legend{font-size:12px;fill:#1d2330}
.chart .mark{font-size:10px;fill:#7b8494}
.kpis{display:flex;gap:10px;flex-wrap:wrap;margin:14px 0 4px}
.kpi{border:1px solid var(--line);border-radius:6px;padding:8px 14px;min-width:130px;background:var(--soft)}
.kpi b{display:block;font-size:20px;font-variant-numeric:tabular-nums}
.kpi span{color:var(--muted);font-size:12px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:6px 0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;word-break:break-word}
footer{margin-top:36px;color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding-top:8px}
"""


def _page(title: str, body: str, rebuild: str) -> str:
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # Nothing may load from elsewhere, even by mistake: the page is self-contained.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>{body}"
            f"<footer>Written {escape(stamp)} by finetune. Rebuild: <code>{escape(rebuild)}</code></footer>"
            "</main></body></html>\n")
