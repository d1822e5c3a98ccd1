"""A task class against the contract, before anything runs: methods whose signature cannot be called the
way the core calls them (errors), and methods whose name looks like a misspelled contract method, which
the core would never call (warnings: a helper may legitimately have such a name; prefix it with '_').

Used by ``finetune validate``/``run``/``predict`` (the registry checks the task it creates) and by the
plugin test kit (``finetune.testing.check_plugin``, which reports both kinds as problems).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from finetune.contract.task import Task

#: Arguments the core passes by name (the others by position, so their names are free).
KEYWORD_ARGUMENTS = {"build_dataset": ("training",), "predict": ("batch_size", "stream"),
                     "generate_text": ("max_tokens", "temperature", "top_p", "on_text")}


def signature_mismatch(method: Any, contract: Any) -> str | None:
    """Why ``method`` cannot be called the way the core calls the contract's method, or None. The core
    passes arguments by position except those in :data:`KEYWORD_ARGUMENTS`, so an override may rename a
    positional argument but must accept every argument and require no other."""
    mine, theirs = inspect.signature(method), inspect.signature(contract)
    by_name = KEYWORD_ARGUMENTS.get(contract.__name__, ())
    positional = [name for name in theirs.parameters if name not in by_name]
    try:
        mine.bind(*positional, **{name: name for name in by_name})
    except TypeError as exc:
        shown = f"{contract.__name__}{theirs}".replace("'", "")
        return f"{mine} cannot be called as finetune calls it ({exc}); the contract is {shown}".replace("'", "")
    return None


def method_problems(cls: type) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for the methods of a Task subclass: signature mismatches, and names that
    match no contract method but look like one (did you mean ...?)."""
    contract = {name: member for name, member in vars(Task).items()
                if not name.startswith("_") and inspect.isfunction(member)}
    attributes = {name for name in vars(Task) if not name.startswith("_")} | set(Task.__annotations__)
    errors, warnings = [], []
    for klass in cls.__mro__:
        if klass is Task or not issubclass(klass, Task):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            if name in contract:
                mismatch = signature_mismatch(member, contract[name])
                if mismatch:
                    errors.append(f"{klass.__name__}.{name}{mismatch}")
                continue
            close = difflib.get_close_matches(name, sorted(contract) + sorted(attributes), n=1, cutoff=0.75)
            if close and close[0] != name:
                warnings.append(f"{klass.__name__}.{name} matches no method of the contract (did you mean "
                                f"{close[0]!r}?): finetune never calls it. Rename it, or start a helper's name "
                                "with '_'.")
    return errors, warnings
