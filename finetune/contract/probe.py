"""What ``finetune init`` tells plugins about a data path: :class:`DataProbe`, and what they answer: :class:`Claim`.

The core builds one probe per ``finetune init DATA`` and passes it to every plugin's
``finetune_claim_data(probe)`` hook. Everything on it is computed once, on first use, and cached, so a
plugin asking for ``probe.table`` reads nothing the core (or another plugin) has read already:

* a file: ``suffix``, ``size``; ``table`` for .csv/.tsv/.jsonl/.json/.parquet (at most ``max_rows`` rows
  read, each column summarised as a :class:`ColumnStats`); ``json`` for a .json file that is one object
  (e.g. SQuAD's ``{"data": [...]}``); ``head_lines`` (the first lines of any text file: CoNLL columns, a
  made-up format);
* a folder: ``tree`` (every sub-folder, relative, with its file extensions counted and its own
  sub-folders), ``child(name)`` (a probe of a file or folder inside, cached too).

Plugins answer with zero or more :class:`Claim` objects: a task name, a confidence score, the reasons in
words, and the recipe settings they propose (one short comment per key for the written TOML). Paths in the
settings are :class:`pathlib.Path` objects; the core writes them relative to the recipe file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Table files the probe reads with pandas.
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet"}
#: Separators counted per column (several labels in one cell: "a,b", "a;b", "a|b").
SEPARATORS = (",", ";", "|")
#: Column names that suggest an id whose values repeat across related rows (a grouped split needs them).
GROUP_NAME = re.compile(r"(^|_)(id|ids|group|groups|user|users|patient|patients|doc|document|speaker|subject|"
                        r"session|author|source|image|article|title|prompt|family|site|person|customer)(_|$|id$)",
                        re.IGNORECASE)
_PATHLIKE = re.compile(r"^[^\s]*\.[A-Za-z0-9]{2,5}$")
_MAX_TREE_ENTRIES = 50_000


def _words(value: str) -> int:
    return len(value.split())


@dataclass
class ColumnStats:
    """One column of a probed table (computed on the rows read)."""

    name: str                  #: the column's name
    dtype: str                 #: pandas dtype as text ("object", "int64", "float64", ...)
    count: int                 #: non-empty values
    distinct: int              #: distinct values (lists and dicts compared as JSON)
    numeric: bool              #: every value is a number (or a numeric string)
    integer: bool              #: numeric and every value a whole number
    minimum: float | None = None  #: numeric columns: the smallest value
    maximum: float | None = None  #: numeric columns: the largest value
    mean_words: float = 0.0    #: strings: mean number of whitespace-separated words
    mean_chars: float = 0.0    #: strings: mean length in characters
    list_share: float = 0.0    #: share of values that are lists (JSON lines, parquet) or JSON lists in text
    dict_share: float = 0.0    #: share of values that are objects
    chat_share: float = 0.0    #: share of values that are chat message lists ([{role, content}, ...])
    path_share: float = 0.0    #: share of values that look like file paths ("a/b.jpg")
    extensions: dict[str, int] = field(default_factory=dict)  #: suffixes of the path-like values
    separator_share: dict[str, float] = field(default_factory=dict)  #: per separator: share of values holding it
    parts: dict[str, int] = field(default_factory=dict)  #: per separator: distinct parts after splitting
    list_items: int = 0        #: distinct items over all list values (labels of a list column)
    repeated_share: float = 0.0  #: share of rows whose value occurs more than once
    samples: list[Any] = field(default_factory=list)  #: up to three example values

    @property
    def kind(self) -> str:
        """A guess at what the column holds: "chat", "list", "dict", "path", "number", "category", "text",
        "index" (whole numbers 0..n-1 or 1..n, each once: row numbers) or "empty"."""
        if self.count == 0:
            return "empty"
        if self.chat_share >= 0.9:
            return "chat"
        if self.list_share >= 0.9:
            return "list"
        if self.dict_share >= 0.9:
            return "dict"
        if self.path_share >= 0.9:
            return "path"
        if self.numeric:
            if self.integer and self.count > 20 and self.distinct == self.count \
                    and self.maximum - self.minimum + 1 == self.count:
                return "index"  # 0..n-1 or 1..n: row numbers, not a target
            return "category" if self.integer and self.distinct <= 20 else "number"
        labels = min([self.distinct] + [n for sep, n in self.parts.items() if self.separator_share.get(sep, 0) > 0])
        if self.mean_words <= 4 and labels <= 100 and self.distinct <= max(2, 0.5 * self.count):
            return "category"
        return "text"

    @property
    def multi_label_separator(self) -> str | None:
        """The separator that splits this column's values into a small set of labels (``"a,b"``), if any."""
        if self.kind != "category" or self.numeric:
            return None
        best = None
        for sep in SEPARATORS:
            share = self.separator_share.get(sep, 0.0)
            if share > 0 and self.parts.get(sep, 10**9) <= 100 and (best is None or share > best[1]):
                best = (sep, share)
        return best[0] if best else None

    def describe(self) -> str:
        """In words, for ``finetune init``'s explanation ("2,000 distinct values, mean 14 words")."""
        kind = self.kind
        if kind == "number":
            return f"numbers from {self.minimum:g} to {self.maximum:g}, {self.distinct:,} distinct values"
        if kind == "category" and self.numeric:
            return f"{self.distinct} distinct whole numbers ({self.minimum:g}..{self.maximum:g})"
        if kind == "category":
            sep = self.multi_label_separator
            if sep:
                return (f"{self.parts[sep]} distinct labels, {self.separator_share[sep]:.0%} of rows hold several "
                        f"joined by {sep!r}")
            return f"{self.distinct} distinct values (e.g. {', '.join(repr(s) for s in self.samples[:3])})"
        if kind == "text":
            words = f"{self.mean_words:.1f}" if self.mean_words < 10 else f"{self.mean_words:.0f}"
            return f"{self.distinct:,} distinct values, mean {words} words"
        if kind == "path":
            exts = ", ".join(f"{e} ({n})" for e, n in sorted(self.extensions.items(), key=lambda x: -x[1])[:3])
            return f"file paths: {exts}"
        if kind == "list":
            return f"lists ({self.list_items} distinct items)"
        if kind == "chat":
            return "chat message lists [{role, content}, ...]"
        return kind


@dataclass
class TableInfo:
    """A probed table: the rows read and each column's :class:`ColumnStats` (in file order)."""

    rows: int                  #: rows read
    truncated: bool            #: the file has more rows than were read
    columns: dict[str, ColumnStats]  #: name -> summary, in file order
    records: list[dict[str, Any]]  #: the first rows as dicts (at most 50), values as read

    def of_kind(self, *kinds: str) -> list[ColumnStats]:
        return [c for c in self.columns.values() if c.kind in kinds]


@dataclass
class FolderInfo:
    """One folder of a probed tree: its files' extensions counted, its sub-folders' names."""

    files: dict[str, int]      #: extension (lower case, with the dot; "" for none) -> count
    subfolders: list[str]      #: names of the folders directly inside (sorted)
    names: list[str]           #: the first 200 file names (sorted)

    def count(self, extensions: set[str] | frozenset[str]) -> int:
        return sum(n for ext, n in self.files.items() if ext in extensions)


class DataProbe:
    """A cheap, cached look at a data path (file or folder), shared by every plugin's ``finetune_claim_data``.

    Only what a plugin asks for is computed, once: reading ``table`` twice reads the file once. Every
    attribute is safe on any path: a table that cannot be read is ``None`` (``table_error`` says why)."""

    def __init__(self, path: str | Path, max_rows: int = 2000) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self._cache: dict[str, Any] = {}
        self._children: dict[str, DataProbe] = {}
        self.table_error: str | None = None

    # -- the path ------------------------------------------------------
    @property
    def is_file(self) -> bool:
        return self.path.is_file()

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @property
    def suffix(self) -> str:
        """Lower-case extension with the dot (``".csv"``); ``""`` for folders."""
        return self.path.suffix.lower() if self.is_file else ""

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.is_file else 0

    def child(self, relative: str) -> DataProbe:
        """A probe of ``relative`` inside this folder (cached: the same object each time)."""
        if relative not in self._children:
            self._children[relative] = DataProbe(self.path / relative, self.max_rows)
        return self._children[relative]

    # -- files ---------------------------------------------------------
    @property
    def head_lines(self) -> list[str]:
        """The first 200 lines of a text file (without line ends); ``[]`` for folders and binary files."""
        if "head" not in self._cache:
            lines: list[str] = []
            if self.is_file and self.suffix != ".parquet":
                try:
                    with self.path.open(encoding="utf-8") as fh:
                        for i, line in enumerate(fh):
                            if i >= 200:
                                break
                            lines.append(line.rstrip("\r\n"))
                except (UnicodeDecodeError, OSError):
                    lines = []
            self._cache["head"] = lines
        return self._cache["head"]

    @property
    def json(self) -> Any:
        """A .json file's content when it is one JSON object (not a list of records); else ``None``."""
        if "json" not in self._cache:
            value = None
            if self.is_file and self.suffix == ".json":
                try:
                    loaded = json.loads(self.path.read_text(encoding="utf-8"))
                    value = loaded if isinstance(loaded, dict) else None
                    if isinstance(loaded, list):
                        self._cache["json_records"] = loaded
                except (ValueError, OSError, UnicodeDecodeError):
                    value = None
            self._cache["json"] = value
        return self._cache["json"]

    @property
    def table(self) -> TableInfo | None:
        """A table file (.csv/.tsv/.jsonl/.parquet, or a .json list of records) summarised; else ``None``."""
        if "table" not in self._cache:
            self._cache["table"] = self._read_table()
        return self._cache["table"]

    def _read_table(self) -> TableInfo | None:
        if not self.is_file or self.suffix not in TABLE_SUFFIXES:
            return None
        import pandas as pd

        n = self.max_rows
        try:
            if self.suffix in (".csv", ".tsv"):
                frame = pd.read_csv(self.path, sep="\t" if self.suffix == ".tsv" else ",", nrows=n + 1,
                                    keep_default_na=False, na_values=[""])
            elif self.suffix == ".jsonl":
                rows = []
                with self.path.open(encoding="utf-8") as fh:
                    for line in fh:
                        if line.strip():
                            record = json.loads(line)
                            if not isinstance(record, dict):
                                self.table_error = "a JSON-lines file whose lines are not JSON objects"
                                return None
                            rows.append(record)
                            if len(rows) > n:
                                break
                frame = pd.DataFrame(rows)
            elif self.suffix == ".json":
                if self.json is not None or "json_records" not in self._cache:
                    return None
                records = [r for r in self._cache["json_records"][: n + 1] if isinstance(r, dict)]
                if not records:
                    return None
                frame = pd.DataFrame(records)
            else:
                import pyarrow.parquet as pq

                batches = pq.ParquetFile(self.path).iter_batches(batch_size=n + 1)
                first = next(batches, None)  # only the first rows are read, not the whole file
                frame = first.to_pandas() if first is not None else pd.DataFrame()
        except Exception as exc:  # noqa: BLE001 - any unreadable table is "not a table", with the reason kept
            self.table_error = f"{type(exc).__name__}: {exc}"
            return None
        truncated = len(frame) > n
        frame = frame.head(n)
        if frame.empty:
            self.table_error = "no rows"
            return None
        for c in frame.columns:  # parquet list cells come back as numpy arrays: make them lists
            if frame[c].dtype == object:
                frame[c] = frame[c].map(_plain)
        columns = {str(c): column_stats(str(c), frame[c]) for c in frame.columns}
        records = frame.head(50).to_dict(orient="records")
        return TableInfo(rows=len(frame), truncated=truncated, columns=columns, records=records)

    # -- folders -------------------------------------------------------
    @property
    def tree(self) -> dict[str, FolderInfo]:
        """Every folder under this one (hidden ones skipped), by path relative to it (``""``: the folder
        itself, ``"a/b"``: a sub-folder), at most 50,000 entries walked; ``{}`` for a file."""
        if "tree" not in self._cache:
            tree: dict[str, FolderInfo] = {}
            if self.is_dir:
                seen = 0
                stack = [self.path]
                while stack and seen < _MAX_TREE_ENTRIES:
                    folder = stack.pop()
                    files: Counter[str] = Counter()
                    subs: list[str] = []
                    names: list[str] = []
                    try:
                        entries = sorted(folder.iterdir())
                    except OSError:
                        continue
                    for entry in entries:
                        seen += 1
                        if entry.name.startswith("."):
                            continue
                        if entry.is_dir():
                            subs.append(entry.name)
                            stack.append(entry)
                        else:
                            files[entry.suffix.lower()] += 1
                            if len(names) < 200:
                                names.append(entry.name)
                    rel = folder.relative_to(self.path).as_posix()
                    tree["" if rel == "." else rel] = FolderInfo(files=dict(files), subfolders=subs, names=names)
            self._cache["tree"] = tree
        return self._cache["tree"]

    def files_under(self, relative: str, extensions: set[str] | frozenset[str]) -> int:
        """How many files with these extensions lie in ``relative`` (``""``: this folder) and below it."""
        rel = relative.strip("/").removeprefix("./") if relative not in ("", ".") else ""
        return sum(info.count(extensions) for r, info in self.tree.items()
                   if not rel or r == rel or r.startswith(rel + "/"))

    # -- helpers for claims -------------------------------------------
    def group_column(self, exclude: set[str] | list[str] = ()) -> tuple[str, str] | None:
        """A column that looks like an id shared by related rows (``(name, reason)``), so that a split keeps
        them together; ``None`` if none. Either its name says so (id, group, user, patient, doc, speaker,
        image, title, prompt, ...) and values repeat, or it is not text and most values repeat across many
        groups."""
        table = self.table
        if table is None:
            return None
        best: tuple[float, str, str] | None = None
        for col in table.columns.values():
            if col.name in exclude or col.count < 4 or col.distinct < 2 or col.repeated_share == 0:
                continue
            if col.kind in ("list", "dict", "chat", "number", "index", "empty"):
                continue
            named = bool(GROUP_NAME.search(col.name))
            many_groups = col.distinct >= max(3, col.count // 20) and col.repeated_share >= 0.3
            if not named and not (many_groups and col.kind != "text"):
                continue
            score = col.repeated_share + (1.0 if named else 0.0)
            reason = (f"column `{col.name}` looks like an id that repeats across rows ({col.distinct:,} distinct "
                      f"values, {col.repeated_share:.0%} of rows share theirs): split by it so related rows "
                      "stay on one side")
            if best is None or score > best[0]:
                best = (score, col.name, reason)
        return (best[1], best[2]) if best else None

    def existing_share(self, column: str, n: int = 5) -> float:
        """Of the first ``n`` values of a path column, the share naming an existing file (relative paths
        resolve against the table's folder). Only file names are checked; nothing is opened."""
        table = self.table
        if table is None or column not in table.columns:
            return 0.0
        values = [r.get(column) for r in table.records[:n] if isinstance(r.get(column), str)]
        if not values:
            return 0.0
        return sum((self.path.parent / v.strip()).is_file() for v in values) / len(values)

    def describe(self) -> list[str]:
        """What was found, in lines for ``finetune init``'s output."""
        out: list[str] = []
        if not self.path.exists():
            return [f"{self.path}: does not exist"]
        if self.is_file:
            out.append(f"{self.path}: a {self.suffix or 'extension-less'} file, {self.size:,} bytes")
            table = self.table
            if table is not None:
                more = " (more not read)" if table.truncated else ""
                out.append(f"  a table: {table.rows:,} rows read{more}, {len(table.columns)} columns")
                for col in table.columns.values():
                    out.append(f"    `{col.name}`: {col.kind}: {col.describe()}")
            elif isinstance(self.json, dict):
                out.append(f"  a JSON object with keys: {', '.join(list(self.json)[:10])}")
            elif self.table_error:
                out.append(f"  not readable as a table: {self.table_error}")
            elif self.head_lines:
                shown = self.head_lines[0][:60]
                out.append(f"  text: {len(self.head_lines)} lines read; the first: {shown!r}")
            return out
        tree = self.tree
        total = sum(sum(f.files.values()) for f in tree.values())
        out.append(f"{self.path}: a folder, {len(tree) - 1} sub-folders, {total:,} files")
        for rel, info in list(sorted(tree.items()))[:12]:
            common = sorted(info.files.items(), key=lambda x: -x[1])[:4]
            files = ", ".join(f"{n} {e or 'no-extension'}" for e, n in common)
            out.append(f"    {rel or '.'}/: {files or 'no files'}"
                       + (f"; {len(info.subfolders)} sub-folders" if info.subfolders else ""))
        if len(tree) > 12:
            out.append(f"    ... {len(tree) - 12} more folders")
        return out


def _plain(value: Any) -> Any:
    """A numpy array cell (parquet lists) as a list, recursively; other values as they are."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) >= 1:
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def column_stats(name: str, series: Any) -> ColumnStats:
    """:class:`ColumnStats` of one pandas column."""
    import pandas as pd

    values = [v for v in series.tolist() if v is not None and not (isinstance(v, float) and v != v)]
    count = len(values)
    keyed = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else str(v) for v in values]
    counts = Counter(keyed)
    repeated = sum(n for n in counts.values() if n > 1)
    stats = ColumnStats(name=name, dtype=str(series.dtype), count=count, distinct=len(counts), numeric=False,
                        integer=False, repeated_share=repeated / count if count else 0.0,
                        samples=[v for v in list(dict.fromkeys(keyed))[:3]])
    if not count:
        return stats
    lists = [v for v in values if isinstance(v, list)]
    text_lists = []
    for v in values:
        if isinstance(v, str) and v.strip().startswith("[") and v.strip().endswith("]"):
            try:
                parsed = json.loads(v)
            except ValueError:
                continue
            if isinstance(parsed, list):
                text_lists.append(parsed)
    all_lists = lists + text_lists
    stats.list_share = len(all_lists) / count
    stats.dict_share = sum(isinstance(v, dict) for v in values) / count
    stats.chat_share = sum(bool(v) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)
                           for v in lists) / count
    items = {json.dumps(i, sort_keys=True, default=str) for v in all_lists for i in v}
    stats.list_items = len(items)
    numbers = pd.to_numeric(pd.Series([v for v in values if not isinstance(v, (list, dict))]), errors="coerce")
    if len(numbers) == count and numbers.notna().all() and not all(isinstance(v, bool) for v in values):
        stats.numeric = True
        stats.integer = bool((numbers == numbers.round()).all())
        stats.minimum, stats.maximum = float(numbers.min()), float(numbers.max())
        return stats
    strings = [v for v in values if isinstance(v, str)]
    if strings:
        stats.mean_words = sum(_words(s) for s in strings) / len(strings)
        stats.mean_chars = sum(len(s) for s in strings) / len(strings)
        pathlike = [s for s in strings if _PATHLIKE.match(s.strip()) and not s.strip().startswith("[")]
        stats.path_share = len(pathlike) / count
        stats.extensions = dict(Counter(Path(s.strip()).suffix.lower() for s in pathlike))
        if stats.list_share < 0.5:
            for sep in SEPARATORS:
                holding = [s for s in strings if sep in s]
                stats.separator_share[sep] = len(holding) / count
                if holding:
                    stats.parts[sep] = len({p.strip() for s in strings for p in s.split(sep)
                                            if p.strip() and p.strip() != "[]"})
        elif items:
            # JSON lists written as text ('["a", "b"]'): several labels per row without a separator.
            stats.separator_share["json"] = sum(len(v) > 1 for v in all_lists) / count
            stats.parts["json"] = len(items)
    return stats


@dataclass
class Claim:
    """A plugin's answer to ``finetune_claim_data``: "this data fits my task ``task``".

    ``score`` (0..1) is the plugin's confidence. Guide: 0.9 and above when the data's form leaves no doubt
    (a SQuAD JSON, a Pascal VOC folder, chat messages); 0.7-0.85 when column heuristics decide (a text column
    and a label column); 0.4-0.6 for a plausible alternative. ``finetune init`` takes the best claim, and
    refuses (listing the candidates and the ``--task`` to choose) when the best is below 0.5 or a claim for
    another task comes within 0.1 of it.

    ``settings`` are the recipe values proposed, by section: ``{"task": {...}, "model": {"backbone": ...},
    "data": {"train": Path(...), "text_column": "review"}, "train": {...}}`` (``task.name`` is added by the
    core; :class:`pathlib.Path` values are written relative to the recipe file). ``comments`` holds one short
    comment per key (``{"data.text_column": "2,000 distinct values, mean 14 words"}``), written beside it.
    ``reasons`` are sentences explaining the choice; ``notes`` are shown after it (alternatives, caveats).
    """

    task: str                  #: the task name (as registered; ``finetune tasks`` lists them)
    score: float               #: confidence, 0..1 (see above)
    reasons: list[str] = field(default_factory=list)  #: why, in sentences ("column `review` looks like text: ...")
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  #: recipe values by section
    comments: dict[str, str] = field(default_factory=dict)  #: "section.key" -> a comment written beside it
    notes: list[str] = field(default_factory=list)  #: caveats and alternatives, shown after the reasons
    plugin: str = ""           #: filled in by the core: the plugin that made the claim
