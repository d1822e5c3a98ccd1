"""Stop requests: Ctrl-C or SIGTERM asks the loop to stop after the current optimizer step.

The loop then writes a checkpoint and exits; the run is resumable. A second Ctrl-C stops at once
(the last periodic checkpoint remains). Raising ``KeyboardInterrupt`` mid-step could leave
parameters half-updated, which is why the first signal only sets a flag.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from finetune.errors import FinetuneError


class Interrupted(FinetuneError):
    """Training stopped on request (Ctrl-C / SIGTERM) after writing a checkpoint."""


class StopRequest:
    """SIGINT/SIGTERM -> a flag checked between optimizer steps; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step and writing a checkpoint "
              "(press Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
