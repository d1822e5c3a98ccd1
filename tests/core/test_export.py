"""``finetune export``: ONNX parity with PyTorch (text, image; dynamic batch and sequence), the tolerance
error, the refusal of a format a task cannot take, the safetensors folder loading with plain transformers and
timm.

One tiny run per task family is trained once per module and exported several times. The GGUF round trip is
in tests/plugins/generation/test_gguf_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_sentiment_rows, write_csv
from vision_fixtures import save_timm_folder, write_colour_images

from finetune.cli.main import cli
from finetune.engine.console import Console
from finetune.errors import DataError, ExportError, RecipeError
from finetune.run.export import export_run
from finetune.run.inference import load_run
from finetune.run.training import run_recipe

TRAIN = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no", "log_every_steps": 2,
         "checkpoint_every_steps": 0, "seed": 0, "eval_before_training": False}


def train_tiny(folder: Path, recipe: dict) -> Path:
    import tomli_w

    recipe = {**recipe, "train": TRAIN, "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return run_recipe(path, [], console=Console(enabled=False)).path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_bert) -> Path:
    folder = tmp_path_factory.mktemp("export-text")
    csv = write_csv(folder / "train.csv", make_sentiment_rows(48))
    return train_tiny(folder, {"task": {"name": "text-classification", "baseline": False},
                           "model": {"backbone": str(tiny_bert)},
                           "data": {"train": str(csv), "split": 0.25, "max_length": 16}, "peft": {"r": 4, "alpha": 8}})


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export-image")
    backbone = save_timm_folder(folder / "cnn", "test_efficientnet")
    images = write_colour_images(folder / "images", per_class=6)
    return train_tiny(folder, {"task": {"name": "image-classification"}, "model": {"backbone": str(backbone)},
                           "data": {"train": str(images), "split": 0.25, "image_size": 32},
                           "peft": {"r": 4, "alpha": 8, "dropout": 0.0}})


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_text_matches_pytorch_at_any_batch_and_length(text_run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "onnx"
    report = export_run(text_run, "onnx", out, say=lambda line: None)
    saved = json.loads((out / "export.json").read_text())
    assert saved["checks"]["max_abs_logit_diff"] == report["checks"]["max_abs_logit_diff"] <= 1e-3
    assert saved["checks"]["rows"] == 8 and saved["merged"] is True
    assert {"model.onnx", "tokenizer.json", "README.md"} <= set(saved["files"])
    assert "onnxruntime" in (out / "README.md").read_text()
    task, model, _, _ = load_run(text_run)  # the trained model, adapter attached (not merged)
    tokenizer = AutoTokenizer.from_pretrained(out)  # the preprocessing saved beside the graph
    session = _session(out / "model.onnx")
    for texts in (["good"], ["good day so", "the movie was very awful and sad", "evil"]):  # batch 1, then 3
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        got = session.run(None, {i.name: enc[i.name].numpy() for i in session.get_inputs()})[0]
        with torch.no_grad():
            want = model(**enc).logits.numpy()
        assert got.shape == (len(texts), len(task.state["labels"]))
        assert np.abs(got - want).max() < 1e-4


def test_onnx_image_matches_pytorch_at_batch_1_and_3(image_run, tmp_path):
    out = tmp_path / "onnx"
    report = export_run(image_run, "onnx", out, say=lambda line: None)
    assert report["checks"]["max_abs_logit_diff"] <= 1e-3
    assert (out / "finetune_preprocess.json").exists()
    _, model, _, _ = load_run(image_run)
    session = _session(out / "model.onnx")
    for n in (1, 3):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (n, 3) and np.abs(got - want).max() < 1e-4


def test_onnx_difference_above_the_tolerance_is_an_error(text_run, tmp_path, monkeypatch):
    import finetune.run.merge as merge

    real = merge.merged_model

    def perturbed(model, **kwargs):
        merged = real(model, **kwargs)
        with torch.no_grad():
            merged.classifier.bias += 0.01  # a merge gone wrong: every logit off by 0.01
        return merged

    monkeypatch.setattr(merge, "merged_model", perturbed)
    out = tmp_path / "onnx"
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to 0\.01.*tolerance 0\.001"):
        export_run(text_run, "onnx", out, say=lambda line: None)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing left that looks finished
    # a looser bound lets the same export through
    report = export_run(text_run, "onnx", out, tolerance=0.05, say=lambda line: None)
    assert 0.009 < report["checks"]["max_abs_logit_diff"] < 0.011


def test_a_format_the_task_cannot_take_is_refused_naming_what_it_can(text_run, image_run, tmp_path):
    with pytest.raises(RecipeError, match=r"task 'image-classification' cannot be exported as gguf \(it exports "
                                          r"to onnx, safetensors\); tasks that export gguf: .*causal-lm"):
        export_run(image_run, "gguf", tmp_path / "x")
    result = CliRunner().invoke(cli, ["export", str(text_run), "--format", "gguf", "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "Traceback" not in result.output  # EXIT_USER_ERROR
    assert "task 'text-classification' cannot be exported as gguf (it exports to onnx, safetensors); tasks that " \
        "export gguf: causal-lm" in result.output
    assert not (tmp_path / "y").exists()
    with pytest.raises(RecipeError, match="--quantize applies to --format gguf only"):
        export_run(text_run, "onnx", tmp_path / "z", quantize="q8_0")


def test_safetensors_folder_loads_with_plain_transformers_and_timm(text_run, image_run, tmp_path):
    import timm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "text"
    export_run(text_run, "safetensors", out, say=lambda line: None)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    _, model, _, _ = load_run(text_run)
    enc = tokenizer(["good great day", "awful sad movie", "the a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, model(**enc).logits, atol=1e-5)

    out = tmp_path / "image"
    report = export_run(image_run, "safetensors", out, say=lambda line: None)
    assert report["checks"]["timm_reload_max_abs_logit_diff"] < 1e-4
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    _, model, _, _ = load_run(image_run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)
    assert "timm.create_model('local-dir:.'" in (out / "README.md").read_text()


def test_export_cli_writes_the_default_folder(text_run):
    result = CliRunner().invoke(cli, ["export", str(text_run), "--format", "onnx", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "largest |logit difference| onnxruntime vs PyTorch" in result.output
    assert (text_run / "export" / "onnx" / "model.onnx").exists()


def test_onnx_check_runs_on_an_input_file_when_given(text_run, tmp_path):
    labelled = write_csv(tmp_path / "few.csv", make_sentiment_rows(3, seed=5))
    report = export_run(text_run, "onnx", tmp_path / "onnx", input_path=labelled, say=lambda line: None)
    assert report["check_rows"] == 3 and report["checks"]["rows"] == 3
    with pytest.raises(DataError, match="--input: .*missing.csv does not exist"):
        export_run(text_run, "onnx", tmp_path / "other", input_path=tmp_path / "missing.csv")


def test_a_quantized_base_checkpoint_is_refused_unless_allowed(text_run, tmp_path, monkeypatch):
    """A base whose own weights are quantized (a GPTQ / bitsandbytes checkpoint) is not merged into silently:
    the export says why and how to go on; allowed, the card and export.json say what the weights are."""
    import finetune.run.merge as merge
    from finetune.run.merge import quantized_base

    _, model, _, _ = load_run(text_run)
    assert quantized_base(model) is None
    model.get_base_model().config.quantization_config = {"quant_method": "gptq"}
    reason = quantized_base(model)
    assert "quantised (gptq)" in reason
    monkeypatch.setattr(merge, "quantized_base", lambda model: reason)
    out = tmp_path / "st"
    with pytest.raises(RecipeError, match=r"^export: the base model is quantised \(gptq\).*--allow-quantized-base"):
        export_run(text_run, "safetensors", out, say=lambda line: None)
    assert not out.exists()
    report = export_run(text_run, "safetensors", out, allow_quantized_base=True, say=lambda line: None)
    assert report["quantized_base"] == reason and "quantised (gptq)" in (out / "README.md").read_text()
