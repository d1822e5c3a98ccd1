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


def test_claims_its_data_for_finetune_init(tmp_path):
    from finetune_rating_regression.task import claim_data

    rows = "text,target\n" + "".join(f"a day with {i} good things,{i * 0.5}\n" for i in range(20))
    (tmp_path / "data.csv").write_text(rows)
    path = tmp_path / "data.csv"
    from finetune import DataProbe  # (after the plugin's import: isort orders the two apart in each repository)

    claim = claim_data(DataProbe(path))
    assert claim is not None and claim.task == "rating-regression" and claim.settings["data"]["train"] == path
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert claim_data(DataProbe(tmp_path / "other.csv")) is None
