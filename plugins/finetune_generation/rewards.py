"""Built-in reward functions for the ``grpo`` task, registered through the ``finetune_register_rewards`` hook
exactly as a third-party plugin registers its own (see ``plugins/finetune_generation/__init__.py``).

Every function has the plain documented signature ``function(completions, examples) -> list[float]``.
Their settings (regexes, target length) come from the ``grpo`` task's ``[task]`` options: the task adds
them to every example dict under the key ``"_options"`` (``answer_regex``, ``format_regex``,
``length_target``, ``length_unit``); called from elsewhere without that key, the defaults below apply.

* ``exact-number``: 1 when the completion's final number equals the reference's, else 0. The final
  number of a text is the number after its last ``=``, else its last number (the rule of
  ``benchmarks/arithmetic_correctness.py``): ``"42 - 75 = -33"`` -> -33, ``"0.1 cm = 1 mm"`` -> 1.
* ``exact-match``: 1 when the string ``answer_regex`` extracts from the completion (its first group,
  else the whole match) equals the one it extracts from the reference (whitespace trimmed), else 0.
* ``format``: 1 when the whole completion (trimmed) matches ``format_regex``, else 0.
* ``length-penalty``: ``-(length - length_target) / length_target`` for completions longer than
  ``length_target`` (characters or words, ``length_unit``), else 0: no reward, a growing penalty.
"""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
DEFAULT_ANSWER_REGEX = r"=\s*(.+?)\s*$"
DEFAULT_FORMAT_REGEX = r"[^=\n]+=\s*-?\d+(?:\.\d+)?(?:\s*[^\s=\d]+)?"
DEFAULT_LENGTH_TARGET = 100
#: The built-ins that compare with the row's reference answer (a prompt-only data file cannot use them).
NEEDS_REFERENCE = ("exact-number", "exact-match")


def final_number(text: str) -> float | None:
    """The number after the last ``=`` of ``text``, else its last number; None when it has none."""
    tail = text.rsplit("=", 1)[-1]
    found = NUMBER.findall(tail) or NUMBER.findall(text)
    return float(found[-1]) if found else None


def _option(example: dict[str, Any], name: str, default: Any) -> Any:
    value = (example.get("_options") or {}).get(name)
    return default if value is None else value


def _reference(example: dict[str, Any], function: str) -> str:
    reference = example.get("reference")
    if reference is None:
        raise ValueError(f"{function} compares with the row's reference answer, and this row has none (prompt-only "
                         "data); give reference answers (the last assistant turn, or a completion column) or use "
                         "another reward")
    return str(reference)


def exact_number(completions: list[str], examples: list[dict[str, Any]]) -> list[float]:
    out = []
    for text, example in zip(completions, examples):
        want, got = final_number(_reference(example, "exact-number")), final_number(text)
        out.append(float(want is not None and got is not None and abs(want - got) < 1e-6))
    return out


def _extract(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text.strip())
    if match is None:
        return None
    return (match.group(1) if pattern.groups else match.group(0)).strip()


def exact_match(completions: list[str], examples: list[dict[str, Any]]) -> list[float]:
    out = []
    for text, example in zip(completions, examples):
        pattern = re.compile(_option(example, "answer_regex", DEFAULT_ANSWER_REGEX))
        want, got = _extract(pattern, _reference(example, "exact-match")), _extract(pattern, text)
        out.append(float(want is not None and got == want))
    return out


def format_match(completions: list[str], examples: list[dict[str, Any]]) -> list[float]:
    return [float(re.fullmatch(_option(example, "format_regex", DEFAULT_FORMAT_REGEX), text.strip()) is not None)
            for text, example in zip(completions, examples)]


def length_penalty(completions: list[str], examples: list[dict[str, Any]]) -> list[float]:
    out = []
    for text, example in zip(completions, examples):
        target = float(_option(example, "length_target", DEFAULT_LENGTH_TARGET))
        length = len(text.split()) if _option(example, "length_unit", "characters") == "words" else len(text)
        out.append(-max(0.0, length - target) / target)
    return out


BUILTIN = {
    "exact-number": (exact_number, "1 when the completion's final number (after the last '=', else its last number) "
                                   "equals the reference's, else 0"),
    "exact-match": (exact_match, "1 when the string task.answer_regex extracts from the completion equals the one it "
                                 "extracts from the reference, else 0"),
    "format": (format_match, "1 when the whole completion matches task.format_regex, else 0"),
    "length-penalty": (length_penalty, "-(length - task.length_target) / task.length_target above the target "
                                       "length (task.length_unit), else 0"),
}


def register_builtin(register: Any) -> None:
    for name, (function, description) in BUILTIN.items():
        register(name, function, description=description)


__all__ = ["BUILTIN", "NEEDS_REFERENCE", "exact_match", "exact_number", "final_number", "format_match",
           "length_penalty", "register_builtin"]
