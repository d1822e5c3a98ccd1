"""Observing the training loop: the loop's :class:`LoopState` and the :class:`Callback` methods.

A callback is any object with some of the ``on_*`` methods of :class:`Callback` (subclassing it is
optional); a plugin registers it with the ``finetune_register_callbacks`` hook. Every method receives
keyword arguments: ``run`` (the run folder, a :class:`finetune.RunDir`: ``run.path``, ``run.info()``)
and ``state`` (the :class:`LoopState`), plus what the event carries. Callbacks observe; the only way
they may change the loop's course is ``state.should_stop = True`` (e.g. an early-stopping rule): the
loop then finishes the current optimizer step, evaluates, writes a checkpoint and ends normally.
A callback that raises fails the run with a message naming its plugin; the run stays resumable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoopState:
    """Where the loop is. Saved in every checkpoint; callbacks read it and may set ``should_stop``.

    An evaluation dict (``last_eval``, ``best_eval``, ``before_eval``) holds ``step``, ``epoch``,
    ``eval_loss`` and what the task's ``compute_metrics`` returned."""

    epoch: int = 0  #: the current epoch, 0-based (after an epoch's end, already the next one)
    batches_done_in_epoch: int = 0  #: micro-batches of this epoch already consumed (per process)
    global_step: int = 0  #: optimizer steps taken
    samples_seen: int = 0  #: training examples seen, over all processes
    best_metric: float | None = None  #: the best value of the selection metric (``train.metric``) so far
    best_step: int | None = None  #: the step of that evaluation (its adapter is the run's adapter/)
    evals_without_improvement: int = 0  #: evaluations since the best one (early stopping counts these)
    last_eval: dict[str, Any] = field(default_factory=dict)  #: the latest evaluation
    best_eval: dict[str, Any] = field(default_factory=dict)  #: the best evaluation
    before_eval: dict[str, Any] = field(default_factory=dict)  #: the evaluation before training (step 0)
    train_time_s: float = 0.0  #: time spent training (batch loading included, evaluation excluded)
    should_stop: bool = False  #: set True to end training after the current step (not saved)
    stopped_early: bool = False  #: whether early stopping (train.early_stopping_patience) ended training

    def to_json(self) -> dict[str, Any]:
        """The state as saved in a checkpoint's loop_state.json (``should_stop`` is not saved)."""
        data = asdict(self)
        data.pop("should_stop")
        return data


class Callback:
    """The events a callback may observe, all optional (these defaults do nothing)."""

    def on_train_start(self, *, run: Any, state: LoopState) -> None:
        """Training is about to start (or resume: ``state.global_step`` > 0)."""

    def on_log(self, *, run: Any, state: LoopState, logs: dict[str, float]) -> None:
        """After a logged training step: ``logs`` holds ``loss`` (mean over the log window), ``lr`` and
        ``samples_per_s``, plus the task's own numbers (``Task.training_logs``)."""

    def on_evaluate(self, *, run: Any, state: LoopState, metrics: dict[str, Any]) -> None:
        """After each evaluation (also the one before training, at step 0): ``metrics`` holds
        ``eval_loss`` and what the task's ``compute_metrics`` returned (scalars and nested dicts)."""

    def on_checkpoint(self, *, run: Any, state: LoopState, path: Path) -> None:
        """After a resumable checkpoint was written to ``path``."""

    def on_train_end(self, *, run: Any, state: LoopState, metrics: dict[str, Any]) -> None:
        """Training ended (finished, stopped early, or interrupted); ``metrics`` is the last evaluation."""
