"""Reading prediction inputs and writing predictions (JSON lines, a JSON array, or a CSV/TSV table whose list and
dict cells are JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from finetune.contract.tables import detect_format, load_table
from finetune.contract.task import Task, missing_input_column
from finetune.engine.guard import PREDICTION_PREFIXES
from finetune.errors import DataError


def read_records(task: Any, input_path: Path | None, texts: list[str] | None = None) -> list[dict[str, Any]]:
    columns = task.predict_input_columns()
    if texts:
        if not columns:
            raise DataError("predict: this task takes no --text input; use --input.")
        if len(columns) > 1:
            raise DataError(f"predict: this run reads the columns {columns} for each input (e.g. a text pair), so one "
                            "--text is not enough; give them in an --input file (CSV, TSV or JSON lines).")
        return [{columns[0]: t} for t in texts]
    if input_path is not None:
        if not input_path.exists():
            raise DataError(f"--input: {input_path} not found.")
        records = task.read_predict_input(input_path)
        _refuse_prediction_columns(input_path, {k for r in records for k in r})
        return records
    if sys.stdin.isatty():
        print(f"reading one {columns[0] if columns else 'input'} per line from stdin (Ctrl-D to finish)...",
              file=sys.stderr)
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not lines:
        raise DataError("predict: no input: give --input FILE or pipe lines on stdin.")
    if len(columns) != 1:
        raise DataError(f"predict: this task needs columns {columns}; give them in an --input file.")
    return [{columns[0]: line} for line in lines]


#: Records read, predicted and written at a time by ``finetune predict --input``: memory holds one chunk (its
#: records, their predictions, the text tasks' length-sorted batches), whatever the input's size.
CHUNK_ROWS = 2048


def iter_record_chunks(task: Any, input_path: Path | None, texts: list[str] | None = None,
                       chunk_rows: int = CHUNK_ROWS) -> Iterator[list[dict[str, Any]]]:
    """The prediction inputs in chunks of at most ``chunk_rows`` records, read as they are needed: a
    .csv/.tsv/.jsonl/.parquet ``--input`` (read with the default :meth:`Task.read_predict_input`) and stdin
    lines are streamed, so a file larger than memory works; a task's own ``read_predict_input`` (an image
    folder, a JSON file) and ``--text`` are read whole, then chunked. Errors name the file and the line."""
    if texts or input_path is None or task.implements("read_predict_input") or \
            detect_format(input_path, "auto") not in STREAMED:
        if input_path is None and not texts:
            yield from _stdin_chunks(task, chunk_rows)
            return
        records = read_records(task, input_path, texts)
        for start in range(0, len(records), chunk_rows):
            yield records[start:start + chunk_rows]
        return
    if not input_path.exists():
        raise DataError(f"--input: {input_path} not found.")
    first, seen, needed = True, 0, task.predict_input_columns()
    for chunk in _table_chunks(input_path, chunk_rows):
        if first:
            _check_columns(task, input_path, chunk)
            first = False
        for number, record in enumerate(chunk, seen + 1):
            for column in needed:
                if column not in record:  # a .jsonl line without the field
                    raise DataError(f"--input: {input_path}, record {number}: has no {column!r} field (it has "
                                    f"{', '.join(map(repr, record)) or 'none'}); every record needs "
                                    f"{', '.join(map(repr, needed))}.")
        seen += len(chunk)
        yield chunk
    if first:
        load_table(input_path, key="--input")  # says why there are no rows (empty file, header only...)
        raise DataError(f"--input: {input_path} has no rows.")


#: Input formats read a chunk at a time.
STREAMED = ("csv", "tsv", "jsonl", "parquet")


def _check_columns(task: Any, path: Path, chunk: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in chunk for k in r))
    missing = [c for c in task.predict_input_columns() if c not in columns]
    if missing:
        raise missing_input_column(path, missing[0], [str(c) for c in columns], task.recipe.data)
    _refuse_prediction_columns(path, columns)


def _refuse_prediction_columns(path: Path, columns: Any) -> None:
    taken = sorted({k for k in columns if isinstance(k, str) and k.startswith(PREDICTION_PREFIXES)})
    if taken:
        raise DataError(f"--input: {path} has the column(s) {', '.join(map(repr, taken))}: names starting "
                        f"with {' or '.join(PREDICTION_PREFIXES)} are where `finetune predict` writes its "
                        "predictions (is this an earlier output of predict?). Rename or drop those columns.")


def _table_chunks(path: Path, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    """Records of a table file, ``chunk_rows`` at a time; a read error is reported as ``load_table`` reports it
    (naming the file and the line), by reading the file again only then."""
    kind = detect_format(path, "auto")
    try:
        if kind == "jsonl":
            yield from _jsonl_chunks(path, chunk_rows)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                if batch.num_rows:
                    yield batch.to_pandas().to_dict(orient="records")
        else:
            import warnings

            import pandas as pd

            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                reader = pd.read_csv(path, sep="," if kind == "csv" else "\t", keep_default_na=False,
                                     na_values=[""], index_col=False, chunksize=chunk_rows)
                with reader:
                    for frame in reader:
                        if frame.empty:
                            continue
                        frame.columns = [str(c) for c in frame.columns]
                        yield frame.to_dict(orient="records")
    except (DataError, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the whole-file reader names what is wrong, and where
        load_table(path, key="--input")
        raise DataError(f"--input: cannot read {path} as {kind}: {type(exc).__name__}: {exc}") from None


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"--input: {path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}). "
                                "Each line of a .jsonl file is one JSON object.") from None
            if not isinstance(record, dict):
                raise DataError(f"--input: {path}, line {number}: a JSON {type(record).__name__}, not an object "
                                "({\"column\": value, ...}); each line of a .jsonl file is one record.")
            chunk.append(record)
            if len(chunk) == chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _stdin_chunks(task: Any, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    columns = task.predict_input_columns()
    if len(columns) != 1:
        raise DataError(f"predict: this task needs columns {columns}; give them in an --input file.")
    if sys.stdin.isatty():
        print(f"reading one {columns[0]} per line from stdin (Ctrl-D to finish)...", file=sys.stderr)
    chunk: list[dict[str, Any]] = []
    seen = False
    for line in sys.stdin:
        if line.strip():
            chunk.append({columns[0]: line.rstrip("\n")})
            if len(chunk) == chunk_rows:
                yield chunk
                seen, chunk = True, []
    if chunk:
        yield chunk
    elif not seen:
        raise DataError("predict: no input: give --input FILE or pipe lines on stdin.")


def predict_records(task: Any, model: Any, processor: Any, records: list[dict[str, Any]],
                    batch_size: int, stream: bool = False) -> list[dict[str, Any]]:
    import torch

    with torch.no_grad():
        return task.predict(model, processor, records, batch_size=batch_size, stream=stream)


def check_draw(task: Any, folder: Path | None) -> None:
    """``--draw DIR`` is refused (before anything is predicted) for a task that draws no pictures, and when
    DIR is a file."""
    if folder is None:
        return
    if not task.implements("draw_predictions"):
        from finetune.engine.plugins import get_registry

        drawing = sorted(name for name, info in get_registry().tasks.items()
                         if getattr(info.cls, "draw_predictions", None) is not Task.draw_predictions)
        which = f"the tasks that do: {', '.join(drawing)}" if drawing else "no installed task does"
        raise DataError(f"--draw: the task {task.name!r} draws no pictures of its predictions ({which}); "
                        "leave out --draw.")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--draw: {folder} is a file; give a folder (it is created if missing).")


def draw_predictions(task: Any, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """The task's pictures of ``rows`` in ``folder`` (created if missing); prints where they went."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [Path(p) for p in task.draw_predictions(rows, folder)]
    print(f"drew {len(written)} picture(s) in {folder}", file=sys.stderr)
    return written


#: Output formats by file suffix (``finetune predict --output``); ``--format`` chooses one whatever the suffix.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
#: What each format writes, for help and error messages.
FORMAT_NAMES = {"jsonl": "JSON lines", "json": "one JSON array", "csv": "a CSV table", "tsv": "a TSV table"}


def output_format(output_path: Path | None, fmt: str = "auto") -> str:
    """``jsonl``/``json``/``csv``/``tsv``: ``fmt`` when given, else from the suffix (stdout: JSON lines). A
    suffix that names no format is an error (rather than a file whose contents its name belies)."""
    if fmt != "auto":
        return fmt
    if output_path is None:
        return "jsonl"
    kind = FORMATS.get(output_path.suffix.lower())
    if kind is None:
        known = ", ".join(f"{suffix} ({FORMAT_NAMES[k]})" for suffix, k in FORMATS.items())
        raise DataError(f"--output: {output_path}: the suffix {output_path.suffix or '(none)'!r} names no format "
                        f"finetune writes ({known}). Name the file with one of these suffixes, or keep the name "
                        f"and choose the format with --format {'|'.join(FORMAT_NAMES)}.")
    return kind


def check_output(output_path: Path | None, fmt: str = "auto") -> str:
    """The output format, checked with the output's folder before any prediction is made (fails fast)."""
    kind = output_format(output_path, fmt)
    if output_path is not None and not output_path.parent.is_dir():
        raise DataError(f"--output: {output_path}: the folder {output_path.parent} does not exist; create it first.")
    return kind


def write_predictions(rows: list[dict[str, Any]], output_path: Path | None, fmt: str = "auto") -> None:
    """JSON lines (stdout's default), one JSON array, or a CSV/TSV table in which list and dict values (tags,
    spans, probabilities) are written as JSON text, so a spreadsheet or ``json.loads`` reads them back."""
    with PredictionWriter(output_path, fmt) as writer:
        writer.write(rows)


class PredictionWriter:
    """Writes predictions a chunk at a time (:meth:`write`), each chunk as soon as it is predicted: JSON lines,
    a CSV/TSV table (its columns: those of the first chunk) or one JSON array (opened before the first row,
    closed by :meth:`close`), byte for byte what writing all rows at once would give. Prints where they went
    on stderr when closed."""

    def __init__(self, output_path: Path | None, fmt: str = "auto") -> None:
        self.kind = output_format(output_path, fmt)
        self.path = output_path
        self.count = 0
        self.columns: list[str] | None = None
        self.line_end = "\n" if output_path is None else "\r\n"
        self.fh = sys.stdout if output_path is None else open(output_path, "w", newline="", encoding="utf-8")
        self.csv_writer: Any = None

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(failed=kind is not None)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.kind == "jsonl":
            self.fh.writelines(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)
        elif self.kind == "json":
            for row in rows:
                item = json.dumps(row, ensure_ascii=False, default=_plain, indent=1).replace("\n", "\n ")
                self.fh.write(("[\n " if self.count == 0 else ",\n ") + item)
                self.count += 1
            return self.fh.flush()
        elif rows:
            self._write_table(rows)
        self.count += len(rows)
        self.fh.flush()

    def _write_table(self, rows: list[dict[str, Any]]) -> None:
        import csv

        if self.columns is None:
            self.columns = list(dict.fromkeys(key for row in rows for key in row))
            self.csv_writer = csv.DictWriter(self.fh, fieldnames=self.columns, lineterminator=self.line_end,
                                             delimiter="\t" if self.kind == "tsv" else ",")
            self.csv_writer.writeheader()
        known = set(self.columns)
        for number, row in enumerate(rows, self.count + 1):
            extra = [k for k in row if k not in known]
            if extra:
                raise DataError(f"predict: record {number} has the field(s) {', '.join(map(repr, extra))} that the "
                                f"first {CHUNK_ROWS} records lack, and a {self.kind.upper()} table's columns are "
                                "fixed by its header, written with the first records. Write JSON lines instead "
                                "(--output FILE.jsonl), or give every record the same fields.")
        self.csv_writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)

    def close(self, failed: bool = False) -> None:
        if self.fh is None:
            return
        if self.kind == "json":
            self.fh.write("[]\n" if self.count == 0 else "\n]\n")
        if self.path is None:
            self.fh.flush()
        else:
            self.fh.close()
            if not failed:
                print(f"wrote {self.count} predictions to {self.path} ({FORMAT_NAMES[self.kind]})",
                      file=sys.stderr)
        self.fh = None


class Progress:
    """A progress line on ``stream`` (stderr): rows done and rows per second, redrawn at most 5 times a second;
    nothing at all when the stream is not a terminal (a log file, a pipe, CI)."""

    def __init__(self, stream: Any = None, label: str = "predicted") -> None:
        import time

        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.rows = 0
        self.start = self.shown = time.perf_counter()

    def update(self, rows: int) -> None:
        import time

        self.rows += rows
        now = time.perf_counter()
        if self.enabled and now - self.shown >= 0.2:
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.rows / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label} {self.rows:,} rows, {rate:,.0f} rows/s")
        self.stream.flush()

    def close(self) -> None:
        import time

        if self.enabled and self.rows:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def stream_predictions(task: Any, model: Any, processor: Any, chunks: Iterable[list[dict[str, Any]]],
                       writer: PredictionWriter, batch_size: int, stream: bool = False,
                       progress: Progress | None = None,
                       each: Callable[[list[dict[str, Any]]], None] | None = None) -> int:
    """Predict each chunk of records and write its rows before the next chunk is read; ``each`` (e.g. drawing)
    sees every chunk's rows after they are written. Returns the number of rows."""
    total = 0
    for chunk in chunks:
        rows = predict_records(task, model, processor, chunk, batch_size, stream=stream)
        writer.write(rows)
        if each is not None:
            each(rows)
        total += len(rows)
        if progress is not None:
            progress.update(len(rows))
    if progress is not None:
        progress.close()
    return total


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=_plain)
    return value


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, paths: as JSON can hold them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
