"""`finetune init` on audio: class folders, manifests with labels or transcripts (the speech plugin)."""

from __future__ import annotations

from conftest import write_csv
from init_fixtures import init_and_read
from speech_fixtures import write_tone_folder


def test_audio_class_folders(tmp_path):
    write_tone_folder(tmp_path / "tones", per_class=2)
    recipe, said = init_and_read(tmp_path / "tones", tmp_path / "r.toml")
    assert recipe["task"]["name"] == "audio-classification" and recipe["data"]["train"] == "tones"
    assert recipe["model"]["backbone"] == "openai/whisper-tiny.en"
    assert any("2 sub-folders of audio clips (4 clips)" in s for s in said)


def test_manifests_labels_and_transcripts(tmp_path):
    write_tone_folder(tmp_path / "clips", per_class=4)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "clips").rglob("*.*"))
    labelled = write_csv(tmp_path / "labels.csv", [{"path": f, "label": f.split("/")[1], "speaker": f"s{i % 3}"}
                                                   for i, f in enumerate(files)])
    recipe, _ = init_and_read(labelled, tmp_path / "a.toml")
    assert recipe["task"]["name"] == "audio-classification" and recipe["data"]["group_column"] == "speaker"
    said = [{"path": f, "text": f"please turn the lights number {i} on now", "speaker": f"s{i % 3}"}
            for i, f in enumerate(files)]
    recipe, _ = init_and_read(write_csv(tmp_path / "asr.csv", said), tmp_path / "b.toml")
    assert recipe["task"]["name"] == "speech-recognition" and recipe["data"]["text_column"] == "text"
    assert recipe["data"]["path_column"] == "path" and recipe["data"]["group_column"] == "speaker"
