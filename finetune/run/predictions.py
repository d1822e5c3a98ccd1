"""Reading prediction inputs and writing predictions (JSON lines, a JSON array, or a CSV/TSV table whose list and
dict cells are JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune.contract.task import Task
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
        taken = sorted({k for r in records for k in r if isinstance(k, str) and k.startswith(PREDICTION_PREFIXES)})
        if taken:
            raise DataError(f"--input: {input_path} has the column(s) {', '.join(map(repr, taken))}: names starting "
                            f"with {' or '.join(PREDICTION_PREFIXES)} are where `finetune predict` writes its "
                            "predictions (is this an earlier output of predict?). Rename or drop those columns.")
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
    kind = output_format(output_path, fmt)
    if output_path is None:
        _write(rows, sys.stdout, kind, line_end="\n")
        return
    with open(output_path, "w", newline="", encoding="utf-8") as fh:
        _write(rows, fh, kind)
    print(f"wrote {len(rows)} predictions to {output_path} ({FORMAT_NAMES[kind]})", file=sys.stderr)


def _write(rows: list[dict[str, Any]], fh: Any, kind: str, line_end: str = "\r\n") -> None:
    if kind == "jsonl":
        fh.writelines(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)
    elif kind == "json":
        json.dump(rows, fh, ensure_ascii=False, default=_plain, indent=1)
        fh.write("\n")
    else:
        import csv

        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(fh, fieldnames=columns, delimiter="\t" if kind == "tsv" else ",",
                                lineterminator=line_end)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=_plain)
    return value


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, paths: as JSON can hold them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
