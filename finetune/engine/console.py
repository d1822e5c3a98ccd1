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

    def print(self, message: str = "") -> None:
        """Set-up and progress chatter: not shown with ``quiet``."""
        if self.enabled and not self.quiet:
            print(message, flush=True)

    def summary(self, message: str = "") -> None:
        """What a run comes to (the final summary, warnings about its result): shown with ``quiet`` too."""
        if self.enabled:
            print(message, flush=True)

    def progress(self, total: int, completed: int = 0) -> Progress:
        if not self.enabled or self.quiet:
            return Progress(total, completed, live=False, plain=False)
        return Progress(total, completed, live=self.is_tty, plain=not self.is_tty)


class Progress:
    """Step progress with loss, throughput and ETA.

    On a TTY it is a rich live bar; otherwise every logged step prints one line.
    """

    def __init__(self, total: int, completed: int, live: bool, plain: bool) -> None:
        self.total, self.completed = total, completed
        self.live, self.plain = live, plain
        self._start = time.perf_counter()
        self._start_step = completed
        self._bar: Any = None
        self._task: Any = None

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

            self._bar = RichProgress(
                TextColumn("[bold]train[/] epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), refresh_per_second=4)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.completed,
                                            loss=float("nan"), epoch=1, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def _rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._start
        return (step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, epoch: int, loss: float | None = None) -> None:
        """Advance to ``step``; ``loss`` is shown when given (the loop reads it only at sync points)."""
        self.completed = step
        if self._bar is not None:
            rate = self._rate(step)
            fields = {"loss": loss} if loss is not None else {}
            self._bar.update(self._task, completed=step, epoch=epoch, rate=f"{rate:.2f} it/s" if rate else "",
                             **fields)

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
    if "transformers" in sys.modules and os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
