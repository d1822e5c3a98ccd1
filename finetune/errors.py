"""The one error type for user mistakes, and its close relatives.

Every message says what is wrong, where (recipe key, file, row) and what would
fix it. The CLI prints these without a traceback; ``--debug`` shows one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneError(Exception):
    """A problem the user can fix: bad recipe, bad data, bad run folder, ..."""


class RecipeError(FinetuneError):
    """The recipe (or a ``--set`` override) is invalid."""


class DataError(FinetuneError):
    """A data file is missing, empty or does not have the expected shape."""


class BackboneError(FinetuneError):
    """A backbone name cannot be turned into local model files."""


class RunError(FinetuneError):
    """The run folder is in a state that does not allow what was asked."""


class ExportError(FinetuneError):
    """An exported model failed its check (outputs differ from PyTorch, a file does not read back)."""


class TrainingError(FinetuneError):
    """Training cannot go on (non-finite loss, ...)."""


class PluginError(FinetuneError):
    """A plugin failed to load or raised inside a hook."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
