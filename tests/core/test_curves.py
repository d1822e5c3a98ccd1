"""curves.png (finetune.run.curves): which metrics are drawn, where epochs end, and a y-axis that does not
turn a small change into a cliff. Pixels are not checked; the choices behind them are."""

from __future__ import annotations

import pytest

from finetune.run.curves import MIN_FRACTION_SPAN, epoch_ends, metrics_to_plot, plot_curves, y_limits


def log(epochs: int = 3, steps_per_epoch: int = 4, mid_epoch_eval: bool = False) -> list[dict]:
    """A metrics.jsonl as the loop writes it: train logs every 2 steps (epoch = the current epoch, 1-based),
    an evaluation before training (step 0, epoch 0) and at each epoch's end (epoch = epochs finished)."""
    records = [{"kind": "eval", "step": 0, "epoch": 0, "eval_loss": 0.70, "accuracy": 0.50, "macro_f1": 0.33}]
    for epoch in range(1, epochs + 1):
        for step in range((epoch - 1) * steps_per_epoch + 1, epoch * steps_per_epoch + 1):
            if step % 2 == 0:
                records.append({"kind": "train", "step": step, "epoch": epoch, "loss": 0.7 - 0.01 * step})
            if mid_epoch_eval and step % steps_per_epoch == 2:
                records.append({"kind": "eval", "step": step, "epoch": epoch, "eval_loss": 0.6, "accuracy": 0.9,
                                "macro_f1": 0.89})
        records.append({"kind": "eval", "step": epoch * steps_per_epoch, "epoch": epoch, "eval_loss": 0.5,
                        "accuracy": 0.93 + 0.01 * epoch, "macro_f1": 0.92 + 0.01 * epoch})
    return records


def test_the_selection_metric_comes_first_with_the_task_metrics_beside_it():
    records = log()
    assert metrics_to_plot(records, "accuracy", ("accuracy", "macro_f1")) == ["accuracy", "macro_f1"]
    assert metrics_to_plot(records, "macro_f1", ("accuracy", "macro_f1")) == ["macro_f1", "accuracy"]
    # selected on the loss (drawn on the loss panel): the task's metrics still get the metrics panel
    assert metrics_to_plot(records, "eval_loss", ("accuracy", "macro_f1")) == ["accuracy", "macro_f1"]
    assert metrics_to_plot(records, "accuracy", ("accuracy", "top_k_accuracy")) == ["accuracy"]  # not computed
    assert metrics_to_plot(records, "eval_loss", ()) == []


def test_a_metric_on_another_scale_is_not_squeezed_beside_a_fraction():
    records = [{"kind": "eval", "step": s, "epoch": s, "eval_loss": 2.0, "perplexity": 40.0 - s, "wer": 0.3,
                "cer": 0.1} for s in range(3)]
    assert metrics_to_plot(records, "eval_loss", ("perplexity",)) == ["perplexity"]
    assert metrics_to_plot(records, "wer", ("wer", "cer", "perplexity")) == ["wer", "cer"]
    assert metrics_to_plot(records, "perplexity", ("wer", "cer", "perplexity")) == ["perplexity"]


def test_epoch_ends_come_from_the_log():
    assert epoch_ends(log(epochs=3, steps_per_epoch=4)) == [(1, 4), (2, 8)]  # the last epoch: not yet known
    assert epoch_ends(log(epochs=3, steps_per_epoch=4), epochs_completed=3) == [(1, 4), (2, 8), (3, 12)]
    assert epoch_ends(log(epochs=2, steps_per_epoch=5, mid_epoch_eval=True), epochs_completed=2) == [(1, 5), (2, 10)]
    stopped = [r for r in log(epochs=3, steps_per_epoch=4, mid_epoch_eval=True) if r["step"] <= 10]
    assert epoch_ends(stopped, epochs_completed=2) == [(1, 4), (2, 8)]  # stopped early in epoch 3: no mark


@pytest.mark.parametrize(("values", "bounded", "expected"), [
    ([0.93, 0.95], True, (0.89, 0.99)),     # a 0.02 change on an axis 0.1 high, not a cliff
    ([0.97, 0.99], True, (0.9, 1.0)),       # slid inside [0, 1], not cut
    ([0.0, 0.01], True, (0.0, 0.1)),
    ([0.2, 0.9], True, (0.165, 0.935)),     # wide enough already: the data's range, padded
    ([40.0, 39.5], False, (37.75, 41.75)),  # other scales: at least 10% of the values' size
])
def test_the_y_axis_spans_at_least_a_minimum(values, bounded, expected):
    lo, hi = y_limits(values, bounded)
    assert (lo, hi) == pytest.approx(expected)
    assert hi - lo >= (MIN_FRACTION_SPAN if bounded else 0.1 * 40) - 1e-9
    assert lo <= min(values) and hi >= max(values)


def test_the_file_is_written_for_full_and_sparse_logs(tmp_path):
    out = tmp_path / "curves.png"
    plot_curves(log(), out, "accuracy", ("accuracy", "macro_f1"), epochs_completed=3, best_step=12)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left
    plot_curves([], out, None)  # nothing logged (e.g. zero steps): still a valid picture
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
