"""Shared fixtures: a tiny randomly initialised BERT saved with save_pretrained, tiny data, recipes."""

from __future__ import annotations

import os
import random
import sys
import textwrap
from pathlib import Path

import pytest
from generation_fixtures import make_gen_recipe, qa_jsonl, tiny_gpt2, tiny_llama  # noqa: F401 - generation plugin fixtures

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token arrays cached by the tests (finetune.cached_encode) go to a folder of this test session, not ~/.cache.
if "FINETUNE_TOKEN_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FINETUNE_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="finetune-test-tokens-")
    atexit.register(shutil.rmtree, os.environ["FINETUNE_TOKEN_CACHE"], True)

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ["good", "great", "nice", "happy", "love", "fine", "super", "best"]
NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "worst", "ugly", "evil"]
NEUTRAL = ["the", "a", "day", "movie", "food", "it", "was", "is", "very", "so"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary, randomly initialised."""
    from finetune.testing import tiny_text_backbone

    return tiny_text_backbone(tmp_path_factory.mktemp("tiny-bert"), POSITIVE + NEGATIVE + NEUTRAL)


def make_sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(NEUTRAL, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "data" / "train.csv", make_sentiment_rows(160))


@pytest.fixture
def make_recipe(tmp_path, tiny_bert, sentiment_csv):
    """Write a recipe for the tiny model. ``data``/``train`` are TOML lines merged into those
    sections (they win over the defaults); ``extra`` is raw TOML appended at the end."""

    def _make(extra: str = "", *, train: str = "", data: str = "", name: str = "recipe.toml",
              output: str | None = None) -> Path:
        import tomllib

        import tomli_w

        recipe = {
            "task": {"name": "text-classification"},
            "model": {"backbone": str(tiny_bert)},
            "data": {"train": str(sentiment_csv), "split": 0.25, "max_length": 16},
            "peft": {"r": 4, "alpha": 8},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no",
                      "log_every_steps": 2, "checkpoint_every_steps": 3, "seed": 0},
            "output": {"dir": output if output is not None else str(tmp_path / "run")},
        }
        recipe["data"].update(tomllib.loads(data))
        recipe["train"].update(tomllib.loads(train))
        path = tmp_path / name
        path.write_text(tomli_w.dumps(recipe) + ("\n" + textwrap.dedent(extra) if extra else ""))
        return path

    return _make


@pytest.fixture
def callback_plugin():
    """Register a plugin whose callbacks a test supplies; unregistered afterwards."""
    import types

    from finetune import hookimpl
    from finetune.engine.plugins import get_registry

    registry = get_registry()
    module = types.ModuleType("test_callbacks_plugin")
    module.callbacks = []

    @hookimpl
    def finetune_register_callbacks(register):
        for cb in module.callbacks:
            register(cb)

    module.finetune_register_callbacks = finetune_register_callbacks
    registry.pm.register(module, name="test-callbacks")
    yield module
    registry.pm.unregister(module)


def assert_resume_equals_uninterrupted(callback_plugin, full_recipe: Path, cut_recipe: Path, stop_at: int):
    """Run ``full_recipe``; run ``cut_recipe`` (the same recipe, another output folder) with a Ctrl-C at
    training step ``stop_at`` (a step that is logged), then run it again: the resumed run must end with the
    same adapter tensors, task state and metrics as the uninterrupted one. Returns both run folders."""
    import json
    import signal

    from safetensors.torch import load_file

    from finetune.engine.console import Console
    from finetune.engine.stop import Interrupted
    from finetune.run.training import run_recipe

    quiet = Console(quiet=True)
    full = run_recipe(full_recipe, [], console=quiet)

    class CtrlC:
        def on_log(self, run, state, logs):
            if state.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    callback_plugin.callbacks = [CtrlC()]
    try:
        with pytest.raises(Interrupted, match="resumable"):
            run_recipe(cut_recipe, [], console=quiet)
    finally:
        callback_plugin.callbacks = []
    resumed = run_recipe(cut_recipe, [], resume=True, console=quiet)
    assert resumed.is_finished()
    weights = "adapter_model.safetensors" if (full.adapter_dir / "adapter_model.safetensors").exists() else \
        "trained.safetensors"  # peft.method "none" / "full"
    a, b = (load_file(str(r.adapter_dir / weights)) for r in (full, resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    state_a, state_b = (json.loads((r.adapter_dir / "finetune_task.json").read_text()) for r in (full, resumed))
    assert state_a == state_b
    m_full, m_res = (json.loads(r.metrics_file.read_text()) for r in (full, resumed))
    assert m_full["best"] == m_res["best"] and m_full["last"] == m_res["last"]
    steps = [r["step"] for r in resumed.read_metrics_log() if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"
    return full, resumed


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: int = 600,
            cwd: Path | None = None):
    """Run the real `finetune` CLI in a subprocess (as a user would), in the repository (or ``cwd``)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout, cwd=str(cwd or REPO))
