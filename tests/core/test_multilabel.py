"""The public multi-label helpers (finetune.contract.multilabel): label parsing, multi-hot, threshold tuning,
the metrics and mAP on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

import finetune
from finetune import (
    average_precisions,
    multi_hot,
    multilabel_report,
    parse_labels,
    selected_thresholds,
    thresholded_report,
    tune_thresholds,
)


def test_the_helpers_are_public_names():
    for name in ("parse_labels", "multi_hot", "tune_thresholds", "multilabel_metrics", "multilabel_report",
                 "average_precisions", "selected_thresholds", "thresholded_report"):
        assert name in finetune.__all__


def test_parse_labels_forms_and_errors():
    assert parse_labels(" a , b,a ") == ["a", "b"]
    assert parse_labels("a|b", "|") == ["a", "b"]
    assert parse_labels('["x", 2, 3.0]') == ["x", "2", "3"]
    assert parse_labels("[]") == [] and parse_labels([]) == []
    assert parse_labels(np.array(["b", "a"])) == ["b", "a"]
    assert parse_labels(7) == ["7"]
    for bad, says in (("", "write []"), (None, "write []"), (float("nan"), "write []"),
                      ("[a, b", "starts like a JSON list"), ('[["a"]]', "not a label")):
        with pytest.raises(ValueError, match=says.replace("[", r"\[")):
            parse_labels(bad)


def test_multi_hot():
    out = multi_hot([["b"], [], ["a", "b"]], ["a", "b"])
    assert out.dtype == np.float32 and out.tolist() == [[0, 1], [0, 0], [1, 1]]
    with pytest.raises(KeyError):
        multi_hot([["c"]], ["a", "b"])


def test_tune_thresholds_picks_each_labels_best_f1_and_the_nearest_to_one_half_on_ties():
    probs = np.array([[0.3, 0.9], [0.2, 0.8], [0.1, 0.1]])
    refs = np.array([[1, 1], [1, 1], [0, 0]])
    a, b = tune_thresholds(probs, refs)
    assert 0.1 < a <= 0.2  # 0.15 or 0.2 separate; the nearest to 0.5 of the perfect ones is 0.2
    assert a == 0.2 and b == 0.5  # b: every threshold in (0.1, 0.8] is perfect; 0.5 is nearest
    # a label never present: predicting nothing is perfect, so the threshold goes above every probability
    assert tune_thresholds(np.array([[0.7], [0.4]]), np.array([[0], [0]])) == [0.75]


def test_report_on_a_hand_computed_case():
    labels = ["a", "b", "c"]
    probs = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.6, 0.3], [0.1, 0.3, 0.2]])
    refs = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    m = multilabel_report(probs, refs, labels, [0.5, 0.5, 0.5])
    # predicted at 0.5: [1,0,1], [0,1,0], [1,1,0], [0,0,0] -> tp 4, fp 1, fn 1
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert m["subset_accuracy"] == pytest.approx(2 / 4)
    # per label F1: a 1.0; b tp 1 fp 1 fn 1 -> 0.5; c 1.0
    assert m["macro_f1"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["micro_f1_at05"] == m["micro_f1"] and m["subset_accuracy_at05"] == m["subset_accuracy"]
    # average precision: a and c ranked perfectly (1.0); b: scores 0.7 (pos), 0.6 (neg), 0.3 (pos), 0.2
    # -> precision at each positive: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    ap_b = (1 + 2 / 3) / 2
    assert m["per_label"]["b"]["average_precision"] == pytest.approx(ap_b)
    assert m["map"] == pytest.approx((1 + ap_b + 1) / 3)
    assert m["per_label"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2,
                                   "average_precision": 1.0, "threshold": 0.5}
    # other thresholds change the F1 numbers, not the at05 ones nor mAP
    moved = multilabel_report(probs, refs, labels, [0.5, 0.65, 0.5])
    assert moved["per_label"]["b"]["f1"] == pytest.approx(2 / 3) and moved["map"] == m["map"]
    assert moved["micro_f1_at05"] == m["micro_f1"] and moved["per_label"]["b"]["threshold"] == 0.65
    assert average_precisions(probs, refs) == pytest.approx([1.0, ap_b, 1.0])


def test_map_leaves_out_labels_without_a_positive_and_is_zero_when_none_has_one():
    probs = np.array([[0.9, 0.8], [0.2, 0.1]])
    m = multilabel_report(probs, np.array([[1, 0], [0, 0]]), ["x", "y"], [0.5, 0.5])
    assert m["map"] == 1.0 and m["per_label"]["y"]["average_precision"] is None
    none = multilabel_report(probs, np.zeros((2, 2)), ["x", "y"], [0.5, 0.5])
    assert none["map"] == 0.0


def test_report_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        multilabel_report(np.zeros((2, 2)), np.zeros((2, 3)), ["a", "b"], [0.5, 0.5])
    with pytest.raises(ValueError, match="thresholds"):
        multilabel_report(np.zeros((2, 2)), np.zeros((2, 2)), ["a", "b"], [0.5])


def test_thresholded_report_tunes_and_keeps_the_thresholds_only_when_told():
    probs = np.array([[0.3, 0.9], [0.4, 0.8], [0.1, 0.1], [0.2, 0.2]])
    refs = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=float)
    state = {"labels": ["a", "b"]}
    assert selected_thresholds(state, ["a", "b"]) == [0.5, 0.5]  # never tuned
    scored = thresholded_report(probs, refs, ["a", "b"], state, tune=False)
    assert "thresholds" not in state and scored["micro_f1"] == pytest.approx(2 / 3)  # a never reaches 0.5
    tuned = thresholded_report(probs, refs, ["a", "b"], state, tune=True)
    assert state["thresholds"] == dict(zip(["a", "b"], tune_thresholds(probs, refs)))
    assert tuned["micro_f1"] == 1.0 and tuned["per_label"]["a"]["threshold"] == state["thresholds"]["a"]
    state["thresholds"] = {"b": 0.95}  # a label missing from the state scores at 0.5
    assert selected_thresholds(state, ["a", "b"]) == [0.5, 0.95]
    again = thresholded_report(probs, refs, ["a", "b"], state, tune=False)
    assert state["thresholds"] == {"b": 0.95}
    assert {k: v["threshold"] for k, v in again["per_label"].items()} == {"a": 0.5, "b": 0.95}

