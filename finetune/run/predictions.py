"""Reading prediction inputs and writing predictions (JSON lines, or a CSV whose list and dict cells are JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune.engine.guard import PREDICTION_PREFIXES
from finetune.errors import DataError


def read_records(task: Any, input_path: Path | None, texts: list[str] | None = None) -> list[dict[str, Any]]:
    columns = task.predict_input_columns()
    if texts:
        if not columns:
            raise DataError("predict: this task takes no --text input; use --input.")
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


#: Output formats by file suffix (``finetune predict --output``); anything else is CSV unless --format says.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def output_format(output_path: Path | None, fmt: str = "auto") -> str:
    """``jsonl``/``csv``/``tsv``: ``fmt`` when given, else from the suffix (stdout: JSON lines)."""
    if fmt != "auto":
        return fmt
    if output_path is None:
        return "jsonl"
    return FORMATS.get(output_path.suffix.lower(), "csv")


def write_predictions(rows: list[dict[str, Any]], output_path: Path | None, fmt: str = "auto") -> None:
    """One JSON object per line (stdout, or a .jsonl file), or a CSV/TSV file in which list and dict values
    (tags, spans, probabilities) are written as JSON text, so a spreadsheet or ``json.loads`` reads them back."""
    kind = output_format(output_path, fmt)
    if output_path is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False, default=_plain) + "\n")
        return
    if kind == "jsonl":
        with open(output_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)
    else:
        import csv

        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(output_path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    print(f"wrote {len(rows)} predictions to {output_path} ({kind})", file=sys.stderr)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, default=_plain)
    return value


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, paths: as JSON can hold them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
