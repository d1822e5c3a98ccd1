"""Cached windows of the token-classification and question-answering quickstarts: building the train and eval
datasets with the token cache off, cold, warm, off, warm (in one process, the model loaded once).

    .venv/bin/python benchmarks/token_windows.py [recipes/ner-quickstart.toml recipes/qa-quickstart.toml]

The cache is a fresh temporary folder (removed at the end); "cold" tokenizes and writes it, "warm" reads it
back memory-mapped (finetune_nlp.windows through finetune.cached_encode). Prints one markdown row per build.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def loads() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    from finetune.run.session import open_session

    recipes = sys.argv[1:] or [str(REPO / "recipes" / f"{name}-quickstart.toml") for name in ("ner", "qa")]
    cache = tempfile.mkdtemp(prefix="finetune-token-windows-")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load averages {loads()}\n")
    print("| recipe | cache | train examples -> windows | eval examples -> windows | both built in |")
    print("|---|---|---|---|---|")
    try:
        for recipe in recipes:
            session = open_session(recipe, [])
            task = session.task.task
            _, tokenizer = task.load_model(session.backbone)
            for label, setting in (("off", "off"), ("cold", cache), ("warm", cache), ("off", "off"), ("warm", cache)):
                os.environ["FINETUNE_TOKEN_CACHE"] = setting
                start = time.perf_counter()
                train = task.build_dataset(session.splits.train, tokenizer, training=True)
                evaluation = task.build_dataset(session.splits.eval, tokenizer, training=False)
                took = time.perf_counter() - start
                assert train.reused == (label == "warm")
                print(f"| {Path(recipe).name} | {label} | {len(session.splits.train)} -> {len(train)} | "
                      f"{len(session.splits.eval)} -> {len(evaluation)} | {took:.3f} s |", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"\nload averages at the end: {loads()}")


if __name__ == "__main__":
    main()
