"""Tests for the finetune-rating-regression plugin, using finetune's own plugin test kit."""

from finetune.testing import check_plugin, run_task_smoke


def test_plugin_conforms():
    report = check_plugin("rating-regression")
    assert report.ok, report.problems
    assert "rating-regression" in report.tasks


def test_trains_end_to_end(tmp_path):
    rows = [{"text": f"{w} {w} day", "target": float(len(w))}
            for w in ["good", "fine", "great", "bad", "awful", "sad", "nice", "poor"] * 10]
    result = run_task_smoke("rating-regression", tmp_path, rows=rows, data={"target_column": "target"})
    assert result.metrics["best"]["mse"] >= 0
    assert result.predictions and "pred_value" in result.predictions[0]
