"""semantic-segmentation on two processes (the confusion counts of every eval image gathered once), pushed to
a local Hub server, pulled by id and predicted as from the run folder."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from hub_server import HubServer
from segmentation_fixtures import *  # noqa: F403 - the segmentation fixtures
from segmentation_fixtures import write_disc_pairs

from finetune.engine.run_folder import RunDir
from finetune.run.hub import parse_front_matter, push_run

TOKEN = "hf_test_secret_token_123"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def test_two_process_run_round_trips_through_the_hub(hub, seg_recipe, tmp_path):
    folder = write_disc_pairs(tmp_path / "pairs", count=14, classes=3)
    run = tmp_path / "run"
    # 14 pairs, 4 held out: 4 eval images over 2 processes (2 each), counted once
    recipe = seg_recipe(folder=folder, data='classes = ["background", "disc", "square"]\nsplit = 0.3',
                        output=str(run))
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
    trained = run_cli("run", str(recipe), "--num-processes", "2", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert RunDir(run).info()["processes"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    eval_images = metrics["data"]["eval_examples"]
    assert sum(metrics["best_details"]["per_class_pixels"].values()) == eval_images * 40 * 40
    push_run(run, "me/segmentation")
    files = hub.state.repos["me/segmentation"].branches["main"][-1]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune_task.json", "README.md"} <= set(files)
    meta = parse_front_matter(files["README.md"].decode())
    assert meta["pipeline_tag"] == "image-segmentation" and meta["library_name"] == "peft"
    image = folder / "images" / "img_03.png"
    from_hub = run_cli("predict", "me/segmentation", "--input", str(image), env=env)
    from_run = run_cli("predict", str(run), "--input", str(image))
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    assert json.loads(from_hub.stdout.splitlines()[-1]) == json.loads(from_run.stdout.splitlines()[-1])
