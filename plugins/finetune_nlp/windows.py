"""Windowed examples cached on disk: tokenized once per (data, tokenizer, settings) fingerprint.

token-classification cuts a long sentence into windows of whole words and question-answering a long context
into overlapping windows: one example gives one or more model inputs ("windows"). :func:`cached_windows` keeps
them in the token cache through the public contract (``finetune.cached_encode``), one cache row per example:
its windows' token fields end to end (``input_ids``, ``attention_mask``, ``labels``, ``offsets``...), each
window's length (:data:`WINDOW_LENGTHS`) and the fields that have one value per window (``word_start``,
``start_positions``...). :class:`CachedWindows` is the map-style dataset read back from those arrays (memory-mapped
when they come from the cache): an item is built only when it is asked for."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: The cache field holding each window's number of tokens.
WINDOW_LENGTHS = "window_lengths"
CHUNK_EXAMPLES = 10_000  # examples windowed at a time: at most one chunk is held as Python lists


def cached_windows(key_parts: Mapping[str, Any], examples: int, build: Callable[[int, int], list[dict[str, Any]]], *,
                   token_fields: Mapping[str, int], window_fields: Sequence[str], example_field: str,
                   drop: Sequence[str] = (), example_offset: int = 0,
                   chunk_examples: int = CHUNK_EXAMPLES) -> CachedWindows | list[dict[str, Any]]:
    """The windows of ``examples`` examples as a dataset, from the token cache when an entry for ``key_parts``
    exists, else built and cached.

    ``build(start, stop)`` returns the windows of examples ``start..stop-1`` in order, each a dict holding
    ``example_field`` (the example's index, counted from ``start``), the ``token_fields`` (one value per token,
    or ``width`` values per token, e.g. ``{"offsets": 2}`` for character spans) and the ``window_fields`` (one
    integer per window). Items read back hold the same fields and values (``example_field`` plus
    ``example_offset``), minus ``drop``. ``key_parts`` must name everything the windows depend on."""
    if examples == 0:
        return []
    from finetune import cached_encode

    fields: list[str] = []  # the token fields the builder gives (token_type_ids only for some tokenizers)

    def chunks():
        for start in range(0, examples, chunk_examples):
            stop = min(examples, start + chunk_examples)
            items = build(start, stop)
            if not fields and items:
                fields.extend(name for name in token_fields if name in items[0])
            names = (*(fields or token_fields), WINDOW_LENGTHS, *window_fields)
            rows: list[dict[str, list[int]]] = [{name: [] for name in names} for _ in range(stop - start)]
            for item in items:
                row = rows[int(item[example_field])]
                row[WINDOW_LENGTHS].append(len(item["input_ids"]))
                for name in fields:
                    values = item[name]
                    if token_fields[name] > 1:
                        values = [int(v) for pair in values for v in pair]
                    row[name].extend(values)
                for name in window_fields:
                    row[name].append(int(item[name]))
            yield {name: [row[name] for row in rows] for name in rows[0]}

    columns = cached_encode(key_parts, examples, chunks)
    return CachedWindows(columns, token_fields, window_fields, example_field, drop, example_offset)


class CachedWindows:
    """The windows of cached examples as a map-style dataset (``len``, ``[i]``, ``[a:b]``), in the order the
    builder made them; :meth:`lengths` gives each window's number of tokens without building any item."""

    def __init__(self, columns: Any, token_fields: Mapping[str, int], window_fields: Sequence[str],
                 example_field: str, drop: Sequence[str] = (), example_offset: int = 0) -> None:
        import numpy as np

        self.columns = columns
        self.token_fields = {name: width for name, width in token_fields.items()
                             if name in columns and name not in drop}
        self.window_fields = [name for name in window_fields if name not in drop]
        self.example_field = None if example_field in drop else example_field
        self.example_offset = example_offset
        lengths = columns[WINDOW_LENGTHS]
        counts = np.asarray(lengths.lengths(), dtype=np.int64)  # windows per example
        self.sizes = lengths.values().astype(np.int64)  # tokens per window
        self.example = np.repeat(np.arange(len(counts)), counts)
        first = np.cumsum(counts) - counts  # each example's first window
        owner_first = np.repeat(first, counts)
        self.window = np.arange(len(self.sizes)) - owner_first  # the window's place in its example
        starts = np.cumsum(self.sizes) - self.sizes
        self.start = starts - starts[owner_first] if len(starts) else starts  # first token, within the example

    @property
    def reused(self) -> bool:
        """Whether the arrays were read from the token cache rather than tokenized."""
        return bool(getattr(self.columns, "reused", False))

    @property
    def path(self) -> Any:
        """The cache entry (None when built in memory: ``FINETUNE_TOKEN_CACHE=off``, an unwritable folder)."""
        return getattr(self.columns, "path", None)

    def __len__(self) -> int:
        return len(self.sizes)

    def lengths(self) -> list[int]:
        return self.sizes.tolist()

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        example, window = int(self.example[i]), int(self.window[i])
        first, size = int(self.start[i]), int(self.sizes[i])
        item: dict[str, Any] = {}
        for name, width in self.token_fields.items():
            values = self.columns[name][example][first * width:(first + size) * width]
            item[name] = values if width == 1 else [values[j:j + width] for j in range(0, len(values), width)]
        for name in self.window_fields:
            item[name] = self.columns[name][example][window]
        if self.example_field is not None:
            item[self.example_field] = example + self.example_offset
        return item

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
