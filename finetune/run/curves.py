"""curves.png: the training loss and the evaluation curves of a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], out: Path, metric: str | None) -> None:
    """Draw training loss and eval curves to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals and any("eval_loss" in r for r in evals):
        ax.plot([r["step"] for r in evals if "eval_loss" in r], [r["eval_loss"] for r in evals if "eval_loss" in r],
                "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend()
    ax = axes[1]
    if metric and evals and any(metric in r for r in evals):
        pts = [(r["step"], r[metric]) for r in evals if metric in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:green", label=metric)
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_title(f"Eval {metric or ''}".strip())
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
