"""What both speech tasks share: reading clips, splitting, decoding, per-batch features, prediction input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, DataSplits, Task, TaskOptions, cache_root, open_dataset, split_frame
from finetune_speech.audio import Clip, decode, inspect_clips, list_input_clips, read_manifest, scan_folder

WHISPER_MAX_SECONDS = 30.0
Item = tuple[Path, str, str | None]  #: (audio file, target, group)


class SpeechOptions(TaskOptions):
    whisper_input: Literal["clip", "30s"] = Field(
        "clip", description="Whisper backbones: 'clip' truncates log-mel features to the batch's longest clip "
                            "and slices the positional embeddings (cost scales with clip length); '30s' pads "
                            "every clip to 30 s as in Whisper's pre-training.")


def model_type(path: str) -> str:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return ""


class WaveDataset:
    """Decoded waveforms (float32 mono at the model's rate) and targets; features are made per batch."""

    def __init__(self, waves: list[Any], targets: list[Any], paths: list[str]) -> None:
        self.waves, self.targets, self.paths = waves, targets, paths

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"audio": self.waves[i], "target": self.targets[i]}


class SpeechTask(Task):
    """Base of the speech tasks; subclasses set ``target_column_key`` and validate targets."""

    target_key = "data.label_column"

    def target_column(self) -> str:
        raise NotImplementedError

    def _items(self, path: str, key: str) -> list[tuple[Path, str, str | None]]:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{key}: {p} not found.")
        if p.is_dir():
            if self.target_key != "data.label_column":
                raise DataError(f"{key}: {p} is a folder; speech-recognition needs a manifest (.csv/.jsonl) "
                                f"with {self.recipe.data.path_column!r} and {self.target_column()!r} columns.")
            if self.recipe.data.group_column:
                raise DataError("data.group_column needs a manifest (a folder of class subfolders has no "
                                "group column); use a CSV/JSONL manifest with path,label,group columns.")
            return scan_folder(p, key)
        return read_manifest(p, self.recipe.data, self.target_column(), self.target_key, key)

    def _frame(self, clips: list[Clip]):
        import pandas as pd

        return pd.DataFrame({"path": [c.path for c in clips], "target": [c.target for c in clips],
                             "group": [c.group for c in clips], "seconds": [c.seconds for c in clips]})

    def check_targets(self, df: Any, key: str) -> None:
        """Raise DataError for unusable labels/transcripts (subclasses)."""

    def _dataset_items(self) -> tuple[list[Item], list[Item] | None, list[Item] | None, dict[str, Any]]:
        """Train, eval (None: hold out) and test (None: none) items from data.dataset, and where they came
        from: its audio column (a datasets Audio feature, encoded bytes, or file paths) and target column;
        embedded audio is written once to finetune's cache as files, so the rest of the plugin reads clips
        from paths as usual."""
        data = self.recipe.data
        source = open_dataset(data, self.recipe.source.parent if self.recipe.source else None)
        out = []
        parts = (*source.train_and_eval(data), source.test_split(data))
        for part, key in zip(parts, ("data.dataset_split", "data.dataset_eval_split", "data.dataset_test_split")):
            if part is None:
                out.append(None)
                continue
            part.require_columns({"data.path_column": data.path_column, self.target_key: self.target_column(),
                                  "data.group_column": data.group_column})
            targets = part.frame()[self.target_column()].tolist()
            groups = part.dataset[data.group_column] if data.group_column else [None] * len(targets)
            paths = audio_files(part, data.path_column, key)
            out.append([(path, "" if t is None else str(t), None if g is None else str(g))
                        for path, t, g in zip(paths, targets, groups)])
        return out[0], out[1], out[2], source.info

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled clips (data.test, ``finetune evaluate --input``): a manifest (or, for classification, a
        folder of class subfolders) as ``data.train`` takes; targets checked as in training."""
        clips, _ = inspect_clips(self._items(str(path), key), self.recipe.data, key)
        df = self._frame(clips)
        self.check_targets(df, key)
        self.check_known_targets(df, key)
        return df

    def check_known_targets(self, df: Any, key: str) -> None:
        """Raise DataError for targets the trained model cannot know (e.g. unseen labels; subclasses)."""

    def read_splits(self, stratify: bool) -> DataSplits:
        data = self.recipe.data
        from_dataset = self._dataset_items() if data.dataset else None
        items = from_dataset[0] if from_dataset else self._items(data.train, "data.train")
        test = None
        clips, stats = inspect_clips(items, data, "data.dataset_split" if data.dataset else "data.train")
        train = self._frame(clips)
        self.check_targets(train, "data.train")
        if from_dataset and from_dataset[2] is not None:
            test_clips, _ = inspect_clips(from_dataset[2], data, "data.dataset_test_split")
            test = self._frame(test_clips)
            self.check_targets(test, "data.dataset_test_split")
        elif data.test_split:  # held out first, so the test clips never depend on the eval settings
            train, test = split_frame(train, data.test_split, self.recipe.train.seed,
                                      stratify="target" if stratify else None,
                                      group="group" if data.group_column else None, key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=self.recipe.train.seed) \
                .reset_index(drop=True)
        info: dict[str, Any] = {"train_audio": stats, **(from_dataset[3] if from_dataset else {})}
        if from_dataset and from_dataset[1] is not None:
            eval_clips, eval_stats = inspect_clips(from_dataset[1], data, "data.dataset_eval_split")
            eval_ = self._frame(eval_clips)
            self.check_targets(eval_, "data.dataset_eval_split")
            info["eval_audio"] = eval_stats
        elif data.eval:
            eval_clips, eval_stats = inspect_clips(self._items(data.eval, "data.eval"), data, "data.eval")
            eval_ = self._frame(eval_clips)
            self.check_targets(eval_, "data.eval")
            info["eval_audio"] = eval_stats
        else:
            train, eval_ = split_frame(train, data.split, self.recipe.train.seed,
                                       stratify="target" if stratify else None,
                                       group="group" if data.group_column else None)
            if len(train) == 0 or len(eval_) == 0:
                raise DataError(f"data.split: holding out {data.split} of {len(train) + len(eval_)} clips leaves "
                                "an empty side; add clips or give data.eval.")
        info.update({"train_examples": len(train), "eval_examples": len(eval_)})
        if test is not None:
            info["test_examples"] = len(test)
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    # -- decoding and features -------------------------------------------------
    def max_seconds(self) -> float:
        limit = self.recipe.data.max_seconds
        if self.state.get("backbone_type") == "whisper":
            limit = min(limit, WHISPER_MAX_SECONDS)
        return limit

    def decode_all(self, paths: list[str], rate: int) -> list[Any]:
        return [decode(p, rate, self.max_seconds()) for p in paths]

    def features(self, processor: Any, waves: list[Any], whisper_input: str | None = None) -> dict[str, Any]:
        """Model inputs for a batch of waveforms, computed per batch (bounded memory). ``whisper_input``
        overrides ``task.whisper_input`` ('clip' or '30s')."""
        fe = getattr(processor, "feature_extractor", processor)
        rate = fe.sampling_rate
        if self.state.get("backbone_type") == "whisper":
            clip = (whisper_input or self.recipe.task.whisper_input) == "clip"
            out = fe(waves, sampling_rate=rate, return_tensors="pt", return_attention_mask=True,
                     padding="longest" if clip else "max_length")
            feats, mask = out["input_features"], out["attention_mask"]
            if clip and feats.shape[-1] % 2:  # conv2 has stride 2: keep the frame count even
                import torch

                feats = torch.nn.functional.pad(feats, (0, 1), value=float(feats.min()))
                mask = torch.nn.functional.pad(mask, (0, 1))
            return {"input_features": feats, "attention_mask": mask}
        out = fe(waves, sampling_rate=rate, return_tensors="pt", padding=True, return_attention_mask=True)
        result = {"input_values": out["input_values"]}
        if "attention_mask" in out:
            result["attention_mask"] = out["attention_mask"]
        return result

    def sampling_rate(self, processor: Any) -> int:
        return int(getattr(processor, "feature_extractor", processor).sampling_rate)

    # -- prediction input -------------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.path_column]

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        files = list_input_clips(path)
        if files:
            return [{self.recipe.data.path_column: str(f)} for f in files]
        records = super().read_predict_input(path)  # a manifest: paths relative to it
        col = self.recipe.data.path_column
        for r in records:
            p = Path(str(r[col])).expanduser()
            r[col] = str(p if p.is_absolute() else path.parent / p)
        return records

    def predict_waves(self, records: list[dict[str, Any]], rate: int) -> list[Any]:
        col = self.recipe.data.path_column
        missing = [str(r[col]) for r in records if not Path(str(r[col])).is_file()]
        if missing:
            raise DataError(f"predict: {len(missing)} audio file(s) not found: {', '.join(missing[:5])}.")
        return self.decode_all([str(r[col]) for r in records], rate)


def audio_files(part: Any, column: str, key: str) -> list[Path]:
    """A file path for every row's audio: the path a datasets Audio feature or string column names (relative
    to the data set's folder), or the embedded bytes written once to finetune's cache (named by content)."""
    import hashlib

    import datasets

    feature = part.dataset.features[column]
    ds = part.dataset.cast_column(column, datasets.Audio(decode=False)) if isinstance(feature, datasets.Audio) \
        else part.dataset
    folder = cache_root() / "hf-audio"
    paths = []
    for i, cell in enumerate(ds[column]):
        data, name = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (
            (cell, None) if isinstance(cell, bytes) else (None, cell))
        if data:
            digest = hashlib.sha1(data).hexdigest()
            suffix = Path(name).suffix if name and Path(name).suffix else ".wav"
            target = folder / f"{digest}{suffix}"
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
            paths.append(target)
        elif name:
            path = Path(str(name)).expanduser()
            paths.append(path if path.is_absolute() or part.base is None else part.base / path)
        else:
            raise DataError(f"{key}: {part.where}: row {i + 1} has no audio in column {column!r}; filter it out or "
                            "choose another split.")
    return paths
