"""``finetune export --format onnx`` of an audio-classification run (tiny Whisper, clip-length input): the graph
takes any batch size and any clip length (frames) and gives the trained model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speech_fixtures import make_tiny_whisper, tone, write_recipe, write_tone_folder

from finetune.engine.console import Console
from finetune.run.export import export_run
from finetune.run.inference import load_run
from finetune.run.training import run_recipe


@pytest.fixture(scope="module")
def whisper_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-audio")
    recipe = write_recipe(folder / "recipe.toml", task={"name": "audio-classification"},
                          model={"backbone": str(make_tiny_whisper(folder / "whisper"))},
                          data={"train": str(write_tone_folder(folder / "tones", per_class=6)), "split": 0.25},
                          train={"epochs": 1, "eval_before_training": False}, output={"dir": str(folder / "run")})
    return run_recipe(recipe, [], console=Console(enabled=False)).path


def test_onnx_audio_matches_pytorch_at_any_batch_and_clip_length(whisper_run, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "onnx"
    report = export_run(whisper_run, "onnx", out, say=lambda line: None)
    assert report["checks"]["max_abs_logit_diff"] <= 1e-3
    assert report["onnx"]["inputs"]["input_features"]["dynamic_axes"] == {0: "batch", 2: "frames"}
    assert (out / "preprocessor_config.json").exists() and "onnxruntime" in (out / "README.md").read_text()
    task, model, processor, _ = load_run(whisper_run)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for seconds in ((0.4,), (1.3, 0.6, 0.8)):  # batch 1, then 3 clips longer than any in the eval rows
        batch = task.features(processor, [tone(500.0, s, seed=3) for s in seconds])
        got = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
        with torch.no_grad():
            want = model(**batch).logits.numpy()
        assert got.shape == (len(seconds), 2) and np.abs(got - want).max() < 1e-4
