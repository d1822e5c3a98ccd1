"""Fixtures of the vision tests: tiny random timm / transformers backbones and tiny colour-class images."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_colour_images(folder: Path, per_class: int = 16, seed: int = 0, size: int = 24,
                        classes: dict[str, tuple[int, int, int]] | None = None) -> Path:
    """``folder/<colour>/img_i.png``: noisy images whose dominant colour is the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in (classes or COLOURS).items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-60, 60, size=(size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / name / f"img_{i:02d}.png")
    return folder


def save_timm_folder(folder: Path, arch: str, num_classes: int = 7, seed: int = 0,
                     model_args: dict | None = None) -> Path:
    """A timm Hub-layout folder (config.json naming the architecture (+ model_args) + model.safetensors)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes, **(model_args or {}))
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in model.pretrained_cfg.items()
           if k in ("mean", "std", "interpolation", "crop_pct", "input_size", "classifier", "first_conv")}
    config = {"architecture": arch, "num_classes": num_classes, "pretrained_cfg": cfg}
    if model_args:
        config["model_args"] = model_args
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_timm_cnn(tmp_path_factory) -> Path:
    """timm's test_efficientnet (convs + BatchNorm), random, 7 classes."""
    return save_timm_folder(tmp_path_factory.mktemp("tiny-timm-cnn"), "test_efficientnet")


@pytest.fixture(scope="session")
def tiny_timm_vit(tmp_path_factory) -> Path:
    return save_timm_folder(tmp_path_factory.mktemp("tiny-timm-vit"), "test_vit")


@pytest.fixture(scope="session")
def tiny_timm_vit_strict(tmp_path_factory) -> Path:
    """vit_tiny_patch16_224's layout shrunk (2 blocks, width 32): pretrained at 224 px with a fixed input size
    (unlike timm's test_vit, which is built with dynamic_img_size)."""
    return save_timm_folder(tmp_path_factory.mktemp("tiny-timm-vit-strict"), "vit_tiny_patch16_224",
                            model_args={"depth": 2, "embed_dim": 32, "num_heads": 2})


@pytest.fixture(scope="session")
def tiny_hf_vit(tmp_path_factory) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-hf-vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=5)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_clip_vision(tmp_path_factory) -> Path:
    """A vision tower with no transformers image-classification class (AutoModel + head)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("tiny-hf-clip-vision")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_mobilenet(tmp_path_factory) -> Path:
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

    folder = tmp_path_factory.mktemp("tiny-hf-mobilenet")
    torch.manual_seed(0)
    config = MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=4, tf_padding=False,
                               layer_norm_eps=1e-5)
    MobileNetV2ForImageClassification(config).save_pretrained(folder)
    MobileNetV2ImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return write_colour_images(tmp_path / "images")


@pytest.fixture
def vision_recipe(tmp_path, tiny_timm_cnn, colour_folder):
    """Write a vision recipe; keyword sections are TOML lines merged into the defaults."""

    def _make(*, backbone: Path | str | None = None, data: str = "", train: str = "", peft: str = "",
              task: str = "", name: str = "recipe.toml", output: str | None = None) -> Path:
        import tomllib

        import tomli_w

        recipe = {
            "task": {"name": "image-classification"},
            "model": {"backbone": str(backbone or tiny_timm_cnn)},
            "data": {"train": str(colour_folder), "split": 0.25, "image_size": 32},
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no",
                      "log_every_steps": 2, "checkpoint_every_steps": 3, "seed": 0},
            "output": {"dir": output if output is not None else str(tmp_path / "run")},
        }
        for section, text in (("data", data), ("train", train), ("peft", peft), ("task", task)):
            recipe[section].update(tomllib.loads(text))
        path = tmp_path / name
        path.write_text(tomli_w.dumps(recipe))
        return path

    return _make


def shuffled(items: list, seed: int = 0) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
