"""The model card (finetune.run.card) and PEFT's README beside the adapter: the link to this project (never
PyPI's page of an unrelated library called finetune), the base model as a Hub id rather than a local path,
and a Training section with the settings that were set or matter, not every default."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli

from finetune.engine.console import Console
from finetune.run import card as card_module
from finetune.run.hub import parse_front_matter
from finetune.run.training import run_recipe


@pytest.fixture
def upstream_bert(tiny_bert, tmp_path):
    """The tiny BERT as a folder converted from a Hub model (config.json names its upstream id)."""
    folder = shutil.copytree(tiny_bert, tmp_path / "converted-bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "finetune_upstream_id": "acme/tiny-bert"}))
    return folder


def test_card_and_adapter_readme_name_the_hub_model_and_link_no_other_project(make_recipe, upstream_bert,
                                                                             monkeypatch):
    monkeypatch.delenv(card_module.PROJECT_URL_ENV, raising=False)
    recipe = make_recipe(train="epochs = 1")
    run = run_recipe(recipe, [f"model.backbone={upstream_bert}"], console=Console(enabled=False))
    card = run.card_file.read_text()
    assert "pypi.org/project/finetune" not in card
    assert "trained with finetune." in card or "trained with [finetune](http" in card
    assert parse_front_matter(card)["base_model"] == "acme/tiny-bert"

    adapter_card = (run.adapter_dir / "README.md").read_text()
    assert parse_front_matter(adapter_card)["base_model"] == "acme/tiny-bert"  # PEFT wrote the local folder
    assert str(upstream_bert) not in adapter_card
    assert parse_front_matter(adapter_card)["library_name"] == "peft"  # the rest of PEFT's card is kept
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-bert"  # as pushed: loadable elsewhere

    training = card.split("## Training", 1)[1].split("## Usage", 1)[0]
    settings = training.split("```toml", 1)[1].split("```", 1)[0]
    assert str(recipe.parent) not in settings  # the card is pushed: file names, not this machine's paths
    assert 'train = "train.csv"' in settings and 'backbone = "acme/tiny-bert"' in settings
    assert "the run folder's recipe.toml has every key" in training
    assert "split = 0.25" in training and "learning_rate = 0.01" in training  # set in the recipe
    assert "[distributed" not in training and "[hub]" not in training and "fast_dropout = true" not in training
    assert "- speed settings: `train.fast_dropout`, `train.group_by_length`, `task.last_layer_cls_only` (faster" \
        in training


def test_the_project_link_comes_from_a_clean_override_or_is_left_out(monkeypatch):
    monkeypatch.setenv(card_module.PROJECT_URL_ENV, "https://example.org/acme/finetune")
    assert card_module.project_url() == "https://example.org/acme/finetune"
    assert card_module._finetune_link() == "[finetune](https://example.org/acme/finetune)"
    for bad in ("https://pypi.org/project/finetune/", "javascript:alert(1)", "https://x.org/a) [b](c",
                "ftp://example.org/f", "example.org/finetune"):
        monkeypatch.setenv(card_module.PROJECT_URL_ENV, bad)
        assert card_module.project_url() is None and card_module._finetune_link() == "finetune"
    monkeypatch.delenv(card_module.PROJECT_URL_ENV)
    # this checkout's metadata names no project page (there is no public repository): plain text
    assert card_module.project_url() is None and card_module._finetune_link() == "finetune"


def test_an_unusable_project_url_is_refused_before_training(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe()), env={card_module.PROJECT_URL_ENV: "https://pypi.org/project/finetune"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "FINETUNE_PROJECT_URL: 'https://pypi.org/project/finetune' is PyPI's page of an unrelated library" \
        in result.stderr
    assert not (tmp_path / "run").exists()


def test_adapter_readme_of_a_private_backbone_names_no_base_model(tmp_path):
    from finetune.run.adapter import name_base_model

    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: /home/me/models/bert\nlibrary_name: peft\ntags:\n"
                    "- base_model:adapter:/home/me/models/bert\n- lora\n---\n\n# Model Card\n\nbody /x\n")
    name_base_model(card, None)
    assert parse_front_matter(card.read_text()) == {"library_name": "peft", "tags": ["lora"]}
    assert card.read_text().endswith("---\n\n# Model Card\n\nbody /x\n")  # PEFT's body untouched
    name_base_model(tmp_path / "missing.md", "acme/x")  # no README (PEFT did not write one): nothing to do
