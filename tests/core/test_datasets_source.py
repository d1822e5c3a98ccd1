"""Hub data sets (data.dataset = "owner/name", finetune.open_dataset) against the local Hub-compatible
server: only data files downloaded and announced first, the commit pinned into the run folder, the cache
reused without a request (and offline), configurations and revisions, unknown names and unreachable
servers failing fast. The image, audio and generation plugins' own data-set tests use the same server."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, run_cli
from hub_server import HubServer, fetched, parquet_bytes, use_server

from finetune.engine.run_folder import RunDir
from finetune.errors import DataError

TOKEN = "hf_test_secret_token_123"


@pytest.fixture
def hub():
    with HubServer(TOKEN) as server:
        yield server


def parquet(rows: list[dict], class_label: bool = True) -> bytes:
    """Rows as the parquet bytes a Hub data set holds (``label`` a ClassLabel, as on the Hub)."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"]) if class_label
                                  else datasets.Value("string")})
    return parquet_bytes(datasets.Dataset.from_dict(
        {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}, features=features))


def reviews(n_train: int = 96, n_test: int = 32) -> dict[str, bytes]:
    return {"README.md": b"---\nlicense: cc0-1.0\n---\n# reviews\n",
            "data/train-00000-of-00001.parquet": parquet(make_sentiment_rows(n_train, seed=1)),
            "data/test-00000-of-00001.parquet": parquet(make_sentiment_rows(n_test, seed=2)),
            "raw/original_dump.tar": b"not a data file finetune reads: never fetched"}


def recipe_file(tmp_path: Path, tiny_bert: Path, data: dict, name: str = "recipe.toml") -> Path:
    import tomli_w

    recipe = {"task": {"name": "text-classification"}, "model": {"backbone": str(tiny_bert)},
              "data": {"max_length": 16, **data}, "peft": {"r": 4, "alpha": 8},
              "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no", "seed": 0},
              "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / name
    path.write_text(tomli_w.dumps(recipe))
    return path


def env_for(server: HubServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@pytest.fixture
def in_process(hub, tmp_path, monkeypatch):
    """open_session against the server in this process (faster than the CLI for the finer cases)."""
    use_server(monkeypatch, hub, tmp_path)
    return hub


def test_a_hub_data_set_downloads_its_data_files_pins_its_commit_and_reuses_the_cache(hub, tmp_path, tiny_bert):
    commit = hub.add_repo("acme/reviews", reviews(), repo_type="dataset")
    recipe = recipe_file(tmp_path, tiny_bert, {"dataset": "acme/reviews", "dataset_eval_split": "test"})
    env = env_for(hub, tmp_path)
    shown = run_cli("validate", str(recipe), env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"downloading data set acme/reviews at commit {commit[:8]} from {hub.url}: 3 files" in shown.stderr
    assert sorted(fetched(hub)) == ["README.md", "data/test-00000-of-00001.parquet",
                                    "data/train-00000-of-00001.parquet"]
    assert f'dataset_revision = "{commit}"' in shown.stdout  # the resolved recipe pins the commit
    assert "data.train_examples: 96" in shown.stdout and "data.eval_examples: 32" in shown.stdout
    assert "data.labels: ['neg', 'pos']" in shown.stdout  # ClassLabel ids read as their names

    hub.state.requests.clear()
    result = run_cli("run", str(recipe), env=env)
    assert result.returncode == 0, result.stderr
    assert hub.state.requests == [] and "downloading" not in result.stderr  # the cache, without a request
    run = RunDir(tmp_path / "run")
    assert tomllib.loads(run.recipe_file.read_text())["data"]["dataset_revision"] == commit
    data = json.loads(run.metrics_file.read_text())["data"]
    assert data["dataset"] == "acme/reviews" and data["dataset_commit"] == commit and data["eval_examples"] == 32
    card = run.card_file.read_text()
    assert "datasets:\n- acme/reviews" in card and f"revision: {commit}" in card

    offline = run_cli("validate", str(recipe), env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert hub.state.requests == [] and "Hub cache" in offline.stdout
    elsewhere = env_for(hub, tmp_path / "other", HF_HUB_OFFLINE="1")  # another machine: nothing cached
    started = time.perf_counter()
    missing = run_cli("validate", str(recipe), env=elsewhere)
    assert missing.returncode == 2 and "HF_HUB_OFFLINE is set so nothing is downloaded" in missing.stderr
    assert "save_to_disk" in missing.stderr and "Traceback" not in missing.stderr
    assert time.perf_counter() - started < 30 and hub.state.requests == []  # a CLI start; no waiting


CONFIGS_README = b"""---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.parquet
  - split: test
    path: en/test.parquet
- config_name: fr
  data_files:
  - split: train
    path: fr/train.parquet
  - split: test
    path: fr/test.parquet
---
"""


def test_configuration_revision_and_unknown_names(in_process, tmp_path, tiny_bert):
    from finetune.run.session import open_session

    hub = in_process
    french = [{"text": f"tres bien {r['text']}", "label": r["label"]} for r in make_sentiment_rows(40, seed=3)]
    first = hub.add_repo("acme/bilingual", {
        "README.md": CONFIGS_README,
        "en/train.parquet": parquet(make_sentiment_rows(60)), "en/test.parquet": parquet(make_sentiment_rows(20)),
        "fr/train.parquet": parquet(french), "fr/test.parquet": parquet(french[:10])}, repo_type="dataset")
    data = {"dataset": "acme/bilingual", "dataset_config": "fr", "dataset_eval_split": "test"}
    session = open_session(recipe_file(tmp_path, tiny_bert, data))
    assert set(fetched(hub)) == {"README.md", "fr/train.parquet", "fr/test.parquet"}  # only the config's files
    assert (session.splits.info["train_examples"], session.splits.info["eval_examples"]) == (40, 10)
    assert session.splits.train["text"].str.startswith("tres bien").all()
    assert session.recipe.data.dataset_revision == first and session.splits.info["dataset_config"] == "fr"

    hub.state.requests.clear()
    english = open_session(recipe_file(tmp_path, tiny_bert, {**data, "dataset_config": "en"}))
    assert set(fetched(hub)) == {"en/train.parquet", "en/test.parquet"}  # the rest of the same commit
    assert english.splits.info["train_examples"] == 60 and english.recipe.data.dataset_revision == first

    second = hub.add_commit("acme/bilingual", {"README.md": CONFIGS_README,
                                               "fr/train.parquet": parquet(french + french),
                                               "fr/test.parquet": parquet(french[:10])}, repo_type="dataset")
    hub.state.requests.clear()
    cached = open_session(recipe_file(tmp_path, tiny_bert, data))  # unset revision: main as cached
    assert cached.recipe.data.dataset_revision == first and hub.state.requests == []
    newest = open_session(recipe_file(tmp_path, tiny_bert, {**data, "dataset_revision": "main"}))
    assert newest.recipe.data.dataset_revision == second and newest.splits.info["train_examples"] == 80
    hub.state.requests.clear()
    pinned = open_session(recipe_file(tmp_path, tiny_bert, {**data, "dataset_revision": first}))
    assert pinned.splits.info["train_examples"] == 40 and hub.state.requests == []
    with pytest.raises(DataError, match=r"data.dataset_revision: .*no such revision"):
        open_session(recipe_file(tmp_path, tiny_bert, {**data, "dataset_revision": "no-such-branch"}))
    with pytest.raises(DataError, match=r"data.dataset_split: split 'training' not found .*\['train', 'test'\]"):
        open_session(recipe_file(tmp_path, tiny_bert, {**data, "dataset_split": "training"}))
    with pytest.raises(DataError, match=r"data.dataset: .*acme/not-here.*has no such repository \(HTTP 404\)"):
        open_session(recipe_file(tmp_path, tiny_bert, {"dataset": "acme/not-here"}))


def test_an_unreachable_hub_fails_fast_and_says_so(tmp_path, tiny_bert, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    from finetune.run.session import open_session

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"data.dataset: could not look up acme/reviews: cannot reach "
                                        r"http://127.0.0.1:9.*Nothing was downloaded"):
        open_session(recipe_file(tmp_path, tiny_bert, {"dataset": "acme/reviews"}))
    assert time.perf_counter() - started < 5
