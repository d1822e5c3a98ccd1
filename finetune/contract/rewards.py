"""Reward functions: scoring generated text by name.

A reward function scores completions a model generated. Tasks that learn from rewards (the built-in
``grpo`` task of the generation plugin, ``[task] rewards = {name = weight, ...}``) look them up by name
with :func:`finetune.reward_functions`; any plugin adds its own with the ``finetune_register_rewards``
hook::

    from finetune import hookimpl

    def _cites_source(completions, examples):
        return [1.0 if ex["source"] in text else 0.0 for text, ex in zip(completions, examples)]

    @hookimpl
    def finetune_register_rewards(register):
        register("cites-source", _cites_source, description="1 when the answer names the row's source")

The function is called as ``function(completions, examples)``: ``completions`` is a list of generated
texts (the answer only, special tokens removed) and ``examples`` a list of the same length with, for
each completion, the dict of its data row: every field of the row as the data file holds it, plus
``"prompt"`` (the prompt's text: the last user message for chat data) and ``"reference"`` (the row's
reference answer, or ``None`` when the data has none). It returns one number per completion (higher is
better; a bool counts as 0/1). The core checks what comes back: an exception, a list of another length,
or a value that is not a finite number is an error naming the reward function and its plugin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finetune.errors import PluginError

#: ``function(completions, examples) -> list[float]`` (see the module's documentation).
RewardCallable = Callable[[list[str], list[dict[str, Any]]], Sequence[float]]


@dataclass(frozen=True)
class RewardFunction:
    """A reward function registered by a plugin. Call it as ``reward(completions, examples)``: the result is
    checked (one finite float per completion), and any failure is a :class:`finetune.PluginError` naming
    the function and its plugin."""

    name: str  #: the name recipes use (e.g. ``"exact-number"``)
    function: RewardCallable  #: the plugin's function
    description: str = ""  #: one line shown by ``finetune rewards``
    plugin: str = ""  #: the plugin that registered it

    def __call__(self, completions: list[str], examples: list[dict[str, Any]]) -> list[float]:
        where = f"reward function {self.name!r} ({self.plugin})"
        try:
            values = self.function(completions, examples)
        except Exception as exc:  # noqa: BLE001 - a plugin's failure is reported with its name
            raise PluginError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        try:
            values = list(values)
        except TypeError:
            raise PluginError(f"{where} returned {type(values).__name__}, not a list of numbers "
                              f"(one per completion)") from None
        if len(values) != len(completions):
            raise PluginError(f"{where} returned {len(values)} values for {len(completions)} completions; it must "
                              "return one number per completion")
        out = []
        for i, value in enumerate(values):
            number = _number(value)
            if number is None or not math.isfinite(number):
                text = " ".join(str(completions[i]).split())[:80]
                raise PluginError(f"{where} returned {value!r} for completion {i} ({text!r}); a reward must be a "
                                  "finite number")
            out.append(number)
        return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


__all__ = ["RewardCallable", "RewardFunction"]
