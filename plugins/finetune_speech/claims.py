"""``finetune init`` for the speech tasks (the ``finetune_claim_data`` hook): audio class folders and
manifests of audio files with labels or transcripts. Looks only at the probe."""

from __future__ import annotations

import re
from typing import Any

from finetune import Claim, ColumnStats, DataProbe
from finetune_speech.audio import AUDIO_SUFFIXES

BACKBONE = "openai/whisper-tiny.en"
_BACKBONE_NOTE = "offline Whisper tiny.en (English); any Whisper or wav2vec2-style encoder works online"
_AUDIO = frozenset(AUDIO_SUFFIXES) | {".mp3", ".m4a", ".opus"}
_LABEL_NAMES = ("label", "labels", "class", "category", "command", "word", "intent", "emotion", "speaker_label")
_TEXT_NAMES = ("text", "transcript", "transcription", "sentence", "normalized_text", "utterance")
_ID_NAME = re.compile(r"(^|[_\s-])(id|ids|uuid|index|idx)$", re.IGNORECASE)
#: Who or where a clip comes from: a group for the split, not a label (unless no other column can be).
_SOURCE_NAME = re.compile(r"(^|_)(speaker|user|client|session|voice|person|subject|recording|source)s?(_|$)",
                          re.IGNORECASE)


def _settings(train: Any, epochs: int) -> dict[str, dict[str, Any]]:
    return {"task": {"whisper_input": "clip"},
            "model": {"backbone": BACKBONE},
            "data": {"train": train},
            "peft": {"r": 8, "alpha": 16},
            "train": {"epochs": epochs, "batch_size": 16, "learning_rate": 1e-3, "mixed_precision": "no"}}


def _comments(**extra: str) -> dict[str, str]:
    return {"model.backbone": _BACKBONE_NOTE,
            "task.whisper_input": "encoder cost scales with the clip, not 30 s",
            "train.mixed_precision": "fp32, as the speech quickstarts measured", **extra}


def _audio_column(probe: DataProbe) -> ColumnStats | None:
    table = probe.table
    if table is None:
        return None
    for col in table.columns.values():
        if col.kind == "path" and sum(n for e, n in col.extensions.items() if e in _AUDIO) >= 0.9 * col.count \
                and probe.existing_share(col.name) > 0:
            return col
    return None


def _manifest_claims(probe: DataProbe, manifest: DataProbe, where: str) -> list[Claim]:
    audio = _audio_column(manifest)
    if audio is None:
        return []
    table = manifest.table
    cols = [c for c in table.columns.values() if c is not audio and not _ID_NAME.search(c.name)]
    labels = [c for c in cols if c.kind == "category" and c.name.lower() not in _TEXT_NAMES
              and (not _SOURCE_NAME.search(c.name) or c.name.lower() in _LABEL_NAMES)]
    named = [c for c in labels if c.name.lower() in _LABEL_NAMES]
    label = named[0] if named else labels[0] if len(labels) == 1 else None
    texts = [c for c in cols if c.name.lower() in _TEXT_NAMES or c.kind == "text"]
    texts = [c for c in texts if c.kind in ("text", "category")]
    text = sorted(texts, key=lambda c: (c.name.lower() not in _TEXT_NAMES, -c.mean_words))[0] if texts else None
    base = [f"{where}: column `{audio.name}` holds audio files: {audio.describe()}"]
    out = []
    for col, task in ((label, "audio-classification"), (text, "speech-recognition")):
        if col is None:
            continue
        settings = _settings(manifest.path, epochs=3 if task == "audio-classification" else 2)
        key = "label_column" if task == "audio-classification" else "text_column"
        settings["data"].update(path_column=audio.name, **{key: col.name})
        comments = _comments(**{"data.path_column": "audio files, relative to the manifest",
                                f"data.{key}": col.describe()})
        reasons = list(base)
        if task == "audio-classification":
            reasons.append(f"column `{col.name}` looks like the label: {col.describe()}")
            score = 0.85
        else:
            sentences = col.kind == "text" and col.mean_words >= 2
            reasons.append(f"column `{col.name}` looks like transcripts: {col.describe()}")
            score = 0.85 if sentences else 0.55
            if not sentences:
                reasons.append("they are single words with few distinct values: labels more than transcripts")
        settings["data"]["split"] = 0.2
        comments["data.split"] = "held out to select the best checkpoint"
        group = manifest.group_column(exclude=[audio.name, col.name] + ([label.name] if label else [])
                                      + ([text.name] if text else []))
        if group:
            settings["data"]["group_column"] = group[0]
            comments["data.group_column"] = "clips sharing it (e.g. one speaker's) stay on one side of the split"
            reasons.append(group[1])
        out.append(Claim(task=task, score=score, reasons=reasons, settings=settings, comments=comments))
    return out


def claim_data(probe: DataProbe) -> list[Claim]:
    """The speech plugin's claims on ``probe``."""
    if probe.is_file:
        return _manifest_claims(probe, probe, probe.path.name)
    if not probe.is_dir:
        return []
    root = probe.tree.get("")
    if root is None:
        return []
    for name in root.names:
        if name.rsplit(".", 1)[-1].lower() in ("csv", "tsv", "jsonl", "parquet"):
            claims = _manifest_claims(probe, probe.child(name), f"manifest {name}")
            if claims:
                return claims
    classes = {sub: probe.files_under(sub, _AUDIO) for sub in root.subfolders}
    classes = {k: v for k, v in classes.items() if v}
    if len(classes) < 2:
        return []
    settings = _settings(probe.path, epochs=3)
    settings["data"]["split"] = 0.2
    notes = ["speech-recognition needs transcripts: a manifest with path and text columns"]
    names = [n for sub in classes for n in probe.tree[sub].names]
    repeated = len(names) - len(set(names))
    if repeated:
        notes.append(f"{repeated} file names recur across the class folders (one speaker or source per name?): "
                     "the split is random by class, so the same source can be on both sides; for a held-out-source "
                     "score write a manifest (path, label, speaker) and set data.group_column")
    reasons = [f"{len(classes)} sub-folders of audio clips ({sum(classes.values()):,} clips): one class per folder, "
               "e.g. " + ", ".join(f"{k} ({v})" for k, v in list(classes.items())[:4])]
    return [Claim(task="audio-classification", score=0.85, reasons=reasons, settings=settings,
                  comments=_comments(**{"data.train": "one sub-folder per class",
                                        "data.split": "held out (by class) to select the best checkpoint"}),
                  notes=notes)]
