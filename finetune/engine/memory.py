"""Giving freed heap memory back to the operating system around evaluations."""

from __future__ import annotations

import sys
from typing import Any

_LIBC: list[Any] = []


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``); False where unavailable.

    Called before and after each evaluation: training's freed activation buffers would otherwise
    stay under the evaluation's allocations, and the evaluation's larger no-grad batches under the
    training that follows, raising the peak resident memory at every evaluation. Re-faulting those
    pages costs milliseconds per evaluation; non-glibc systems simply skip it (nothing fails)."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None)
        except OSError:
            _LIBC.append(None)
    trim = getattr(_LIBC[0], "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


def heap_trimming_available() -> bool:
    """Whether :func:`release_freed_memory` can trim the heap here (glibc's ``malloc_trim`` was found)."""
    release_freed_memory()
    return getattr(_LIBC[0], "malloc_trim", None) is not None
