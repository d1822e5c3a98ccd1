"""Output for people: a live progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class Console:
    """``quiet`` (``finetune run -q``): only the final summary (and errors, which the CLI prints);
    ``enabled=False``: nothing at all (the other processes of a multi-process run)."""

    def __init__(self, quiet: bool = False, enabled: bool = True) -> None:
        self.quiet = quiet
        self.enabled = enabled
        self.is_tty = sys.stdout.isatty()
        #: The rich console the live display draws on (None: rich's own, on stdout); tests set one of a width.
        self.rich_console: Any = None

    def print(self, message: str = "") -> None:
        """Set-up and progress chatter: not shown with ``quiet``."""
        if self.enabled and not self.quiet:
            print(message, flush=True)

    def summary(self, message: str = "") -> None:
        """What a run comes to (the final summary, warnings about its result): shown with ``quiet`` too."""
        if self.enabled:
            print(message, flush=True)

    def progress(self, total: int, completed: int = 0, samples_seen: int = 0, train_time_s: float = 0.0) -> Progress:
        """``samples_seen`` and ``train_time_s``: the run's totals so far (not zero when it resumes)."""
        if not self.enabled or self.quiet:
            return Progress(total, completed, live=False, plain=False)
        return Progress(total, completed, live=self.is_tty, plain=not self.is_tty, rich_console=self.rich_console,
                        samples_seen=samples_seen, train_time_s=train_time_s)


class Progress:
    """Step progress with loss, throughput (samples/s) and ETA, and the selection metric's best so far.

    On a TTY it is a rich live display of two lines, neither wider than the terminal: the bar (epoch,
    steps, elapsed, ETA) and the numbers (loss, samples/s, best so far; cut with an ellipsis on a narrow
    terminal rather than wrapped). Otherwise every logged step prints one line.
    """

    def __init__(self, total: int, completed: int, live: bool, plain: bool, rich_console: Any = None,
                 samples_seen: int = 0, train_time_s: float = 0.0) -> None:
        self.total, self.completed = total, completed
        self.live, self.plain = live, plain
        self._start = time.perf_counter()
        self._start_step = completed
        self._bar: Any = None
        self._task: Any = None
        self._rich_console = rich_console
        self._base = (samples_seen, train_time_s)  # the run's totals when the display began
        self.loss: float | None = None
        self.samples_per_s: float | None = None
        self.best: tuple[str, float, int | None] | None = None  # metric, value, step

    def __enter__(self) -> Progress:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress
            from rich.text import Text

            stats = self.stats_line

            class TwoLines(RichProgress):
                def get_renderables(self):
                    yield self.make_tasks_table(self.tasks)
                    yield Text(stats(), no_wrap=True, overflow="ellipsis")

            # The bar line is at most ~70 columns (epoch 999, 9,999,999 steps, 99 h elapsed): it fits 80.
            self._bar = TwoLines(
                TextColumn("[bold]train[/] epoch {task.fields[epoch]}"), BarColumn(bar_width=24),
                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                refresh_per_second=4, console=self._rich_console)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.completed, epoch=1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def renderable(self) -> Any:
        """What the live display draws now (a rich renderable), e.g. to print it on a console of a given width."""
        from rich.console import Group

        return Group(*self._bar.get_renderables()) if self._bar is not None else None

    def stats_line(self) -> str:
        """The second line of the live display: loss, samples/s, best so far (each once known)."""
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.samples_per_s is not None:
            parts.append(f"{self.samples_per_s:,.1f} samples/s")
        if self.best is not None:
            metric, value, step = self.best
            parts.append(f"best {metric} {value:.4f}" + (f" (step {step})" if step is not None else ""))
        return "  ".join(parts) or "starting..."

    def _rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._start
        return (step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, epoch: int, loss: float | None = None, samples_seen: int | None = None,
               train_time_s: float | None = None) -> None:
        """Advance to ``step``; ``loss`` is shown when given (the loop reads it only at sync points), as is the
        throughput from ``samples_seen`` and ``train_time_s`` (the run's totals, evaluation excluded, as the log
        lines and the summary count them; averaged since this display began)."""
        self.completed = step
        if self._bar is None:
            return
        if loss is not None:
            self.loss = loss
        if samples_seen is not None and train_time_s is not None:
            if train_time_s > self._base[1]:
                self.samples_per_s = (samples_seen - self._base[0]) / (train_time_s - self._base[1])
        self._bar.update(self._task, completed=step, epoch=epoch)

    def set_best(self, metric: str, value: float | None, step: int | None = None) -> None:
        """The selection metric's best value so far (after an evaluation; shown on the live display)."""
        if value is not None:
            self.best = (metric, float(value), step)

    def log_line(self, step: int, logs: dict[str, float], epoch: int) -> None:
        if not self.plain:
            return
        rate = self._rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        extra = "".join(f" {k} {v:.4g}" for k, v in logs.items() if k not in ("loss", "lr", "samples_per_s"))
        print(f"step {step}/{self.total} epoch {epoch} loss {logs['loss']:.4f} lr {logs['lr']:.2e}{extra} "
              f"{logs['samples_per_s']:.1f} samples/s ETA {_fmt_eta(eta)}", flush=True)


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def quiet_libraries() -> None:
    """Silence what the libraries print that buries our own output: transformers' load report (a newly
    initialised head is expected), weight-loading and Hub progress bars, advisory and future warnings.
    Set before the libraries are imported (environment) and after (their loggers). ``--debug`` users can
    set ``TRANSFORMERS_VERBOSITY=info``; ``HF_HUB_DISABLE_PROGRESS_BARS=1`` also hides download bars."""
    import os
    import sys
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Bars off through huggingface_hub's switch, not its environment variable: a download turns its own
    # bar back on (finetune.engine.hub_access.download); transformers reads the switch when imported.
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    import logging

    # bitsandbytes (model.quantize; peft imports it whenever installed) warns at import that an optional kernel
    # downloaded from the Hub is missing; its built-in CPU kernels run instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if "transformers" in sys.modules and os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
