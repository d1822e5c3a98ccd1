"""ViT-style backbones at a non-native input size (data.image_size != the pretrained size): timm ViTs are
built at that size with position embeddings resampled from the pretrained ones; transformers ViTs run with
interpolate_pos_encoding=True. Training, evaluation, predict and the reloaded adapter all agree exactly."""

from __future__ import annotations

import json

import pytest
import torch
from vision_fixtures import *  # noqa: F403 - the vision fixtures

from finetune.engine.console import Console
from finetune.run.inference import load_run
from finetune.run.session import build_model, open_session
from finetune.run.training import run_recipe

SIZE = 48  # the timm ViT fixture is pretrained at 224 px (patch 16), the HF one at 32 px (patch 8)
TIMM_ARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _eval_batch(task, processor, splits):
    ds = task.build_dataset(splits.eval, processor, training=False)
    return task.collate_fn(processor)([ds[i] for i in range(len(ds))])


def _plain_timm(arch: str, folder, num_classes: int, img_size: int):
    """timm + safetensors only: the same model as the plugin builds (pos_embed resampled by timm)."""
    import timm
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(arch, num_classes=num_classes, img_size=img_size, **TIMM_ARGS)
    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("head.")}
    model.load_state_dict(checkpoint_filter_fn(weights, model), strict=False)
    return model


@pytest.mark.parametrize("backend", ["timm", "transformers"])
def test_vit_at_a_non_native_size_trains_predicts_and_reloads_exactly(backend, vision_recipe, tiny_timm_vit_strict,
                                                                      tiny_hf_vit, tmp_path):
    from peft import PeftModel

    backbone = tiny_timm_vit_strict if backend == "timm" else tiny_hf_vit
    recipe = vision_recipe(backbone=backbone, data=f"image_size = {SIZE}", train="epochs = 1",
                           output=str(tmp_path / backend))
    run = run_recipe(recipe, [], console=Console(quiet=True))
    best = json.loads(run.metrics_file.read_text())["best"]
    state = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]
    assert state["preprocess"]["input_size"] == SIZE
    assert state["preprocess"]["pretrained_input_size"] == (224 if backend == "timm" else 32)
    session = open_session(recipe)
    task, ours, processor, _ = load_run(run.path)
    batch = _eval_batch(task, processor, session.splits)
    assert tuple(batch["pixel_values"].shape[-2:]) == (SIZE, SIZE)
    if backend == "timm":
        assert state["model_kwargs"] == {"img_size": SIZE}
        with torch.no_grad():
            logits = ours(batch["pixel_values"])
        base = _plain_timm("vit_tiny_patch16_224", tiny_timm_vit_strict, 3, SIZE)
        assert base.pos_embed.shape[1] == 1 + (SIZE // 16) ** 2
        # the position embeddings are the pretrained ones resampled, not a fresh initialisation
        from safetensors.torch import load_file
        from timm.layers import resample_abs_pos_embed

        pretrained = load_file(str(tiny_timm_vit_strict / "model.safetensors"))["pos_embed"]
        expected = resample_abs_pos_embed(pretrained, (SIZE // 16, SIZE // 16), num_prefix_tokens=1)
        assert torch.equal(ours.get_base_model().pos_embed, expected)
        plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
        with torch.no_grad():
            assert torch.equal(plain(batch["pixel_values"]), logits)
    else:
        from transformers import AutoModelForImageClassification

        assert state["forward_kwargs"] == {"interpolate_pos_encoding": True}
        with torch.no_grad():
            logits = ours(batch["pixel_values"], interpolate_pos_encoding=True).logits
        base = AutoModelForImageClassification.from_pretrained(str(tiny_hf_vit), num_labels=3,
                                                               ignore_mismatched_sizes=True)
        plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
        with torch.no_grad():
            assert torch.equal(plain(pixel_values=batch["pixel_values"], interpolate_pos_encoding=True).logits,
                               logits)
    accuracy = int((logits.argmax(-1) == batch["labels"]).sum()) / len(batch["labels"])
    assert accuracy == pytest.approx(best["accuracy"], abs=1e-9)  # the reloaded adapter = the evaluated model
    # predict (a path the core does not exercise in training) runs at the same size with the same outputs
    records = [{"image": p} for p in session.splits.eval["image"]]
    rows = task.predict(ours, processor, records)
    probs = torch.softmax(logits.float(), dim=-1)
    assert [r["pred_label"] for r in rows] == [task.state["labels"][i] for i in probs.argmax(-1).tolist()]
    assert [r["pred_score"] for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)
    # the model card's usage snippet builds / runs the model the same way
    card = run.card_file.read_text()
    assert (f"img_size={SIZE}" if backend == "timm" else "interpolate_pos_encoding=True") in card


def test_native_size_adds_nothing_and_cnns_ignore_img_size(vision_recipe, tiny_hf_vit, tiny_timm_cnn):
    session = open_session(vision_recipe(backbone=tiny_hf_vit, name="native.toml"))  # image_size = 32: native
    build_model(session)
    assert session.task.state["forward_kwargs"] == {}
    session = open_session(vision_recipe(backbone=tiny_timm_cnn, data="image_size = 40", name="cnn.toml"))
    model, processor, _ = build_model(session)
    assert session.task.state["model_kwargs"] == {} and processor.preprocess["input_size"] == 40
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 40)).shape == (1, 3)


def test_vit_lora_auto_targets_attention_and_mlp_linears_only(vision_recipe, tiny_timm_vit_strict):
    session = open_session(vision_recipe(backbone=tiny_timm_vit_strict, data=f"image_size = {SIZE}", name="t.toml"))
    model, _, report = build_model(session)
    import torch.nn as nn

    base = model.get_base_model()
    wrapped = {t: dict(base.named_modules())[t].base_layer for t in report.target_modules}
    assert wrapped and all(isinstance(m, nn.Linear) for m in wrapped.values())
    assert not any(t.startswith(("patch_embed", "head")) for t in report.target_modules)
    assert {t.rsplit(".", 1)[-1] for t in report.target_modules} == {"qkv", "proj", "fc1", "fc2"}
    assert not base.pos_embed.requires_grad  # frozen with LoRA: rebuilt identically from the base weights
