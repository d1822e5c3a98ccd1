"""curves.png: the training and evaluation loss, and the evaluation metrics, of a run.

The metrics panel shows the metric that selects the best checkpoint and, beside it, the task's other
metrics on the same scale (accuracy and macro-F1, say). Dotted lines mark where each epoch ended. The
y-axis is never zoomed so far that a small change looks like a cliff: it spans at least
:data:`MIN_FRACTION_SPAN` for metrics between 0 and 1 (and stays inside [0, 1]), at least 10% of the
values' size for others, and says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The narrowest y range shown for metrics between 0 and 1 (accuracy, F1, error rates).
MIN_FRACTION_SPAN = 0.1
#: The narrowest y range shown for other metrics, as a fraction of their largest magnitude.
MIN_RELATIVE_SPAN = 0.1
_LOSSES = ("eval_loss", "loss")


def plot_curves(records: list[dict[str, Any]], out: Path, metric: str | None,
                task_metrics: Iterable[str] = (), epochs_completed: int | None = None,
                best_step: int | None = None) -> None:
    """Draw the loss and metric curves of ``records`` (``metrics.jsonl``) to ``out`` (PNG).

    ``metric`` selects the best checkpoint (a star marks it at ``best_step``); ``task_metrics`` (the task's
    ``metric_names``) are drawn beside it when they share its scale; ``epochs_completed`` bounds the epoch
    marks (a run stopped mid-epoch has no mark for the epoch it did not finish)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train" and _number(r.get("loss"))]
    evals = [r for r in records if r.get("kind") == "eval"]
    ends = epoch_ends(records, epochs_completed)
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))

    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if any(_number(r.get("eval_loss")) for r in evals):
        points = _points(evals, "eval_loss")
        label = "eval loss (selects the best)" if metric == "eval_loss" else "eval loss"
        loss_ax.plot(*zip(*points), "o-", label=label)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Loss")

    shown = metrics_to_plot(records, metric, task_metrics)
    values: list[float] = []
    for name in shown:
        points = _points(evals, name)
        values += [v for _, v in points]
        selects = name == metric
        metric_ax.plot(*zip(*points), "o-", linewidth=2.2 if selects else 1.2,
                       label=f"{name} (selects the best)" if selects else name)
        best = [v for step, v in points if step == best_step]
        if selects and best:
            metric_ax.plot([best_step], best[-1:], "*", markersize=14, color="gold", markeredgecolor="black",
                           label=f"best checkpoint: {name} = {best[-1]:.4f}")
    if values:
        bounded = all(0.0 <= v <= 1.0 for v in values)
        metric_ax.set_ylim(*y_limits(values, bounded))
        metric_ax.set_ylabel(f"score, 0 to 1 (axis at least {MIN_FRACTION_SPAN:g} high)" if bounded else
                             f"value (axis at least {MIN_RELATIVE_SPAN:.0%} of it high)")
    else:
        metric_ax.text(0.5, 0.5, "no evaluation metrics", ha="center", va="center", transform=metric_ax.transAxes)
    metric_ax.set_xlabel("optimizer step")
    metric_ax.set_title("Evaluation " + ", ".join(shown) if shown else "Evaluation")

    for ax in (loss_ax, metric_ax):
        for epoch, step in ends:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"epoch {epoch}", (step, 1.0), xycoords=("data", "axes fraction"), xytext=(-2, -2),
                        textcoords="offset points", ha="right", va="top", fontsize=7, color="grey")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def metrics_to_plot(records: list[dict[str, Any]], metric: str | None, task_metrics: Iterable[str] = ()) -> list[str]:
    """The evaluation metrics the metrics panel draws: the selection ``metric`` first, then the task's other
    metrics found in the evaluations, as long as they share its scale (all between 0 and 1); losses are on
    the loss panel. When the selection metric is the loss, the task's metrics are drawn the same way."""
    evals = [r for r in records if r.get("kind") == "eval"]
    found = [m for m in dict.fromkeys([metric, *task_metrics]) if m and m not in _LOSSES
             and any(_number(r.get(m)) for r in evals)]
    if not found:
        return []
    fractions = [m for m in found if all(0.0 <= v <= 1.0 for _, v in _points(evals, m))]
    return fractions if found[0] in fractions else [found[0]]


def epoch_ends(records: list[dict[str, Any]], epochs_completed: int | None = None) -> list[tuple[int, int]]:
    """``(epoch, step)`` where each finished epoch ended, from ``metrics.jsonl``: the last step logged in it
    (its end-of-epoch evaluation is logged at that step). Finished: up to ``epochs_completed`` when given,
    else every epoch that a later one follows."""
    last: dict[int, int] = {}
    for record in records:
        epoch, step = record.get("epoch"), record.get("step")
        if isinstance(epoch, int) and epoch >= 1 and isinstance(step, int):
            last[epoch] = max(last.get(epoch, step), step)
    if epochs_completed is None:
        finished = [e for e in last if e + 1 in last]
    else:
        finished = [e for e in last if e <= epochs_completed]
    return [(e, last[e]) for e in sorted(finished)]


def y_limits(values: Sequence[float], bounded: bool) -> tuple[float, float]:
    """The y range for ``values``: their range padded 5%, widened to the minimum span around its middle; for
    ``bounded`` metrics (between 0 and 1) at least :data:`MIN_FRACTION_SPAN` wide and inside [0, 1]."""
    lo, hi = min(values), max(values)
    min_span = MIN_FRACTION_SPAN if bounded else MIN_RELATIVE_SPAN * max(abs(lo), abs(hi)) or 1.0
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        middle = (lo + hi) / 2
        lo, hi = middle - min_span / 2, middle + min_span / 2
    if bounded:  # slide the window inside [0, 1] rather than cut it
        if lo < 0:
            lo, hi = 0.0, min(1.0, hi - lo)
        if hi > 1:
            lo, hi = max(0.0, lo - (hi - 1)), 1.0
    return lo, hi


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _points(evals: list[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[name])) for r in evals if _number(r.get(name))]

