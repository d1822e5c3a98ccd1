"""Reading data files (CSV/TSV/JSONL/JSON/Parquet) with errors that name the file and line, and
reproducible train/eval splits. Media decoding (images, audio) lives in the plugins.

Local files are read with pandas rather than ``datasets``: it is faster to start, and its parse
errors carry the line we need for a clear message. :func:`read_jsonl` reads JSON lines one by one,
for data whose records hold lists or nested objects (chat turns, token lists).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
           ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in FORMATS:
            return FORMATS[suffix]
    raise DataError(f"{path}: cannot tell the file format from the extension {path.suffix!r}; "
                    f"use one of {', '.join(sorted(FORMATS))} or set data.format.")


def load_table(path: str | Path | None, fmt: str = "auto", key: str = "data.train") -> pd.DataFrame:
    """Read a table file; missing, unreadable or empty files raise :class:`DataError` naming ``key``."""
    import pandas as pd

    if path is None:
        raise DataError(f"{key}: not set; this task reads its data from a table file in {key} (a .csv, .tsv, "
                        ".jsonl or .parquet), not from data.dataset. Set {key}.")
    path = Path(path)
    if path.is_symlink() and not path.exists():
        import os

        raise DataError(f"{key}: {path} is a symbolic link to {os.readlink(path)}, which does not exist; fix "
                        f"the link or point {key} at the real file.")
    if not path.exists():
        raise DataError(f"{key}: file not found: {path}. Check the path (relative paths resolve "
                        "against the recipe's folder).")
    if path.is_dir():
        raise DataError(f"{key}: {path} is a folder; this task reads a table file (.csv, .jsonl, .parquet).")
    kind = detect_format(path, fmt)
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {path} is empty (0 bytes); it needs a header row and at least one example.")
    try:
        if kind in ("csv", "tsv"):
            df = _read_delimited(path, "," if kind == "csv" else "\t", key)
        elif kind == "jsonl":
            try:
                df = pd.read_json(path, lines=True)
            except ValueError:
                _check_jsonl(path, key)  # names the bad line; pandas only gives a byte position
                raise
        elif kind == "json":
            df = pd.read_json(path)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{key}: {path} is empty; it needs a header row and at least one example.") from None
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{key}: {path} is not UTF-8 text: {_where_not_utf8(path, exc)}. Save it as UTF-8 "
                        "(e.g. in a spreadsheet: 'CSV UTF-8'; or iconv -f LATIN1 -t UTF-8).") from None
    except pd.errors.ParserError as exc:
        hint = other_delimiter_hint(path, kind, key) or ("A text containing the delimiter, a quote or a line "
                                                          "break must be quoted (\"...\").")
        raise DataError(f"{key}: cannot read {path} as {kind}: {str(exc).strip()}. {hint}") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"{key}: cannot read {path} as {kind}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. pyarrow errors on a corrupt parquet file
        raise DataError(f"{key}: cannot read {path} as {kind}: {type(exc).__name__}: {exc}") from None
    if len(df) == 0:
        raise DataError(f"{key}: {path} has no rows (columns found: {', '.join(map(str, df.columns)) or 'none'}).")
    df.columns = [str(c) for c in df.columns]
    return df


def _where_not_utf8(path: Path, exc: UnicodeDecodeError) -> str:
    """'line 3 (byte 0xe9)', or 'it starts with a UTF-16 byte-order mark', for the first bad byte."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return "it starts with a UTF-16 byte-order mark (saved as UTF-16 / 'Unicode')"
        fh.seek(0)
        line = 1
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as bad:
                if bad.reason != "unexpected end of data":  # not just a character cut by the chunk edge
                    byte, at = chunk[bad.start], line + chunk.count(b"\n", 0, bad.start)
                    return f"line {at} has byte 0x{byte:02x}, which is not UTF-8 (Latin-1 / Windows-1252 text?)"
            line += chunk.count(b"\n")
    return str(exc)


def _read_delimited(path: Path, sep: str, key: str) -> pd.DataFrame:
    """read_csv that refuses rows with more fields than the header instead of silently using the first
    column as the index (pandas' behaviour) or dropping data."""
    import warnings

    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, sep=sep, keep_default_na=False, na_values=[""], index_col=False)
        except pd.errors.ParserWarning:
            pass
    line, n_fields, n_header = _first_long_row(path, sep)
    hint = other_delimiter_hint(path, "csv" if sep == "," else "tsv", key)
    hint = f". {hint}" if hint else "; quote texts that contain the delimiter (\"...\") or fix the row."
    raise DataError(f"{key}: {path}: line {line} has {n_fields} fields but the header has {n_header}{hint}")


#: Delimiters a table file may use, by name; finetune reads the first two (data.format "csv" and "tsv").
DELIMITERS = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "pipes ('|')"}
_SEPARATOR_OF = {"csv": ",", "tsv": "\t"}


def other_delimiter_hint(path: Path, kind: str, key: str) -> str:
    """When the first line of a file read as ``kind`` (csv/tsv) splits cleanly on another delimiter (tab,
    comma, semicolon, pipe), a sentence saying so and how to read the file; else ``""``.

    "Cleanly": the header has none of the expected delimiter and splits into two or more non-empty names
    on exactly one other delimiter (a header such as ``text\tlabel`` in a .csv file)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = fh.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""
    return delimiter_hint(header, _SEPARATOR_OF.get(kind), key, path)


def delimiter_hint(header: str, expected: str | None, key: str, path: str | Path) -> str:
    """The sentence of :func:`other_delimiter_hint` for a header line already read (``expected``: the
    delimiter the file was read with, None if unknown)."""
    if expected is not None and expected in header:
        return ""
    found = [sep for sep in DELIMITERS if sep != expected and len(header.split(sep)) >= 2
             and all(name.strip() for name in header.split(sep))]
    if len(found) != 1:
        return ""
    sep = found[0]
    was = {",": "read as comma-separated (csv)", "\t": "read as tab-separated (tsv)"}.get(expected or "",
                                                                                     "read as one column")
    names = ", ".join(repr(name.strip()) for name in header.split(sep))
    said = f"Its first line splits cleanly on {DELIMITERS[sep]} (columns {names}), but the file was {was}."
    fmt = {",": "csv", "\t": "tsv"}.get(sep)
    if fmt is not None and key.startswith("data."):
        return f"{said} Set data.format = \"{fmt}\" in the recipe (or rename the file to .{fmt})."
    if fmt is not None:
        return f"{said} Rename the file to .{fmt} (the format comes from the extension)."
    return (f"{said} finetune reads comma-separated (.csv) and tab-separated (.tsv) files, not {DELIMITERS[sep]}: "
            f"save it as 'CSV UTF-8' with commas, or convert it: python -c \"import pandas as pd; "
            f"pd.read_csv('{Path(path).name}', sep='{sep}').to_csv('{Path(path).stem}-commas.csv', index=False)\".")


def _first_long_row(path: Path, sep: str) -> tuple[int | str, int | str, int | str]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=sep)
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return reader.line_num, len(row), len(header)
    return "?", "more", len(header)


def _check_jsonl(path: Path, key: str) -> None:
    """Raise a DataError naming the first line that is not a JSON object, if any."""
    read_jsonl(path, key)


def read_jsonl(path: str | Path, key: str = "data.train") -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of a JSON-lines file, in file order.

    A line that is not valid JSON, or not a JSON object, is a :class:`DataError` naming ``key``, the file
    and the line; so are a missing, folder, non-UTF-8 or empty file. Values keep their JSON types (lists,
    nested objects), unlike a table cell."""
    import json

    path = Path(path)
    if not path.exists():
        raise DataError(f"{key}: file not found: {path}. Check the path (relative paths resolve against the "
                        "recipe's folder).")
    if path.is_dir():
        raise DataError(f"{key}: {path} is a folder; give a .jsonl file (one JSON object per line).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{key}: {path} is not UTF-8 text: {_where_not_utf8(path, exc)}. Save it as UTF-8.") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{key}: {path}: line {number} is not valid JSON ({exc}); each line of a .jsonl file "
                            "must be one JSON object.") from None
        if not isinstance(record, dict):
            raise DataError(f"{key}: {path}: line {number} is a JSON {type(record).__name__}, not an object; each "
                            "line of a .jsonl file must be one JSON object such as {\"text\": \"...\", "
                            "\"label\": \"...\"}.")
        records.append((number, record))
    if not records:
        raise DataError(f"{key}: {path} has no records (the file is empty or only blank lines).")
    return records


def require_columns(df: pd.DataFrame, columns: dict[str, str | None], path: str | Path) -> None:
    """``columns`` maps recipe key (e.g. ``data.text_column``) -> column name; None entries are skipped."""
    for key, column in columns.items():
        if column is not None and column not in df.columns:
            found = ", ".join(repr(c) for c in df.columns)
            from finetune.errors import did_you_mean

            hint = ""
            if len(df.columns) == 1 and any(d in str(df.columns[0]) for d in DELIMITERS):
                hint = " " + (delimiter_hint(str(df.columns[0]), None, key, path) or (
                    "The file was read as a single column: its delimiter does not match the format; check "
                    "data.format (csv: comma, tsv: tab)."))
            raise DataError(f"{key}: column {column!r} not found in {path}{did_you_mean(column, df.columns)}. "
                            f"Columns found: {found}. Set {key} to one of them.{hint}")


def split_frame(df: pd.DataFrame, fraction: float, seed: int, stratify: str | None = None,
                group: str | None = None, key: str = "data.split") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``fraction`` of the rows (for evaluation, or the test split), reproducibly:
    ``(kept, held_out)``.

    With ``group``, rows sharing a group value stay on one side (word variants,
    patients, speakers...). Otherwise, with ``stratify``, class proportions are kept.
    ``key`` is the recipe key that asked for it, named in errors (``data.split``, ``data.test_split``).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if group is not None:
        # a sorted numpy array: shuffling pandas' Arrow-backed arrays in place is unsafe (duplicates)
        groups = np.array(sorted(df[group].astype(str).unique()), dtype=object)
        rng.shuffle(groups)
        n_eval = max(1, int(round(len(groups) * fraction)))
        eval_groups = set(groups[:n_eval])
        mask = df[group].astype(str).isin(eval_groups).to_numpy()
    else:
        mask = np.zeros(len(df), dtype=bool)
        if stratify is not None:
            for _, idx in df.groupby(stratify, sort=True).indices.items():
                idx = np.array(idx)
                rng.shuffle(idx)
                n_eval = int(round(len(idx) * fraction))
                if len(idx) > 1:
                    n_eval = min(max(n_eval, 1), len(idx) - 1)
                mask[idx[:n_eval]] = True
        else:
            idx = rng.permutation(len(df))
            mask[idx[: max(1, int(round(len(df) * fraction)))]] = True
    train, eval_ = df[~mask].reset_index(drop=True), df[mask].reset_index(drop=True)
    if len(train) == 0 or len(eval_) == 0:
        held = "test" if key == "data.test_split" else "eval"
        raise DataError(f"{key}: holding out {fraction} of {len(df)} rows leaves an empty "
                        f"{'train' if len(train) == 0 else held} set; add rows or give data.{held}.")
    return train, eval_
