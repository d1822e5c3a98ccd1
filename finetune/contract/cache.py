"""Token arrays cached on disk: tokenize a table once per (data, tokenizer, max length, ...) fingerprint.

:func:`cached_encode` runs a task's tokenizer in chunks and writes the token ids to one Arrow IPC file per
fingerprint in ``$FINETUNE_CACHE/tokenized/`` (default ``~/.cache/finetune/tokenized/``; ``FINETUNE_TOKEN_CACHE``
names another folder); the next run with the same data, tokenizer and settings (and a resumed run) memory-maps
that file instead of tokenizing. ``FINETUNE_TOKEN_CACHE=off`` turns the cache off (the arrays are then built in
memory the same way).
pyarrow and numpy are imported inside the functions: importing finetune stays fast."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.contract.backbone import cache_root

FORMAT_VERSION = "1"
SMALL_FIELDS = ("attention_mask", "token_type_ids", "special_tokens_mask")  # 0/1 values: stored as int8
STALE_TMP_S = 3600  # temporary files of writers that died are removed after an hour


def token_cache_dir() -> Path | None:
    """Where cached token arrays live: ``$FINETUNE_TOKEN_CACHE`` when it names a folder, None (no cache) when it
    is ``off`` / ``0`` / ``false`` / ``no``, else ``cache_root()/tokenized`` (``$FINETUNE_CACHE/tokenized``,
    default ``~/.cache/finetune/tokenized``)."""
    setting = os.environ.get("FINETUNE_TOKEN_CACHE", "").strip()
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    return Path(setting).expanduser() if setting else cache_root() / "tokenized"


def frame_fingerprint(frame: Any, columns: Sequence[str]) -> str:
    """A hash of ``columns`` of a pandas DataFrame, row by row and in order (vectorised: about a second for a
    million short texts), so any changed, added, removed or reordered row changes it."""
    import pandas as pd

    hashed = pd.util.hash_pandas_object(frame[list(columns)], index=False)
    digest = hashlib.sha256(hashed.to_numpy().tobytes())
    digest.update(json.dumps([list(columns), len(frame), pd.__version__]).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What decides a transformers tokenizer's output: its class, name or path, vocabulary size and a hash of
    its definition: the tokenizer files of the folder it was loaded from (tokenizer.json, vocab.txt,
    tokenizer_config.json, ...) and its added tokens; else the fast tokenizer's JSON (vocabulary, normaliser,
    pre-tokeniser, post-processor) or a slow one's vocabulary and init arguments. Plus the transformers /
    tokenizers versions."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in (".json", ".txt", ".model", ".merges")
                   and not p.name.startswith("config")) if folder.is_dir() else []
    if any(p.name.startswith(("tokenizer", "vocab", "spiece", "sentencepiece", "merges")) for p in files):
        # Loaded from a folder: its tokenizer files decide (fast: no serialising the vocabulary), plus what
        # code may have added since (added tokens).
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.name.encode() + b"\0" + p.read_bytes())
        digest.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode())
        definition = "files:" + digest.hexdigest()
    elif backend is not None:
        state = json.loads(backend.to_str())
        for setting in ("truncation", "padding"):  # the last call's settings, not the tokenizer's definition
            state.pop(setting, None)
        definition = json.dumps(state, sort_keys=True)
    else:
        init = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k != "name_or_path"}
        definition = json.dumps([sorted(tokenizer.get_vocab().items()), init], default=str, sort_keys=True)
    try:
        import tokenizers

        tok_version = tokenizers.__version__
    except ImportError:  # pragma: no cover - tokenizers comes with transformers
        tok_version = None
    return {"class": type(tokenizer).__name__, "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer), "definition": hashlib.sha256(definition.encode()).hexdigest(),
            "transformers": transformers.__version__, "tokenizers": tok_version}


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """The file name stem of an entry: a SHA-256 of ``key_parts`` (JSON, keys sorted) and the format version."""
    text = json.dumps({"format": FORMAT_VERSION, **key_parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class RaggedColumn:
    """One token field (``input_ids``, ``attention_mask``, ...): a sequence of per-example integer lists, held as
    flat values + offsets (numpy views of Arrow buffers, memory-mapped when they come from the cache)."""

    def __init__(self, chunks: list[tuple[Any, Any]]) -> None:
        import numpy as np

        self._chunks = chunks  # [(values, offsets)], offsets[0] == 0 in each chunk
        sizes = [len(offsets) - 1 for _, offsets in chunks]
        self._starts = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> list[int]:
        import numpy as np

        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        values, offsets = self._chunks[c]
        j = i - int(self._starts[c])
        return values[offsets[j]:offsets[j + 1]].tolist()

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> list[int]:
        """Each example's number of tokens, without reading the values."""
        import numpy as np

        if not self._chunks:
            return []
        return np.concatenate([np.diff(offsets) for _, offsets in self._chunks]).tolist()

    def values(self) -> Any:
        """Every example's values end to end, as one numpy array (a copy when the column has several chunks)."""
        import numpy as np

        parts = [values[offsets[0]:offsets[-1]] for values, offsets in self._chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def nbytes(self) -> int:
        return int(sum(values.nbytes + offsets.nbytes for values, offsets in self._chunks))


class TokenColumns(dict):
    """``{field: RaggedColumn}`` as :func:`cached_encode` returns it; ``path`` is the cache file (None when the
    arrays were built in memory) and ``reused`` whether it was read rather than built."""

    path: Path | None = None
    reused: bool = False

    def nbytes(self) -> int:
        return sum(column.nbytes() for column in self.values())


def cached_encode(key_parts: Mapping[str, Any], rows: int,
                  build: Callable[[], Iterable[Mapping[str, Sequence[Sequence[int]]]]]) -> TokenColumns:
    """Token arrays for ``rows`` examples, from the cache when an entry for ``key_parts`` exists, else built.

    ``key_parts``: everything the output depends on (JSON-able), e.g. ``{"data": frame_fingerprint(...),
    "tokenizer": tokenizer_fingerprint(tok), "max_length": 128, "columns": [...]}``; ``build()`` yields
    chunks, each ``{field: [[token, ...] per example]}`` (a tokenizer's output for a slice of rows), so at most
    one chunk is held as Python lists. An entry is written to a temporary file and renamed into place (two
    runs writing at once both succeed; one file wins), and checked when read (Arrow footer, key, row count,
    offsets): a damaged or partial entry is rebuilt, never trusted."""
    directory = token_cache_dir()
    key = cache_key(key_parts)
    if directory is not None and rows > 0:
        path = directory / f"{key}.arrow"
        if path.exists():
            try:
                columns = _read(path, key, rows)
                columns.reused = True
                return columns
            except Exception as exc:  # noqa: BLE001 - any damage means: rebuild
                print(f"warning: the token cache entry {path} is damaged ({type(exc).__name__}: {exc}); "
                      "tokenizing again", file=sys.stderr)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _write(directory, path, key, rows, build)
            return _read(path, key, rows)
        except OSError as exc:
            print(f"warning: cannot write the token cache in {directory} ({exc.strerror or exc}); tokenizing in "
                  "memory (set FINETUNE_CACHE to a writable folder, or FINETUNE_TOKEN_CACHE=off)", file=sys.stderr)
    return _in_memory(rows, build)


def _batches(build: Callable[[], Iterable[Mapping[str, Sequence[Sequence[int]]]]]):
    import pyarrow as pa

    for chunk in build():
        arrays, names = [], []
        for field, lists in chunk.items():
            kind = pa.int8() if field in SMALL_FIELDS else pa.int32()
            arrays.append(pa.array(lists, type=pa.large_list(kind)))
            names.append(field)
        yield pa.record_batch(arrays, names=names)


def _check_rows(got: int, rows: int) -> None:
    if got != rows:
        raise ValueError(f"the tokenizer gave {got} examples for {rows} rows")


def _write(directory: Path, path: Path, key: str, rows: int, build: Callable[[], Iterable[Any]]) -> None:
    import pyarrow as pa

    _remove_stale(directory)
    tmp = directory / f"{key}.arrow.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        writer = None
        got = 0
        with pa.OSFile(str(tmp), "wb") as sink:
            for batch in _batches(build):
                if writer is None:
                    schema = batch.schema.with_metadata({"finetune_key": key})
                    writer = pa.ipc.new_file(sink, schema)
                writer.write_batch(batch)
                got += batch.num_rows
            if writer is None:
                raise ValueError("nothing to tokenize (no rows)")
            writer.close()
        _check_rows(got, rows)
        os.replace(tmp, path)  # atomic: readers see the old entry, no entry, or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(directory: Path) -> None:
    now = time.time()
    for tmp in directory.glob("*.arrow.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except OSError:
            pass


def _columns(batches: Iterable[Any]) -> TokenColumns:
    import numpy as np

    per_field: dict[str, list[tuple[Any, Any]]] = {}
    for batch in batches:
        for name, array in zip(batch.schema.names, batch.columns):
            offsets = np.asarray(array.offsets)  # zero-copy views of the Arrow buffers
            values = np.asarray(array.values)
            if len(offsets) != batch.num_rows + 1 or offsets[0] < 0 or offsets[-1] > len(values) \
                    or (len(offsets) > 1 and bool((np.diff(offsets) < 0).any())):
                raise ValueError(f"field {name!r} has inconsistent offsets")
            if offsets[0] != 0:
                values, offsets = values[offsets[0]:offsets[-1]], offsets - offsets[0]
            per_field.setdefault(name, []).append((values, offsets))
    return TokenColumns({name: RaggedColumn(chunks) for name, chunks in per_field.items()})


def _read(path: Path, key: str, rows: int) -> TokenColumns:
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    found = (reader.schema.metadata or {}).get(b"finetune_key", b"").decode()
    if found != key:
        raise ValueError(f"it holds another key ({found or 'none'})")
    columns = _columns(reader.get_batch(i) for i in range(reader.num_record_batches))
    for column in columns.values():
        _check_rows(len(column), rows)
    if not columns:
        raise ValueError("it holds no field")
    columns.path = path
    try:
        os.utime(path)  # last use: what a cleanup by age looks at
    except OSError:
        pass
    return columns


def _in_memory(rows: int, build: Callable[[], Iterable[Any]]) -> TokenColumns:
    batches = list(_batches(build))
    _check_rows(sum(b.num_rows for b in batches), rows)
    return _columns(batches)
