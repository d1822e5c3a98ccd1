"""Data sets named by ``data.dataset``, for every task: a Hugging Face Hub data set, or a local ``datasets``
source, opened with ``datasets``.

``data.dataset`` names one of:

- a Hub data set (``owner/name``): its data files from the Hugging Face cache, else, online, downloaded
  (only data files and the README that says its configurations; announced with their size; the commit
  is pinned into the run folder's recipe as ``data.dataset_revision``). Offline (``HF_HUB_OFFLINE``) a
  data set that is not cached fails at once, saying how to provide it; ``datasets``' own prepared cache
  (``HF_DATASETS_CACHE``) is used as well;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a local ``.parquet`` / ``.arrow`` / ``.csv`` / ``.jsonl`` file, or a folder of such files (or any
  folder ``datasets.load_dataset`` reads locally, e.g. an imagefolder tree).

Relative paths resolve against the recipe's folder (``./x``, ``../x`` and ``~/x`` are always paths; a bare
``name`` is a path when it exists beside the recipe, else a Hub name). ``data.dataset_config`` picks a
configuration, ``data.dataset_split`` the split to train on, ``data.dataset_eval_split`` the one to
evaluate on (unset: ``data.split`` of the training split is held out).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.contract.backbone import cache_root
from finetune.engine import hub_access
from finetune.errors import DataError, RecipeError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".jsonl": "json",
                  ".json": "json"}
#: Files of a data set repo worth downloading: data, media, and the README whose YAML names the configurations.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".json", ".jsonl", ".txt", ".png", ".jpg", ".jpeg",
                 ".webp", ".bmp", ".gif", ".tif", ".tiff", *AUDIO_SUFFIXES, ".zip", ".gz")
HOW_TO_PROVIDE = (
    "Online, a Hub data set name downloads by itself. Offline, on a machine with network run "
    "`datasets.load_dataset(NAME).save_to_disk(\"my-data\")` and set data.dataset to that folder, or download it "
    "once there (`huggingface-cli download --repo-type dataset NAME`) and copy the Hugging Face cache here.")


@dataclass
class DatasetSplit:
    """One split of a data set (``dataset`` is a ``datasets.Dataset``), and how messages name it."""

    dataset: Any
    where: str  #: e.g. "owner/name[train]" or the local path
    base: Path | None  #: the folder relative file paths inside it resolve against (None: none)

    def frame(self) -> Any:
        """The split as a pandas DataFrame; ``ClassLabel`` columns hold their label names, not their ids, and so
        do list-of-``ClassLabel`` columns (e.g. a tag per word, or several labels per text): lists of names.
        An id outside the names becomes None (a task reports it as a missing label)."""
        import datasets
        import numpy as np

        df = self.dataset.to_pandas()

        def name(names: list[str], v: Any) -> str | None:
            return names[int(v)] if isinstance(v, (int, np.integer)) and 0 <= v < len(names) else None

        for column, feature in self.dataset.features.items():
            if isinstance(feature, datasets.ClassLabel):
                df[column] = [name(feature.names, v) for v in df[column]]
            elif _list_of_class_label(feature):
                names = feature.feature.names
                df[column] = [None if v is None else [name(names, x) for x in v] for v in df[column]]
        return df

    def class_names(self, column: str) -> list[str] | None:
        """The names of a ``ClassLabel`` column (or of a list-of-``ClassLabel`` column's items), in their order
        (None for any other column)."""
        import datasets

        feature = self.dataset.features.get(column)
        if _list_of_class_label(feature):
            feature = feature.feature
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def require_columns(self, columns: dict[str, str | None]) -> None:
        """``columns`` maps recipe key -> column name (None skipped); a missing one is a DataError naming both."""
        for key, column in columns.items():
            if column is not None and column not in self.dataset.column_names:
                close = difflib.get_close_matches(column, self.dataset.column_names, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(f"{key}: column {column!r} not found in {self.where}{hint}. Columns found: "
                                f"{self.dataset.column_names}. Set {key} to one of them.")


@dataclass
class DatasetSource:
    """``data.dataset`` opened: pick its splits with :meth:`split`."""

    resolved: str  #: the local path (absolute) or the Hub name
    loaded_from: str  #: where it was read (a folder, the Hub cache, a download, the datasets cache)
    splits: Any  #: a datasets.Dataset (single, no splits) or a mapping split name -> Dataset (None: empty)
    base: Path | None = None
    commit: str | None = None  #: the Hub commit, when it came from the Hub
    #: what a task adds to ``DataSplits.info`` (shown by validate, kept in run.json): the data set, where it
    #: was read from, its Hub commit
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def single(self) -> bool:
        import datasets

        return isinstance(self.splits, datasets.Dataset)

    @staticmethod
    def is_datasets_file(path: Path) -> bool:
        """A save_to_disk folder, or a .parquet / .arrow file: something to read with ``datasets`` (e.g. a
        predict input) rather than as a table or a folder of media files."""
        return (path.is_dir() and _is_saved_to_disk(path)) or path.suffix.lower() in (".arrow", ".parquet")

    def train_and_eval(self, data: Any) -> tuple[DatasetSplit, DatasetSplit | None]:
        """The splits the recipe names: ``data.dataset_split`` to train on, ``data.dataset_eval_split`` to
        evaluate on (None when unset: the task holds out ``data.split`` of the training split)."""
        if self.single and data.dataset_eval_split:
            raise RecipeError(f"data.dataset_eval_split: {self.resolved} is a single Dataset without splits; unset "
                              "data.dataset_eval_split to hold out data.split of it.")
        train = self.split(data.dataset_split, "data.dataset_split")
        if not data.dataset_eval_split:
            return train, None
        return train, self.split(data.dataset_eval_split, "data.dataset_eval_split")

    def test_split(self, data: Any) -> DatasetSplit | None:
        """``data.dataset_test_split`` (None when unset), the split scored once at the end."""
        if not data.dataset_test_split:
            return None
        if self.single:
            raise RecipeError(f"data.dataset_test_split: {self.resolved} is a single Dataset without splits; use "
                              "data.test_split to hold out a fraction of it instead.")
        return self.split(data.dataset_test_split, "data.dataset_test_split")

    def split(self, name: str | None, key: str = "data.dataset_split") -> DatasetSplit:
        """The split called ``name`` (a single data set has none: it is returned whatever ``name`` says)."""
        if self.single:
            return DatasetSplit(self.splits, self.resolved, self.base)
        if name not in self.splits:
            names = list(self.splits)
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{key}: split {name!r} not found in {self.resolved}{hint}. Splits found: {names}. "
                            f"Set {key} to one of them.")
        if self.splits[name] is None or len(self.splits[name]) == 0:
            raise DataError(f"{key}: {self.resolved}[{name}] is empty (0 rows); choose a split with examples.")
        return DatasetSplit(self.splits[name], f"{self.resolved}[{name}]", self.base)


def _list_of_class_label(feature: Any) -> bool:
    import datasets

    return isinstance(feature, (datasets.List, datasets.LargeList)) and \
        isinstance(feature.feature, datasets.ClassLabel)


def open_dataset(data: Any, recipe_dir: Path | None = None, announce: Callable[[str], None] | None = None,
                 location: str | Path | None = None) -> DatasetSource:
    """Open ``data.dataset`` (see the module's docstring): a Hub data set from the cache or, online, a
    download; or a local ``datasets`` source. ``recipe_dir`` is where relative paths start (in a task:
    ``self.recipe.source.parent``). A Hub data set's commit is pinned in ``data.dataset_revision`` and a
    local path is recorded absolute. ``announce`` hears about a download first (default: a line on
    stderr). ``location`` opens another source with the same keys (e.g. a predict input file). Errors
    name ``data.dataset`` and say how to fix or provide the data."""
    value = str(location) if location is not None else data.dataset
    if not value:
        raise RecipeError("data.dataset is not set.")
    announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    resolved, path = _resolve_location(value, recipe_dir)
    revision = getattr(data, "dataset_revision", None)
    with _quiet_datasets():
        try:
            if path is not None:
                source = DatasetSource(resolved, str(path), _load_local(path, data.dataset_config),
                                       base=path if path.is_dir() else path.parent)
            else:
                source = _load_hub(resolved, data.dataset_config, revision, announce)
        except (DataError, RecipeError):
            raise
        except ValueError as exc:
            empty = re.match(r'Instruction "(.+)" corresponds to no data', str(exc))
            if not empty:
                raise DataError(f"data.dataset: {resolved} does not load with datasets (ValueError: "
                                f"{str(exc)[:300]}).") from None
            raise DataError(f"data.dataset: {resolved}: split {empty.group(1)!r} is empty (0 rows) and datasets "
                            "cannot load an empty split; remove its files or give it examples.") from None
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a bad source
            raise DataError(f"data.dataset: {resolved} does not load with datasets ({type(exc).__name__}: "
                            f"{str(exc)[:300]}).") from None
    if location is None:
        if source.commit:
            data.dataset_revision = source.commit
        if path is not None:
            data.dataset = resolved  # recorded absolute in the run folder's recipe
    source.info = {"dataset": resolved, "dataset_loaded_from": None if path is not None else source.loaded_from,
                   "dataset_commit": source.commit, "dataset_config": data.dataset_config,
                   "dataset_split": None if source.single else data.dataset_split,
                   "dataset_eval_split": data.dataset_eval_split}
    return source


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or info logs from ``datasets`` while it reads local files, restored afterwards."""
    from datasets.utils import logging as dlog

    bars, verbosity = dlog.is_progress_bar_enabled(), dlog.get_verbosity()
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            dlog.enable_progress_bar()
        dlog.set_verbosity(verbosity)


def _resolve_location(value: str, recipe_dir: Path | None) -> tuple[str, Path | None]:
    """``(resolved, path)``: ``path`` is the local file/folder, or None for a Hub name."""
    expanded = Path(value).expanduser()
    explicit = expanded.is_absolute() or value in (".", "..", "~") or value.startswith(("./", "../", "~/"))
    base = recipe_dir or Path.cwd()
    candidate = expanded if expanded.is_absolute() else (base / expanded)
    if explicit or candidate.exists():
        if not candidate.exists():
            raise DataError(f"data.dataset: not found: {candidate.resolve()}. Give a folder written by "
                            "Dataset.save_to_disk, a .parquet/.arrow/.csv/.jsonl file or folder, or a Hub "
                            "data set name (owner/name).")
        resolved = candidate.resolve()
        return str(resolved), resolved
    if not _HUB_NAME.match(value):
        raise DataError(f"data.dataset: {value!r} is neither an existing path (looked for {candidate.resolve()}) "
                        "nor a Hub data set name (owner/name).")
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


def _load_hub(name: str, config: str | None, revision: str | None,
              announce: Callable[[str], None]) -> DatasetSource:
    """A Hub data set: its snapshot from the Hub cache, else (online) a download, else datasets' own cache."""
    import datasets
    import datasets.config

    # Unset revision or a commit: the caches answer without a request. A branch or tag may have moved:
    # online, ask the Hub (offline, the cache is the best there is).
    moving = revision is not None and not hub_access.is_commit(revision)
    in_cache = None if moving and not hub_access.offline() else hub_access.cached(name, revision, "dataset")
    if in_cache is None and revision is None:
        prepared = _prepared_cache(name, config)
        if prepared is not None:
            return prepared
    if in_cache is not None:
        where = f"the Hub cache ({in_cache[0]})"
    elif hub_access.offline():
        raise DataError(f"data.dataset: {name!r} is not an existing path, and as a Hub data set it is not in "
                        f"the local caches, and HF_HUB_OFFLINE is set so nothing is downloaded. "
                        f"{HOW_TO_PROVIDE.replace('NAME', repr(name))}")
    else:
        in_cache = _download(name, config, revision, announce)
        where = f"a download from {hub_access.hub_url()} (commit {in_cache[1]}, cached at {in_cache[0]})"
    folder, commit = in_cache
    patterns = _config_patterns(folder / "README.md", config)
    if patterns is None:
        dataset = datasets.load_dataset(str(folder), config, cache_dir=_local_files_cache())
        return DatasetSource(name, where, dataset, base=folder, commit=commit)
    files = _matching(folder, patterns)
    if not all(files.values()):  # a cached snapshot of another configuration
        if hub_access.offline():
            raise DataError(f"data.dataset_config: configuration {config!r} of {name} is not in the local caches "
                            f"(other configurations are), and HF_HUB_OFFLINE is set so nothing is downloaded. "
                            f"{HOW_TO_PROVIDE.replace('NAME', repr(name))}")
        folder, commit = _download(name, config, commit, announce)
        files = _matching(folder, patterns)
    dataset = datasets.load_dataset(_builder(files, name), data_files=files, cache_dir=_local_files_cache())
    return DatasetSource(name, where, dataset, base=folder, commit=commit)


def _config_patterns(readme: Path, config: str | None) -> dict[str, list[str]] | None:
    """``{split: [glob patterns]}`` of ``config`` from a data set README's YAML ``configs`` list (the Hub's
    way to name configurations); None when there is no config, README or such entry."""
    if config is None or not readme.is_file():
        return None
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    try:
        meta = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else None
    except yaml.YAMLError:
        return None
    entry = next((e for e in (meta or {}).get("configs") or []
                  if isinstance(e, dict) and e.get("config_name") == config), None)
    data_files = entry.get("data_files") if entry else None
    if not data_files:
        return None
    if isinstance(data_files, dict):
        data_files = [{"split": k, "path": v} for k, v in data_files.items()]
    if not isinstance(data_files, list):
        data_files = [data_files]
    out: dict[str, list[str]] = {}
    for item in data_files:
        split, paths = (item.get("split", "train"), item.get("path")) if isinstance(item, dict) else ("train", item)
        out.setdefault(split, []).extend(paths if isinstance(paths, list) else [paths])
    return out


def _matching(folder: Path, patterns: dict[str, list[str]]) -> dict[str, list[str]]:
    return {split: sorted({str(p) for pattern in globs for p in folder.glob(pattern) if p.is_file()})
            for split, globs in patterns.items()}


def _builder(files: dict[str, list[str]], name: str) -> str:
    """The ``datasets`` builder for a configuration's data files, from their extension."""
    suffixes = {Path(f).suffix.lower() for paths in files.values() for f in paths}
    builders = {_FILE_BUILDERS.get(s) or ("audiofolder" if s in AUDIO_SUFFIXES else "imagefolder") for s in suffixes}
    if len(builders) != 1:
        raise DataError(f"data.dataset_config: the configuration's files in {name} mix formats "
                        f"({sorted(suffixes)}); finetune reads one format per configuration.")
    return builders.pop()


def _prepared_cache(name: str, config: str | None) -> DatasetSource | None:
    """``datasets``' prepared cache (HF_DATASETS_CACHE), read offline."""
    import datasets
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        dataset = datasets.load_dataset(name, config)
    except Exception:  # noqa: BLE001 - not there (or not readable): the caller explains
        return None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
    return DatasetSource(name, f"the datasets cache ({datasets.config.HF_DATASETS_CACHE})", dataset)


def _download(name: str, config: str | None, revision: str | None,
              announce: Callable[[str], None]) -> tuple[Path, str]:
    try:
        commit, files = hub_access.repo_files(name, revision, "dataset")
    except Exception as exc:  # noqa: BLE001 - one message for every failure
        reason = hub_access.describe_hub_error(exc, "look up", name, nothing="Nothing was downloaded")
        key = "data.dataset_revision" if "RevisionNotFound" in type(exc).__name__ else "data.dataset"
        raise DataError(f"{key}: {reason} {HOW_TO_PROVIDE.replace('NAME', repr(name))}") from None
    chosen = {n: s for n, s in files.items() if n.lower().endswith(DATA_SUFFIXES) or n == "README.md"}
    chosen = _config_files(chosen, name, config, commit)
    if not any(n != "README.md" for n in chosen):
        raise DataError(f"data.dataset: {name} holds no data files finetune reads (parquet, arrow, csv, json, "
                        f"jsonl, images, audio); its files: {', '.join(list(files)[:8]) or 'none'}.")
    plan = hub_access.DownloadPlan(repo_id=name, repo_type="dataset", commit=commit, files=chosen, revision=revision)
    announce(f"downloading data set {plan.describe()}")
    try:
        return hub_access.download(plan), commit
    except Exception as exc:  # noqa: BLE001
        raise DataError(hub_access.describe(exc, name, "data.dataset")) from None


def _config_files(files: dict[str, int | None], name: str, config: str | None,
                  commit: str) -> dict[str, int | None]:
    """Only the files of ``config`` (and the README) when the README's YAML lists its data files."""
    if config is None or "README.md" not in files:
        return files
    from huggingface_hub import hf_hub_download

    try:
        readme = Path(hf_hub_download(name, "README.md", repo_type="dataset", revision=commit,
                                      endpoint=hub_access.endpoint()))
    except Exception:  # noqa: BLE001 - no usable README: download every data file
        return files
    patterns = _config_patterns(readme, config)
    if patterns is None:
        return files
    import fnmatch

    wanted = [p for globs in patterns.values() for p in globs]
    return {n: s for n, s in files.items() if n == "README.md" or any(fnmatch.fnmatch(n, p) for p in wanted)}
