"""Backbones from the Hub (finetune.engine.backbones, finetune.engine.hub_access), against the local
Hub-compatible server: what is downloaded and what is not, the commit pinned into the run folder, the
cache reused without a request, offline and unreachable servers failing fast, resumed downloads, pickled
weights only with consent, and remote code only with the user's own consent."""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from conftest import run_cli
from hub_server import HubServer

from finetune.engine.run_folder import RunDir

TOKEN = "hf_test_secret_token_123"
REPO_ID = "acme/tiny-bert"


@pytest.fixture
def hub():
    with HubServer(TOKEN) as server:
        yield server


def env_for(server: HubServer, tmp_path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def folder_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def gets(server: HubServer) -> list[str]:
    return [path.rsplit("/", 1)[-1] for method, path in server.state.requests
            if method == "GET" and "/resolve/" in path]


def test_a_hub_backbone_downloads_what_a_run_loads_pins_its_commit_and_reuses_the_cache(
        hub, tmp_path, tiny_bert, make_recipe):
    files = {**folder_files(tiny_bert), "pytorch_model.bin": b"pickled copy, never fetched",
             "onnx/model.onnx": b"another format", "flax_model.msgpack": b"another format"}
    commit = hub.add_repo(REPO_ID, files)
    env = env_for(hub, tmp_path)
    recipe = make_recipe(extra="")
    backbone = ["--set", f'model.backbone="{REPO_ID}"']
    shown = run_cli("validate", str(recipe), *backbone, env=env)
    assert shown.returncode == 0, shown.stderr
    announce = f"downloading backbone {REPO_ID} at commit {commit[:8]} from {hub.url}: "
    assert announce in shown.stdout and shown.stdout.index(announce) < shown.stdout.index("# resolved recipe")
    fetched = gets(hub)
    assert "model.safetensors" in fetched and "config.json" in fetched and "vocab.txt" in fetched
    assert not {"pytorch_model.bin", "model.onnx", "flax_model.msgpack"} & set(fetched)
    assert f'revision = "{commit}"' in shown.stdout  # the resolved recipe pins the commit

    hub.state.requests.clear()
    result = run_cli("run", str(recipe), *backbone, env=env)
    assert result.returncode == 0, result.stderr
    assert hub.state.requests == []  # the cache, without a single request
    run = RunDir(tmp_path / "run")
    assert tomllib.loads(run.recipe_file.read_text())["model"]["revision"] == commit
    info = run.info()["backbone"]
    assert info["revision"] == commit and info["upstream_id"] == REPO_ID and "cache" in info["source"]
    assert "base_model: acme/tiny-bert" in run.card_file.read_text()


def test_the_pinned_commit_is_what_predict_loads_and_a_new_run_takes_the_new_one(hub, tmp_path, tiny_bert,
                                                                                 make_recipe):
    first = hub.add_repo(REPO_ID, folder_files(tiny_bert))
    env = env_for(hub, tmp_path)
    recipe = make_recipe(train="epochs = 1")
    assert run_cli("run", str(recipe), "--set", f'model.backbone="{REPO_ID}"', env=env).returncode == 0
    second = hub.add_commit(REPO_ID, {**folder_files(tiny_bert), "README.md": b"---\nlicense: mit\n---\n"})
    hub.state.requests.clear()
    predicted = run_cli("predict", str(tmp_path / "run"), "--text", "good great day", env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert not [p for _, p in hub.state.requests if second in p]  # the run's own commit, from the cache
    cached = run_cli("validate", str(recipe), "--set", f'model.backbone="{REPO_ID}"', env=env)
    assert cached.returncode == 0 and f'revision = "{first}"' in cached.stdout  # unset: main as cached
    newer = run_cli("validate", str(recipe), "--set", f'model.backbone="{REPO_ID}"', "--set", 'model.revision="main"',
                    env=env)  # a branch named: where it points now
    assert newer.returncode == 0 and f'revision = "{second}"' in newer.stdout
    pinned = run_cli("validate", str(recipe), "--set", f'model.backbone="{REPO_ID}"', "--set",
                     f'model.revision="{first}"', env=env)
    assert pinned.returncode == 0 and f'revision = "{first}"' in pinned.stdout
    wrong = run_cli("validate", str(recipe), "--set", f'model.backbone="{REPO_ID}"', "--set",
                    'model.revision="no-such-branch"', env=env)
    assert wrong.returncode == 2 and "model.revision: 'no-such-branch'" in wrong.stderr
    assert "no such revision" in wrong.stderr and "Traceback" not in wrong.stderr


def test_offline_unreachable_and_unknown_repos_fail_fast_and_clearly(hub, tmp_path, make_recipe):
    recipe = str(make_recipe())
    missing = ["--set", 'model.backbone="acme/not-here"']
    offline = run_cli("validate", recipe, *missing, env=env_for(hub, tmp_path, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
    assert "Offline backbones available here: sentence-transformers/all-MiniLM-L6-v2" in offline.stderr
    assert hub.state.requests == []
    closed = {**env_for(hub, tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    start = time.perf_counter()
    down = run_cli("validate", recipe, *missing, env=closed)
    assert down.returncode == 2 and "cannot reach http://127.0.0.1:9" in down.stderr
    assert time.perf_counter() - start < 30  # a CLI start (~6 s) and a refused connection; no minutes of retries
    unknown = run_cli("validate", recipe, *missing, env=env_for(hub, tmp_path))
    assert unknown.returncode == 2 and "has no such repository (HTTP 404)" in unknown.stderr
    assert "Traceback" not in offline.stderr + down.stderr + unknown.stderr


def test_resolution_times_offline_and_from_the_cache(hub, tmp_path, tiny_bert, monkeypatch, capsys):
    """In-process: how long an offline failure and a cached resolution take (printed for the notes)."""
    from huggingface_hub import constants

    from finetune.engine.backbones import resolve_backbone
    from finetune.errors import BackboneError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set"):
        resolve_backbone(f"acme/{uuid.uuid4().hex}")
    offline_s = time.perf_counter() - start
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.add_repo(REPO_ID, folder_files(tiny_bert))
    first = resolve_backbone(REPO_ID)
    hub.state.requests.clear()
    start = time.perf_counter()
    again = resolve_backbone(REPO_ID)
    cached_s = time.perf_counter() - start
    assert again.path == first.path and again.revision == first.revision and hub.state.requests == []
    assert offline_s < 2 and cached_s < 2
    with capsys.disabled():
        print(f"\nresolution: offline failure {offline_s * 1000:.0f} ms, cached {cached_s * 1000:.0f} ms")


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path, tiny_bert, monkeypatch):
    """The connection drops in the middle of the weights: the client keeps what it wrote and asks only for
    the rest (a Range request), and the file is whole. (huggingface_hub writes in 10 MB chunks; 1 KB here
    so that a 90 KB file is cut after some of them.)"""
    from huggingface_hub import constants

    from finetune.engine.backbones import resolve_backbone

    files = folder_files(tiny_bert)
    hub.add_repo(REPO_ID, files)
    weights = files["model.safetensors"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.state.fail["truncate"] = ("model.safetensors", 1)
    resolved = resolve_backbone(REPO_ID)
    ranges = [h.get("range") for method, path, h in hub.state.headers
              if method == "GET" and path.endswith("/model.safetensors")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0
    assert (Path(resolved.path) / "model.safetensors").read_bytes() == weights


def test_pickled_only_weights_are_refused_unless_the_recipe_allows_them(hub, tmp_path, tiny_bert, make_recipe):
    import torch
    from safetensors.torch import load_file

    files = {k: v for k, v in folder_files(tiny_bert).items() if not k.endswith(".safetensors")}
    blob = tmp_path / "pytorch_model.bin"
    torch.save(load_file(str(tiny_bert / "model.safetensors")), blob)
    files["pytorch_model.bin"] = blob.read_bytes()
    hub.add_repo(REPO_ID, files)
    env = env_for(hub, tmp_path)
    recipe = str(make_recipe())
    refused = run_cli("validate", recipe, "--set", f'model.backbone="{REPO_ID}"', env=env)
    assert refused.returncode == 2 and "has only pickled weights (pytorch_model.bin)" in refused.stderr
    assert "model.allow_pickled_weights = true" in refused.stderr and not gets(hub)
    allowed = run_cli("validate", recipe, "--set", f'model.backbone="{REPO_ID}"', "--set",
                      "model.allow_pickled_weights=true", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "pytorch_model.bin" in gets(hub)


MARKER_CODE = '''
import os
from pathlib import Path

from transformers import BertForSequenceClassification

Path(os.environ["FINETUNE_TEST_MARKER"]).write_text("the repository's own code ran")


class MarkerBert(BertForSequenceClassification):
    pass
'''


def test_remote_code_runs_only_with_the_users_own_consent(hub, tmp_path, tiny_bert, make_recipe):
    files = folder_files(tiny_bert)
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_marker.MarkerBert"}
    files["config.json"] = json.dumps(config).encode()
    files["modeling_marker.py"] = MARKER_CODE.encode()
    hub.add_repo("acme/custom", files)
    marker = tmp_path / "marker.txt"
    env = env_for(hub, tmp_path, FINETUNE_TEST_MARKER=str(marker))
    recipe = str(make_recipe(train="epochs = 1"))
    custom = ["--set", 'model.backbone="acme/custom"']
    refused = run_cli("run", recipe, *custom, env=env)
    assert refused.returncode == 2 and "ships its own modelling code (modeling_marker.MarkerBert)" in refused.stderr
    assert "model.trust_remote_code" in refused.stderr and not marker.exists()
    assert "modeling_marker.py" not in gets(hub)  # not even downloaded
    trusted = run_cli("run", recipe, *custom, "--set", "model.trust_remote_code=true", env=env)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert marker.exists()  # the user's own recipe said so
    marker.unlink()
    predicted = run_cli("predict", str(tmp_path / "run"), "--text", "good day", env=env)
    assert predicted.returncode == 2 and "pass --trust-remote-code" in predicted.stderr
    assert "acme/custom" in predicted.stderr and not marker.exists()  # a run folder does not consent for you
    allowed = run_cli("predict", str(tmp_path / "run"), "--text", "good day", "--trust-remote-code", env=env)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert marker.exists()
