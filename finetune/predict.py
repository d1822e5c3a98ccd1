"""Reading prediction inputs and writing predictions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

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
        return task.read_predict_input(input_path)
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


def write_predictions(rows: list[dict[str, Any]], output_path: Path | None) -> None:
    if output_path is None:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    import pandas as pd

    df = pd.DataFrame(rows)
    if output_path.suffix.lower() in (".jsonl", ".ndjson"):
        df.to_json(output_path, orient="records", lines=True)
    else:
        df.to_csv(output_path, index=False)
    print(f"wrote {len(rows)} predictions to {output_path}", file=sys.stderr)
