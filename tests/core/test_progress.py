"""The live progress display on a terminal: samples/s, the best so far, and no wrapping at 80 columns."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console as RichConsole

from finetune.engine.console import Console, Progress
from finetune.run.training import run_recipe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def rendered(progress: Progress, width: int = 80) -> list[str]:
    out = RichConsole(file=io.StringIO(), width=width, record=True)
    out.print(progress.renderable())
    return out.export_text().splitlines()


def live(total: int, **kwargs) -> Progress:
    return Progress(total, 0, live=True, plain=False,
                    rich_console=RichConsole(file=io.StringIO(), width=80, force_terminal=True), **kwargs)


def test_two_lines_within_80_columns_even_with_extreme_values():
    with live(9_999_999, samples_seen=1_000, train_time_s=100.0) as progress:
        progress.update(5, epoch=1)
        lines = rendered(progress)
        assert len(lines) == 2 and lines[1] == "starting..."  # nothing measured yet: no best, no rate
        progress.update(9_999_999, epoch=999, loss=123456.789, samples_seen=10**12 + 1_000, train_time_s=101.0)
        progress.set_best("a_metric_name_far_longer_than_anything_a_task_would_really_call_it", 0.5, 9_999_999)
        lines = rendered(progress)
    assert len(lines) == 2, lines  # a wrapped column would add lines
    bar, stats = lines
    assert bar.startswith("train epoch 999 ") and "9999999/9999999" in bar and "ETA" in bar
    assert len(bar) <= 80
    assert stats.startswith("loss 123456.7890  1,000,000,000,000.0 samples/s  best a_metric_name")
    assert len(stats) == 80 and stats.endswith("…")  # cut, not wrapped


def test_samples_per_s_counts_training_time_since_the_display_began():
    with live(100, samples_seen=320, train_time_s=8.0) as progress:  # a resumed run's totals
        progress.update(11, epoch=1, samples_seen=352, train_time_s=9.0)
        assert progress.samples_per_s == pytest.approx(32.0)
        progress.update(12, epoch=1, loss=0.5)  # between sync points: the rate is kept
        assert progress.samples_per_s == pytest.approx(32.0)
        progress.update(13, epoch=1, loss=0.25, samples_seen=416, train_time_s=10.0)
        assert progress.samples_per_s == pytest.approx(48.0)
        progress.set_best("accuracy", 0.875, 13)
        assert rendered(progress)[1] == "loss 0.2500  48.0 samples/s  best accuracy 0.8750 (step 13)"


def test_a_real_run_shows_samples_per_s_and_the_best_so_far(make_recipe):
    screen = io.StringIO()
    console = Console()
    console.is_tty = True  # as on a terminal: the live display, drawn on an 80-column console
    console.rich_console = RichConsole(file=screen, width=80, force_terminal=True)
    run = run_recipe(make_recipe(train="epochs = 2\neval_every_steps = 2"), [], console=console)
    frames = [line for line in re.split(r"[\r\n]", ANSI.sub("", screen.getvalue())) if line.strip()]
    bars = [line for line in frames if line.startswith("train epoch")]
    stats = [line for line in frames if "samples/s" in line]
    assert bars and stats
    assert all("ETA" in line and len(line) <= 80 for line in bars)  # the bar line never wraps
    assert all(line.startswith("loss ") and len(line) <= 80 for line in stats)
    import json

    best = json.loads(run.metrics_file.read_text())["best"]
    assert f"best accuracy {best['accuracy']:.4f} (step {best['step']})" in stats[-1]


def test_a_resumed_run_shows_the_best_so_far_from_its_first_frame(make_recipe, callback_plugin):
    class Crash:
        def on_log(self, run, state, logs):
            if state.global_step == 8:
                raise RuntimeError("simulated crash")

    callback_plugin.callbacks = [Crash()]
    recipe = make_recipe(train="eval_every_steps = 2")
    with pytest.raises(Exception, match="simulated crash"):
        run_recipe(recipe, [], console=Console(quiet=True))
    callback_plugin.callbacks = []
    import json

    from finetune.engine.run_folder import RunDir

    state = json.loads((RunDir(recipe.parent / "run").latest_checkpoint() / "loop_state.json").read_text())
    assert state["best_metric"] is not None and state["global_step"] == 6
    screen = io.StringIO()
    console = Console()
    console.is_tty = True
    console.rich_console = RichConsole(file=screen, width=80, force_terminal=True)
    run_recipe(recipe, [], resume=True, console=console)
    text = ANSI.sub("", screen.getvalue())
    before_first_eval = text.split("eval @ step")[0]
    assert f"best accuracy {state['best_metric']:.4f} (step {state['best_step']})" in before_first_eval
