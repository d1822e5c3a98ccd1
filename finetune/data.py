"""Table loading (CSV/TSV/JSONL/JSON/Parquet) and train/eval splits.

Local files are read with pandas rather than ``datasets``: it is faster to
start, and its parse errors carry the line we need for a clear message.
Media decoding (images, audio) lives in the plugins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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


def load_table(path: str | Path, fmt: str = "auto", key: str = "data.train") -> pd.DataFrame:
    """Read a table file; missing, unreadable or empty files raise :class:`DataError` naming ``key``."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(f"{key}: file not found: {path}. Check the path (relative paths resolve "
                        "against the recipe's folder).")
    if path.is_dir():
        raise DataError(f"{key}: {path} is a folder; this task reads a table file (.csv, .jsonl, .parquet).")
    kind = detect_format(path, fmt)
    try:
        if kind == "csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        elif kind == "tsv":
            df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True)
        elif kind == "json":
            df = pd.read_json(path)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{key}: {path} is empty; it needs a header row and at least one example.") from None
    except (ValueError, pd.errors.ParserError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}: cannot read {path} as {kind}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. pyarrow errors on a corrupt parquet file
        raise DataError(f"{key}: cannot read {path} as {kind}: {type(exc).__name__}: {exc}") from None
    if len(df) == 0:
        raise DataError(f"{key}: {path} has no rows (columns found: {', '.join(map(str, df.columns)) or 'none'}).")
    df.columns = [str(c) for c in df.columns]
    return df


def require_columns(df: pd.DataFrame, columns: dict[str, str | None], path: str | Path) -> None:
    """``columns`` maps recipe key (e.g. ``data.text_column``) -> column name; None entries are skipped."""
    for key, column in columns.items():
        if column is not None and column not in df.columns:
            found = ", ".join(df.columns)
            from finetune.errors import did_you_mean

            raise DataError(f"{key}: column {column!r} not found in {path}{did_you_mean(column, df.columns)}. "
                            f"Columns found: {found}. Set {key} to one of them.")


def split_frame(df: pd.DataFrame, fraction: float, seed: int, stratify: str | None = None,
                group: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``fraction`` of the rows for evaluation, reproducibly.

    With ``group``, rows sharing a group value stay on one side (word variants,
    patients, speakers...). Otherwise, with ``stratify``, class proportions are kept.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if group is not None:
        groups = df[group].astype(str).unique()
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
        raise DataError(f"data.split: holding out {fraction} of {len(df)} rows leaves an empty "
                        f"{'train' if len(train) == 0 else 'eval'} set; add rows or give data.eval.")
    return train, eval_
