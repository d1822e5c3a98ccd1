"""Audio input: folders of clips and manifests, decoding with soundfile, resampling, validation.

Decoding uses ``soundfile`` (its wheel bundles libsndfile: wav/flac/ogg, 8/16/24/32-bit PCM and
float, no system FFmpeg); resampling uses ``scipy.signal.resample_poly``. Every problem is
reported as a :class:`finetune.DataError` naming the recipe key and the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import DataError, DataOptions, PathStr, load_table, require_columns

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif")


class AudioData(DataOptions):
    """``[data]`` options shared by the speech tasks."""

    train: PathStr | None = Field(None, description="A folder of clips in class subfolders (audio-classification), "
                                  "or a manifest (.csv/.tsv/.jsonl/.parquet) with a path column and a label or text "
                                  "column; manifest paths are relative to the manifest's folder. Or give `dataset`.")
    eval: PathStr | None = Field(None, description="Evaluation clips, in the same form as `train`; if absent, "
                                 "`split` of train is held out.")
    path_column: str = Field("path", description="Manifest (or `dataset`) column holding the audio: file paths, or "
                             "with `dataset` a datasets Audio feature or encoded audio bytes.")
    max_seconds: float = Field(30.0, gt=0, le=3600,
                               description="Clips longer than this are truncated or skipped (see long_clips).")
    long_clips: str = Field("truncate", pattern="^(truncate|skip|error)$",
                            description="What to do with clips longer than max_seconds: 'truncate', "
                                        "'skip' (reported by validate) or 'error'.")
    min_seconds: float = Field(0.02, ge=0, description="Shorter clips (e.g. zero-length files) are errors.")


@dataclass
class Clip:
    path: str
    target: str  #: label (classification) or transcript (recognition)
    group: str | None
    seconds: float
    rate: int
    channels: int
    subtype: str


def _resolve_path(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def scan_folder(root: Path, key: str) -> list[tuple[Path, str, str | None]]:
    """``(path, label, None)`` for every audio file in the class subfolders of ``root``."""
    items = []
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{key}: folder {root} has no class subfolders; put each class's clips in "
                        f"{root}/<label>/ (or give a CSV/JSONL manifest with path,label columns).")
    for d in classes:
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        items += [(f, d.name, None) for f in files]
    others = [f for f in root.rglob("*") if f.is_file() and f.suffix.lower() not in AUDIO_SUFFIXES
              and f.parent != root and not f.name.startswith(".")]
    if others:
        raise DataError(f"{key}: {len(others)} file(s) in {root} are not audio ({', '.join(AUDIO_SUFFIXES)}), e.g. "
                        f"{others[0]}; only wav/flac/ogg are decoded without FFmpeg (convert them, e.g. "
                        "`sox in.mp3 out.flac`) or move them out.")
    return items


def read_manifest(path: Path, data: Any, target_column: str, target_key: str,
                  key: str) -> list[tuple[Path, str, str | None]]:
    df = load_table(path, data.format, key=key)
    require_columns(df, {"data.path_column": data.path_column, target_key: target_column,
                         "data.group_column": data.group_column}, path)
    items = []
    for i, row in enumerate(df.to_dict(orient="records")):
        value, target = row[data.path_column], row[target_column]
        line = i + 2 if path.suffix.lower() in (".csv", ".tsv") else i + 1
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
            raise DataError(f"{key}: {path} line {line}: empty {data.path_column!r}; fill or remove the row.")
        if target is None or (isinstance(target, float) and math.isnan(target)):
            target = ""
        if isinstance(target, float) and target.is_integer():
            target = int(target)
        group = str(row[data.group_column]) if data.group_column else None
        items.append((_resolve_path(value, path.parent), str(target), group))
    return items


def inspect_clips(items: list[tuple[Path, str, str | None]], data: Any, key: str) -> tuple[list[Clip], dict]:
    """Read every file's header: durations, rates, channels; unreadable files and empty ones are errors
    (all of them named at once); long clips are kept (truncated later) or skipped per ``data.long_clips``."""
    import soundfile as sf

    clips, missing, corrupt, empty, skipped = [], [], [], [], []
    for path, target, group in items:
        if not path.exists():
            missing.append(str(path))
            continue
        try:
            info = sf.info(str(path))
        except Exception as exc:  # noqa: BLE001 - soundfile raises RuntimeError/LibsndfileError
            corrupt.append(f"{path} ({str(exc).splitlines()[0][:120]})")
            continue
        seconds = info.frames / info.samplerate if info.samplerate else 0.0
        if info.frames <= 0 or seconds < data.min_seconds:
            empty.append(f"{path} ({seconds:.3f} s)")
            continue
        if seconds > data.max_seconds:
            if data.long_clips == "skip":
                skipped.append(str(path))
                continue
            if data.long_clips == "error":
                raise DataError(f"{key}: {path} is {seconds:.1f} s long, over data.max_seconds = "
                                f"{data.max_seconds}; raise it, or set data.long_clips = \"truncate\" or \"skip\".")
        clips.append(Clip(str(path), target, group, seconds, int(info.samplerate), int(info.channels),
                          str(info.subtype)))
    if missing:
        raise DataError(f"{key}: {len(missing)} audio file(s) not found: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; fix the paths (relative to the manifest).")
    if corrupt:
        raise DataError(f"{key}: {len(corrupt)} audio file(s) are corrupt or not in a format soundfile reads "
                        f"(wav/flac/ogg): {'; '.join(corrupt[:5])}{' ...' if len(corrupt) > 5 else ''}. "
                        "Re-encode or remove them.")
    if empty:
        raise DataError(f"{key}: {len(empty)} clip(s) are empty or shorter than data.min_seconds = "
                        f"{data.min_seconds}: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}; remove them.")
    if not clips:
        raise DataError(f"{key}: no usable audio clips" + (f" ({len(skipped)} skipped as longer than "
                                                          f"data.max_seconds)" if skipped else "") + ".")
    durations = sorted(c.seconds for c in clips)
    stats = {"clips": len(clips), "seconds_total": round(sum(durations), 1),
             "seconds_min": round(durations[0], 3), "seconds_median": round(durations[len(durations) // 2], 3),
             "seconds_max": round(durations[-1], 3),
             "sample_rates": sorted({c.rate for c in clips}), "channels": sorted({c.channels for c in clips}),
             "formats": sorted({c.subtype for c in clips}),
             "longer_than_max": sum(c.seconds > data.max_seconds for c in clips),
             "skipped_long": len(skipped)}
    if skipped:
        stats["skipped_files"] = skipped[:10]
    return clips, stats


def decode(path: str, rate: int, max_seconds: float) -> Any:
    """Float32 mono waveform at ``rate`` Hz, at most ``max_seconds`` long."""
    import numpy as np
    import soundfile as sf

    try:
        with sf.SoundFile(path) as fh:
            src_rate = fh.samplerate
            frames = min(fh.frames, int(math.ceil(max_seconds * src_rate))) if fh.frames > 0 else -1
            audio = fh.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot decode audio ({type(exc).__name__}: {str(exc)[:200]}); re-encode "
                        "it as 16-bit wav/flac or remove it.") from None
    if audio.size == 0:
        raise DataError(f"{path}: the file holds no audio samples; remove it.")
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(audio).all():
        raise DataError(f"{path}: audio contains NaN or infinite samples; re-encode it.")
    if src_rate != rate:
        audio = resample(audio, src_rate, rate)
    return np.ascontiguousarray(audio[: int(max_seconds * rate)], dtype=np.float32)


def resample(audio: Any, src: int, dst: int) -> Any:
    from scipy.signal import resample_poly

    g = math.gcd(int(src), int(dst))
    return resample_poly(audio, dst // g, src // g).astype("float32")


def list_input_clips(path: Path) -> list[Path]:
    """Audio files of ``finetune predict --input``: one file, or a folder (searched recursively)."""
    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise DataError(f"--input: folder {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)}).")
        return files
    return []
