"""Multi-label classification helpers shared by every task whose examples carry any number of labels
(the text plugin's ``multi-label-classification``, the vision plugin's ``multi-label-image-classification``,
and third-party tasks).

The pieces, in the order a task uses them:

* :func:`parse_labels` reads one row's labels from a table cell: a list (JSON lines, parquet), a JSON
  list written as text (``["cat", "dog"]``, ``[]`` for a row with no label), or labels separated by a
  delimiter (``cat,dog``). :func:`multi_hot` turns the parsed rows into a ``[rows, labels]`` 0/1 array.
* The model has one sigmoid output per label. At each evaluation, :func:`tune_thresholds` picks each
  label's decision threshold on the eval split (the grid value with the best F1 for that label). Keep
  them in ``Task.state`` from ``compute_metrics``: the core saves the state with every new best adapter,
  so the thresholds saved are those tuned with the saved weights, and after training it puts the
  selected adapter's state back for the test split, ``finetune evaluate`` and ``predict``.
  :func:`thresholded_report` is that whole ``compute_metrics``: it tunes and keeps the thresholds when
  ``Task.evaluating`` is ``"eval"`` and otherwise scores with :func:`selected_thresholds` (the state's).
* :func:`multilabel_report` scores probabilities against references with given thresholds: micro-F1,
  macro-F1, subset accuracy and mAP, the same three F1/accuracy numbers at a fixed 0.5 threshold
  (``*_at05``, never tuned on the data they score, so an honest check of tuned numbers on the eval
  split), and a per-label report (precision, recall, F1, support, average precision, threshold).
  :func:`multilabel_metrics` is the threshold-free part (from 0/1 predictions), e.g. for a baseline.

mAP is the mean over labels of scikit-learn's ``average_precision_score`` (the area under each label's
precision-recall curve, from the probabilities, so it does not depend on thresholds). A label with no
positive example in the scored split has no defined average precision: it is left out of the mean (and
its per-label ``average_precision`` is None); when no label has a positive example, ``map`` is 0.0.

Everything here works on numpy arrays (scikit-learn computes the F1 scores); nothing imports torch.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.contract.labels import label_text

#: The thresholds :func:`tune_thresholds` tries for each label: 0.05, 0.10, ..., 0.95.
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def parse_labels(value: Any, delimiter: str = ",") -> list[str]:
    """One row's labels as distinct strings, in the order written (labels as :func:`label_text` writes them).

    ``value`` is a list or tuple (a JSON-lines list; a numpy array from a parquet list column), a JSON
    list written as text (``'["a", "b"]'``; ``'[]'`` is a row with no label), a string of labels
    separated by ``delimiter`` (``"a,b"``; spaces around each label are ignored), or a single number.
    Raises ``ValueError`` (say which row and column when you turn it into a :class:`finetune.DataError`)
    for a missing or blank value (a row with no label is written ``[]``), text that starts like a JSON
    list but is not one, and items that are lists, objects or null."""
    import numpy as np

    if isinstance(value, np.ndarray):  # a list column read from parquet
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty; write [] for a row with no label.")
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{text[:60]!r} starts like a JSON list but is not one "
                                 f"({getattr(exc, 'msg', exc)}).") from None
            if not isinstance(value, list):
                raise ValueError(f"{text[:60]!r} is not a JSON list.")
        else:
            value = text.split(delimiter)
    elif value is None or (isinstance(value, float) and value != value):
        raise ValueError("empty; write [] for a row with no label.")
    elif not isinstance(value, (list, tuple)):
        value = [value]
    labels: list[str] = []
    for item in value:
        if isinstance(item, (list, dict)) or item is None:
            raise ValueError(f"{item!r} in {value!r} is not a label (a string or an integer).")
        label = label_text(item).strip()
        if label and label not in labels:
            labels.append(label)
    return labels


def multi_hot(rows: list[list[str]], labels: list[str]) -> Any:
    """A ``[len(rows), len(labels)]`` float32 numpy array: 1.0 where the row has the label. Every label of
    ``rows`` must be in ``labels`` (``KeyError`` otherwise: check unknown labels first)."""
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(rows), len(labels)), dtype=np.float32)
    for r, row in enumerate(rows):
        for label in row:
            out[r, index[label]] = 1.0
    return out


def tune_thresholds(probs: Any, refs: Any, grid: tuple[float, ...] = THRESHOLD_GRID) -> list[float]:
    """Per label (column), the threshold of ``grid`` with the highest F1 of ``probs >= threshold`` against
    ``refs``; ties go to the threshold nearest 0.5. ``probs`` and ``refs`` are ``[examples, labels]`` arrays
    (probabilities; 0/1 or booleans). A label with no positive example scores F1 = 1 where nothing is
    predicted (no false positive), so its threshold rises above every probability the grid allows."""
    import numpy as np

    probs, refs = np.asarray(probs, dtype=float), np.asarray(refs, dtype=bool)
    chosen = []
    for j in range(probs.shape[1]):
        best, best_key = 0.5, None
        for t in grid:
            pred = probs[:, j] >= t
            tp = int(np.sum(pred & refs[:, j]))
            wrong = int(np.sum(pred != refs[:, j]))  # false positives + false negatives
            f1 = 1.0 if tp + wrong == 0 else 2 * tp / (2 * tp + wrong)
            key = (f1, -abs(t - 0.5))
            if best_key is None or key > best_key:
                best, best_key = t, key
        chosen.append(float(best))
    return chosen


def multilabel_metrics(pred: Any, refs: Any, labels: list[str]) -> dict[str, Any]:
    """``micro_f1``, ``macro_f1``, ``subset_accuracy`` (the fraction of examples with every label right) and
    ``per_label`` (``{label: {precision, recall, f1, support}}``) from ``[examples, labels]`` 0/1 arrays of
    predictions and references (columns in the order of ``labels``). A label never predicted and never
    present scores 0 in the macro average (scikit-learn's ``zero_division=0``)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    pred, refs = np.asarray(pred, dtype=int), np.asarray(refs, dtype=int)
    p, r, f, s = precision_recall_fscore_support(refs, pred, average=None, zero_division=0,
                                                 labels=list(range(len(labels))))
    return {
        "micro_f1": float(f1_score(refs, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(refs, pred, average="macro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(refs, pred)),
        "per_label": {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(s[i])} for i, label in enumerate(labels)},
    }


def average_precisions(probs: Any, refs: Any) -> list[float | None]:
    """Per label (column), scikit-learn's ``average_precision_score`` of the probabilities against the 0/1
    references; None for a label with no positive example (its average precision is undefined)."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    probs, refs = np.asarray(probs, dtype=float), np.asarray(refs, dtype=bool)
    return [float(average_precision_score(refs[:, j], probs[:, j])) if refs[:, j].any() else None
            for j in range(probs.shape[1])]


def multilabel_report(probs: Any, refs: Any, labels: list[str], thresholds: list[float]) -> dict[str, Any]:
    """Every multi-label metric of probabilities ``probs`` against references ``refs`` (``[examples,
    labels]`` arrays, columns in the order of ``labels``), deciding each label at its threshold:

    ``micro_f1``, ``macro_f1``, ``subset_accuracy`` (at ``thresholds``), ``map`` (threshold-free: the mean
    of :func:`average_precisions` over the labels with a positive example in ``refs``, the others left
    out; 0.0 when no label has one), ``micro_f1_at05``,
    ``macro_f1_at05``, ``subset_accuracy_at05`` (every threshold 0.5), and ``per_label``:
    ``{label: {precision, recall, f1, support, average_precision, threshold}}`` (at the thresholds).
    Return it from ``Task.compute_metrics``: the scalars are logged and may select the checkpoint, the
    per-label report goes to metrics.json."""
    import numpy as np

    probs, refs = np.asarray(probs, dtype=float), np.asarray(refs, dtype=float) > 0.5
    if probs.shape != refs.shape or probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probs {probs.shape} and refs {refs.shape} must both be [examples, {len(labels)}].")
    if len(thresholds) != len(labels):
        raise ValueError(f"{len(thresholds)} thresholds for {len(labels)} labels.")
    metrics = multilabel_metrics(probs >= np.asarray(thresholds, dtype=float), refs, labels)
    fixed = multilabel_metrics(probs >= 0.5, refs, labels)
    per_label = metrics.pop("per_label")
    aps = average_precisions(probs, refs)
    known = [ap for ap in aps if ap is not None]
    for label, t, ap in zip(labels, thresholds, aps):
        per_label[label]["average_precision"] = ap
        per_label[label]["threshold"] = float(t)
    return {**metrics, "map": float(np.mean(known)) if known else 0.0,
            **{f"{k}_at05": v for k, v in fixed.items() if k != "per_label"}, "per_label": per_label}


def selected_thresholds(state: dict[str, Any], labels: list[str]) -> list[float]:
    """The thresholds kept in ``state["thresholds"]`` (``{label: threshold}``, as :func:`thresholded_report`
    keeps them) in the order of ``labels``: after training the selected adapter's (the core restores its saved
    state for the test split, the card, ``finetune evaluate`` and ``predict``); 0.5 for a label never tuned."""
    thresholds = state.get("thresholds") or {}
    return [float(thresholds.get(label, 0.5)) for label in labels]


def thresholded_report(probs: Any, refs: Any, labels: list[str], state: dict[str, Any],
                       tune: bool) -> dict[str, Any]:
    """A multi-label task's ``compute_metrics``: :func:`multilabel_report` of ``probs`` against ``refs`` at
    thresholds that, with ``tune`` (pass ``self.evaluating == "eval"``), :func:`tune_thresholds` picks on these
    examples and keeps in ``state["thresholds"]`` (saved with the adapter when this evaluation is the best so
    far, so the saved thresholds go with the saved weights); without, at :func:`selected_thresholds`."""
    import numpy as np

    probs, refs = np.asarray(probs, dtype=float), np.asarray(refs, dtype=float) > 0.5
    if tune:
        state["thresholds"] = {label: float(t) for label, t in zip(labels, tune_thresholds(probs, refs))}
    return multilabel_report(probs, refs, labels, selected_thresholds(state, labels))
