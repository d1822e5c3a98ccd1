"""Image data from a Hugging Face ``datasets`` source (``data.dataset``), offline only.

``data.dataset`` names one of:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``);
- a local ``.parquet`` / ``.arrow`` / ``.csv`` / ``.jsonl`` file, or a folder of such files (or any folder
  ``datasets.load_dataset`` reads locally, e.g. an ``imagefolder`` tree or a dataset repo clone);
- a Hub dataset name (``user/name``), read only from the local caches: the prepared ``datasets`` cache
  (``HF_DATASETS_CACHE``) or a downloaded snapshot in the Hub cache (``HF_HUB_CACHE``). Nothing is
  downloaded: a name that is not cached fails at once with an error that says how to provide the data.

Relative paths resolve against the recipe's folder (``./x``, ``../x`` and ``~/x`` are always paths; a bare
``name`` is a path when it exists beside the recipe, else a Hub name).

Images: a ``datasets.Image`` column (embedded bytes or file paths), a binary column of encoded image
bytes, or a string column of file paths (relative to the dataset's folder). Labels: ``ClassLabel``
(its names become the label names, in its order), strings or integers.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import DataError, RecipeError, cache_root

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".jsonl": "json",
                  ".json": "json"}
HOW_TO_PROVIDE = (
    "To use it, on a machine with network run "
    "`datasets.load_dataset(NAME).save_to_disk(\"my-data\")` (or download the repo's parquet files) and set "
    "data.dataset to that folder or file; or load it there once so it lands in the Hugging Face cache "
    "(HF_DATASETS_CACHE / HF_HUB_CACHE) and copy the cache here.")


@dataclass
class Frames:
    """What :func:`load_frames` returns: ``train``/``eval`` DataFrames and facts for ``finetune validate``."""

    train: Any
    eval: Any  # None: hold out data.split of train
    label_order: list[str] | None  # ClassLabel names (their order), else None
    info: dict[str, Any]
    resolved: str  # data.dataset as resolved (absolute path, or the Hub name)


@contextlib.contextmanager
def _offline_quiet():
    """Offline mode for ``datasets`` (no Hub request can start) and no progress bars, restored afterwards."""
    import datasets
    import datasets.config
    from datasets.utils import logging as dlog

    saved = datasets.config.HF_HUB_OFFLINE
    bars = dlog.is_progress_bar_enabled()
    verbosity = dlog.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = True
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
        if bars:
            dlog.enable_progress_bar()
        dlog.set_verbosity(verbosity)


def resolve_location(value: str, recipe_dir: Path | None) -> tuple[str, Path | None]:
    """``(resolved, path)``: ``path`` is the local file/folder, or None for a Hub name."""
    expanded = Path(value).expanduser()
    explicit = expanded.is_absolute() or value in (".", "..", "~") or value.startswith(("./", "../", "~/"))
    base = recipe_dir or Path.cwd()
    candidate = expanded if expanded.is_absolute() else (base / expanded)
    if explicit or candidate.exists():
        if not candidate.exists():
            raise DataError(f"data.dataset: not found: {candidate.resolve()}. Give a folder written by "
                            "Dataset.save_to_disk, a .parquet/.arrow/.csv/.jsonl file or folder, or a Hub "
                            "dataset name that is in the local Hugging Face cache.")
        resolved = candidate.resolve()
        return str(resolved), resolved
    if not _HUB_NAME.match(value):
        raise DataError(f"data.dataset: {value!r} is neither an existing path (looked for {candidate.resolve()}) "
                        "nor a Hub dataset name (user/name).")
    return value, None


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (
        (folder / "state.json").exists() and (folder / "dataset_info.json").exists())


def _local_files_cache() -> str:
    return str(cache_root() / "hf-datasets")


def _load_saved(folder: Path) -> Any:
    """``load_from_disk`` that survives empty splits (datasets cannot reload a saved 0-row split): a Dataset,
    or a dict split -> Dataset (None for an empty split)."""
    import json

    import datasets

    def empty(split_folder: Path) -> bool:
        state = json.loads((split_folder / "state.json").read_text())
        return not state.get("_data_files")

    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        return {s: None if empty(folder / s) else datasets.load_from_disk(str(folder / s)) for s in splits}
    if empty(folder):
        raise DataError(f"data.dataset: {folder} is empty (0 rows); save a dataset with examples.")
    return datasets.load_from_disk(str(folder))


def _load_local(path: Path, config: str | None) -> Any:
    """A Dataset, a DatasetDict or a dict split -> Dataset from a local path."""
    import datasets

    if path.is_dir() and _is_saved_to_disk(path):
        return _load_saved(path)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"data.dataset: {path} is a {path.suffix or 'extension-less'} file; give a .parquet, "
                            ".arrow, .csv or .jsonl file, or a folder (save_to_disk output or data files).")
        return datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=_local_files_cache())
    return datasets.load_dataset(str(path), config, cache_dir=_local_files_cache())


def _load_hub_cached(name: str, config: str | None) -> tuple[Any, str]:
    """A DatasetDict of a Hub dataset from the local caches only; ``(dataset, where)``."""
    import datasets
    import datasets.config

    errors = []
    try:  # the prepared datasets cache (what load_dataset leaves behind)
        return datasets.load_dataset(name, config), f"the datasets cache ({datasets.config.HF_DATASETS_CACHE})"
    except Exception as exc:  # noqa: BLE001 - any failure: try the Hub cache next, then explain
        errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        errors.append(f"{type(exc).__name__}")
        from huggingface_hub import constants

        raise DataError(
            f"data.dataset: {name!r} is not an existing path, and as a Hub dataset it is not in the local "
            f"caches (datasets cache {datasets.config.HF_DATASETS_CACHE}, Hub cache {constants.HF_HUB_CACHE}); "
            f"offline, nothing is downloaded. {HOW_TO_PROVIDE.replace('NAME', repr(name))}") from None
    try:
        return datasets.load_dataset(folder, config, cache_dir=_local_files_cache()), f"the Hub cache ({folder})"
    except Exception as exc:  # noqa: BLE001 - report what datasets said
        raise DataError(f"data.dataset: {name!r}: the cached Hub snapshot {folder} does not load with datasets "
                        f"({type(exc).__name__}: {str(exc)[:300]}).") from None


def _pick_split(dataset: Any, split: str, key: str, where: str) -> Any:
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset
    if split not in dataset:
        names = list(dataset)
        close = difflib.get_close_matches(split, names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{key}: split {split!r} not found in {where}{hint}. Splits found: {names}. "
                        f"Set {key} to one of them.")
    if dataset[split] is None:
        raise DataError(f"{key}: {where}[{split}] is empty (0 rows); choose a split with examples.")
    return dataset[split]


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
    """Read ``data.dataset`` (see the module docstring) into train (and eval) frames."""
    if data.train or data.source:
        raise RecipeError("data.dataset is set together with data." + ("train" if data.train else "source")
                          + "; keep one source of training data.")
    if data.eval:
        raise RecipeError("data.eval cannot be combined with data.dataset; name the eval split with "
                          "data.dataset_eval_split (or leave it unset to hold out data.split of the train split).")
    resolved, path = resolve_location(data.dataset, recipe_dir)
    with _offline_quiet():
        try:
            if path is not None:
                dataset, where = _load_local(path, data.dataset_config), str(path)
            else:
                dataset, where = _load_hub_cached(resolved, data.dataset_config)
        except DataError:
            raise
        except ValueError as exc:
            empty = re.match(r'Instruction "(.+)" corresponds to no data', str(exc))
            if not empty:
                raise DataError(f"data.dataset: {resolved} does not load with datasets (ValueError: "
                                f"{str(exc)[:300]}).") from None
            raise DataError(f"data.dataset: {resolved}: split {empty.group(1)!r} is empty (0 rows) and datasets "
                            "cannot load an empty split; remove its files or give it examples.") from None
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a bad local source
            raise DataError(f"data.dataset: {resolved} does not load with datasets ({type(exc).__name__}: "
                            f"{str(exc)[:300]}).") from None
    import datasets

    single = isinstance(dataset, datasets.Dataset)
    if single and data.dataset_eval_split:
        raise RecipeError(f"data.dataset_eval_split: {resolved} is a single Dataset without splits; unset "
                          "data.dataset_eval_split to hold out data.split of it.")
    base = path if path is not None and path.is_dir() else (path.parent if path is not None else None)
    train_ds = _pick_split(dataset, data.dataset_split, "data.dataset_split", where)
    train_where = resolved if single else f"{resolved}[{data.dataset_split}]"
    train, class_names = _frame(train_ds, data, base, train_where, "data.dataset_split")
    eval_ = None
    if data.dataset_eval_split:
        eval_ds = _pick_split(dataset, data.dataset_eval_split, "data.dataset_eval_split", where)
        eval_, _ = _frame(eval_ds, data, base, f"{resolved}[{data.dataset_eval_split}]", "data.dataset_eval_split")
    info = {"dataset": resolved, "dataset_loaded_from": where if path is None else None,
            "dataset_split": None if single else data.dataset_split,
            "dataset_eval_split": data.dataset_eval_split}
    return Frames(train=train, eval=eval_, label_order=class_names, info=info, resolved=resolved)


def is_datasets_input(path: Path) -> bool:
    """Whether ``finetune predict --input PATH`` should be read with datasets (not as an image folder/table)."""
    return (path.is_dir() and _is_saved_to_disk(path)) or path.suffix.lower() in (".arrow", ".parquet")


def predict_records(path: Path, image_column: str) -> list[dict[str, Any]]:
    """Records for ``finetune predict``: ``image`` (a path or ``file[split][row]``) and ``source`` (what to
    decode: a path or encoded bytes) from a save_to_disk folder or a .parquet/.arrow file."""
    key = "--input image column (data.image_column)"
    with _offline_quiet():
        try:
            dataset = _load_local(path, None)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a bad file
            raise DataError(f"--input: {path} does not load with datasets ({type(exc).__name__}: "
                            f"{str(exc)[:300]}).") from None
    import datasets

    if isinstance(dataset, datasets.Dataset):
        ds, where = dataset, str(path)
    else:
        splits = [s for s in dataset if dataset[s] is not None]
        if len(splits) != 1:
            raise DataError(f"--input: {path} holds the splits {list(dataset)}; give one split, e.g. "
                            f"{path / splits[0] if splits and path.is_dir() else path} (save_to_disk writes "
                            "one folder per split).")
        ds, where = dataset[splits[0]], f"{path}[{splits[0]}]"
    if image_column not in ds.column_names:
        raise _column_error(key, image_column, ds, where)
    names, sources = _image_sources(ds, image_column, path if path.is_dir() else path.parent, where)
    return [{"image": n, "source": s} if not isinstance(s, str) else {"image": s} for n, s in zip(names, sources)]
