"""Class labels as finetune handles them: strings, in a stable order, integers given back as integers.

A label column may hold strings or integers (pandas reads ``1`` as ``1.0`` when a column has gaps);
tasks handle every label as its text (:func:`label_text`), order them with :func:`sorted_labels`
(integers numerically, then strings alphabetically: ``["2", "10", "cat"]``), and give integer labels
back as integers in predictions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def label_text(value: Any) -> str:
    """A label's text: ``1.0`` (an integer read as a float) -> ``"1"``, ``"cat"`` -> ``"cat"``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _sort_key(label: str) -> tuple[int, Any]:
    try:
        return (0, int(label))
    except ValueError:
        return (1, label)


def sorted_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels in finetune's order: integer labels numerically first, then the rest alphabetically."""
    return sorted(set(labels), key=_sort_key)

