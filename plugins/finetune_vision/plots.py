"""The confusion-matrix image of a run folder."""

from __future__ import annotations

from pathlib import Path


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix)
    n = len(labels)
    side = min(2 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(n)
    ax.set_xticks(ticks, labels=[str(lb)[:20] for lb in labels], rotation=90 if n > 10 else 45, ha="right")
    ax.set_yticks(ticks, labels=[str(lb)[:20] for lb in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > top / 2 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
