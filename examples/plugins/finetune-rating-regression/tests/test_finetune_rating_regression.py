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


def test_claims_a_table_with_a_rating_for_finetune_init(tmp_path):
    import csv

    from finetune_rating_regression import finetune_claim_data

    from finetune import Claim, DataProbe

    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "stars"])
        writer.writerows([f"a {'lovely' if i % 2 else 'dull'} book, chapter {i}", 1 + i % 5] for i in range(20))
    claim = finetune_claim_data(probe=DataProbe(path))
    assert isinstance(claim, Claim) and claim.task == "rating-regression"
    assert claim.settings["data"]["target_column"] == "stars" and claim.settings["data"]["text_column"] == "review"
    (tmp_path / "other.csv").write_text("review,label\nnice,a\nbad,b\n")
    assert finetune_claim_data(probe=DataProbe(tmp_path / "other.csv")) is None
