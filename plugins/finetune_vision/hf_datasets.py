"""Image data from a Hugging Face ``datasets`` source (``data.dataset``), opened by the core
(``finetune.open_dataset``: a Hub data set from the cache or, online, downloaded; a save_to_disk folder;
local .parquet/.arrow/.csv/.jsonl files or folders). This module turns a split into the plugin's image
table.

Images: a ``datasets.Image`` column (embedded bytes or file paths), a binary column of encoded image
bytes, or a string column of file paths (relative to the dataset's folder). Labels: ``ClassLabel``
(its names become the label names, in its order), strings or integers.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import DataError, DatasetSource, missing_input_column, open_dataset


@dataclass
class Frames:
    """What :func:`load_frames` returns: ``train``/``eval`` DataFrames and facts for ``finetune validate``."""

    train: Any
    eval: Any  # None: hold out data.split of train
    label_order: list[str] | None  # ClassLabel names (their order), else None
    info: dict[str, Any]
    resolved: str  # data.dataset as resolved (absolute path, or the Hub name)
    test: Any = None  # data.dataset_test_split, or None


def _column_error(key: str, column: str, ds: Any, where: str, hint: str = "") -> DataError:
    close = difflib.get_close_matches(column, ds.column_names, n=1, cutoff=0.5)
    dym = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"{key}: column {column!r} not found in {where}{dym}. Columns found: {ds.column_names}. "
                     f"Set {key} to one of them.{hint}")


def _image_sources(ds: Any, column: str, base: Path | None, where: str) -> tuple[list[str], list[Any]]:
    """``(names, sources)``: a display name and a path (str) or encoded bytes for every row."""
    import datasets

    feature = ds.features[column]
    names = [f"{where}[{i}]" for i in range(len(ds))]

    def as_path(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or base is None else (base / q).resolve())

    if isinstance(feature, datasets.Image) or (isinstance(feature, dict) and {"bytes", "path"} <= set(feature)):
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        sources: list[Any] = []
        for i, cell in enumerate(ds[column]):
            cell = cell or {}
            if cell.get("bytes"):
                sources.append(cell["bytes"])
            elif cell.get("path"):
                path = as_path(cell["path"])
                names[i] = path
                sources.append(path)
            else:
                sources.append(None)  # reported as "no image" by the check
        return names, sources
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return names, list(ds[column])
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        paths = [as_path(p) if p else None for p in ds[column]]
        return [p or n for p, n in zip(paths, names)], paths
    raise DataError(f"data.image_column: column {column!r} of {where} holds {feature}; expected a datasets "
                    "Image feature, encoded image bytes, or image file paths.")


def _labels(ds: Any, column: str, where: str) -> tuple[list[str | None], list[str] | None]:
    """``(labels, class_names)``: label strings (None where missing) and the ClassLabel names if any."""
    import datasets

    feature = ds.features[column]
    values = list(ds[column])
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        return [names[v] if v is not None and 0 <= v < len(names) else None for v in values], names
    if isinstance(feature, datasets.Value) and (feature.dtype in ("string", "large_string")
                                                or feature.dtype.startswith(("int", "uint"))):
        return [None if v is None or v == "" else str(v) for v in values], None
    raise DataError(f"data.label_column: column {column!r} of {where} holds {feature}; expected a ClassLabel, "
                    "string or integer labels (one class per image). Cast it, e.g. "
                    "`ds.cast_column(column, datasets.ClassLabel(names=[...]))` or map it to strings.")


def _frame(ds: Any, data: Any, base: Path | None, where: str, key: str) -> tuple[Any, list[str] | None]:
    import pandas as pd

    if len(ds) == 0:
        raise DataError(f"{key}: {where} is empty (0 rows); choose a split with examples.")
    for opt, column in (("data.image_column", data.image_column), ("data.label_column", data.label_column),
                        ("data.group_column", data.group_column)):
        if column is not None and column not in ds.column_names:
            hint = ""
            if opt == "data.image_column":
                import datasets

                images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
                hint = f" The datasets Image column(s): {images}." if images else ""
            raise _column_error(opt, column, ds, where, hint)
    names, sources = _image_sources(ds, data.image_column, base, where)
    labels, class_names = _labels(ds, data.label_column, where)
    missing = [i for i, (s, y) in enumerate(zip(sources, labels)) if s is None or y is None]
    if missing:
        raise DataError(f"{key}: {where}: {len(missing)} row(s) have no image or no label (e.g. row(s) "
                        f"{missing[:5]}); filter them out (ds.filter) or choose another split.")
    frame = pd.DataFrame({"image": names, "label": labels})
    frame["source"] = pd.Series(sources, dtype=object)
    if data.group_column:
        frame[data.group_column] = [str(v) for v in ds[data.group_column]]
    return frame, class_names


def load_frames(data: Any, recipe_dir: Path | None) -> Frames:
    """Read ``data.dataset`` into train (and eval, test) frames."""
    source = open_dataset(data, recipe_dir)
    train_split, eval_split = source.train_and_eval(data)
    train, class_names = _frame(train_split.dataset, data, train_split.base, train_split.where, "data.dataset_split")
    eval_ = None
    if eval_split is not None:
        eval_, _ = _frame(eval_split.dataset, data, eval_split.base, eval_split.where, "data.dataset_eval_split")
    test_split, test = source.test_split(data), None
    if test_split is not None:
        test, _ = _frame(test_split.dataset, data, test_split.base, test_split.where, "data.dataset_test_split")
    return Frames(train=train, eval=eval_, label_order=class_names, info=source.info, resolved=source.resolved,
                  test=test)


def is_datasets_input(path: Path) -> bool:
    """Whether ``finetune predict --input PATH`` should be read with datasets (not as an image folder/table)."""
    return DatasetSource.is_datasets_file(path)


def predict_records(path: Path, data: Any) -> list[dict[str, Any]]:
    """Records for ``finetune predict``: the image column (``data.image_column``: a path or ``file[split][row]``)
    and ``source`` (the encoded bytes to decode, when the data set embeds them) from a save_to_disk folder or a
    .parquet/.arrow file."""
    try:
        source = open_dataset(data, None, location=path)
    except DataError as exc:
        raise DataError(str(exc).replace("data.dataset:", "--input:", 1)) from None
    if source.single:
        ds, where = source.splits, str(path)
    else:
        splits = [s for s in source.splits if source.splits[s] is not None]
        if len(splits) != 1:
            raise DataError(f"--input: {path} holds the splits {list(source.splits)}; give one split, e.g. "
                            f"{path / splits[0] if splits and path.is_dir() else path} (save_to_disk writes "
                            "one folder per split).")
        ds, where = source.splits[splits[0]], f"{path}[{splits[0]}]"
    column = data.image_column
    if column not in ds.column_names:
        raise missing_input_column(where, column, list(ds.column_names), data)
    names, sources = _image_sources(ds, column, path if path.is_dir() else path.parent, where)
    return [{column: n, "source": s} if not isinstance(s, str) else {column: s} for n, s in zip(names, sources)]
