"""Image data from a Hugging Face `datasets` source (data.dataset): save_to_disk folders, local parquet files
and folders, Hub names from the local caches without a request (offline: a fast, clear failure when not
cached; downloads from a Hub server are tested in tests/core/test_datasets_source.py)."""

from __future__ import annotations

import glob
import io
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from vision_fixtures import *  # noqa: F403 - the vision fixtures

from finetune.engine.console import Console
from finetune.errors import DataError, RecipeError
from finetune.run.inference import load_run
from finetune.run.session import open_session
from finetune.run.training import run_recipe

# ClassLabel order on purpose not alphabetical: its names (in its order) become the label names
CLASSES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def _png(rgb, seed: int, size: int = 16, mode: str = "RGB") -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = rng.integers(-50, 50, size=(size, size, 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def colour_dataset(per_class: int = 8, seed: int = 0, image_feature: bool = True, label: str = "classlabel"):
    """A datasets.Dataset of colour images (embedded PNG bytes) and labels."""
    import datasets

    images, labels = [], []
    for i in range(per_class):
        for k, (name, rgb) in enumerate(CLASSES.items()):
            images.append({"bytes": _png(rgb, seed * 1000 + i * 3 + k), "path": None} if image_feature
                          else _png(rgb, seed * 1000 + i * 3 + k))
            labels.append(k if label == "classlabel" else name)
    features = datasets.Features({
        "image": datasets.Image() if image_feature else datasets.Value("binary"),
        "label": datasets.ClassLabel(names=list(CLASSES)) if label == "classlabel" else datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _dict(**splits):
    import datasets

    return datasets.DatasetDict(splits)


@pytest.fixture
def recipe_for(vision_recipe):
    def _make(dataset: str, data: str = "", **kw) -> Path:
        return vision_recipe(data=f'train = ""\ndataset = "{dataset}"\n{data}', **kw)

    return _make


def test_save_to_disk_dict_with_classlabel_trains_evaluates_on_its_split_and_predicts(recipe_for, tmp_path):
    _dict(train=colour_dataset(6), test=colour_dataset(2, seed=1)).save_to_disk(str(tmp_path / "my-data"))
    # a bare name that exists beside the recipe is a path, resolved against the recipe's folder
    recipe = recipe_for("my-data", 'dataset_eval_split = "test"', train="epochs = 1")
    session = open_session(recipe)
    info = session.splits.info
    assert info["labels"] == ["red", "green", "blue"]  # ClassLabel order, not alphabetical
    assert (info["train_examples"], info["eval_examples"]) == (18, 6)
    assert info["dataset"] == str(tmp_path / "my-data") and info["dataset_eval_split"] == "test"
    assert info["train_from"] == str(tmp_path / "my-data")
    run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["data"]["eval_examples"] == 6 and 0 <= metrics["best"]["accuracy"] <= 1
    import tomllib

    assert tomllib.loads(run.recipe_file.read_text())["data"]["dataset"] == str(tmp_path / "my-data")
    saved = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]
    assert saved["labels"] == ["red", "green", "blue"]
    # predict reads a split folder (embedded bytes) or a parquet file; output rows carry names, not bytes
    from finetune.run.predictions import read_records, write_predictions

    task, model, processor, _ = load_run(run.path)
    records = read_records(task, tmp_path / "my-data" / "test")
    assert len(records) == 6 and isinstance(records[0]["source"], bytes)
    rows = task.predict(model, processor, records)
    assert [r["image"] for r in rows] == [f"{tmp_path / 'my-data' / 'test'}[{i}]" for i in range(6)]
    assert all(r["pred_label"] in CLASSES and "source" not in r for r in rows)
    write_predictions(rows, tmp_path / "preds.csv")
    assert "bytes" not in (tmp_path / "preds.csv").read_text()
    colour_dataset(1, seed=7, image_feature=False, label="str").to_parquet(str(tmp_path / "new.parquet"))
    rows = task.predict(model, processor, read_records(task, tmp_path / "new.parquet"))
    assert len(rows) == 3 and all(r["pred_label"] in CLASSES for r in rows)
    with pytest.raises(DataError, match=r"holds the splits \['train', 'test'\]; give one split"):
        read_records(task, tmp_path / "my-data")


def test_single_saved_dataset_holds_out_a_fraction(recipe_for, tmp_path):
    colour_dataset(8).save_to_disk(str(tmp_path / "single"))
    session = open_session(recipe_for(str(tmp_path / "single")))
    assert len(session.splits.train) + len(session.splits.eval) == 24 and len(session.splits.eval) == 6
    with pytest.raises(RecipeError, match="single Dataset without splits"):
        open_session(recipe_for(str(tmp_path / "single"), 'dataset_eval_split = "test"', name="e.toml"))


def test_parquet_file_with_bytes_column_and_string_labels(recipe_for, tmp_path):
    colour_dataset(4, image_feature=False, label="str").to_parquet(str(tmp_path / "imgs.parquet"))
    session = open_session(recipe_for("./imgs.parquet"))
    assert session.splits.info["labels"] == ["blue", "green", "red"]  # strings: sorted
    frame = session.splits.train
    assert isinstance(frame["source"][0], bytes) and frame["image"][0].startswith(str(tmp_path / "imgs.parquet"))
    batch = session.task.collate_fn(None)([session.task.build_dataset(frame, _Proc(), True)[0]])
    assert tuple(batch["pixel_values"].shape) == (1, 3, 16, 16)


class _Proc:
    def transform(self, training, options):
        from torchvision import transforms as T

        return T.ToTensor()


def test_parquet_folder_with_splits_and_image_paths_and_int_labels(recipe_for, tmp_path):
    import pandas as pd

    folder = tmp_path / "repo"  # images beside it (inside, datasets would infer an imagefolder)
    (tmp_path / "pics").mkdir()
    (folder / "data").mkdir(parents=True)
    for split, n, seed in (("train", 6, 0), ("test", 2, 1)):
        rows = []
        for i in range(n):
            for k, rgb in enumerate(CLASSES.values()):
                name = f"../pics/{split}_{i}_{k}.png"
                (folder / name).write_bytes(_png(rgb, seed * 100 + i * 3 + k, mode="L" if k == 1 else "RGB"))
                rows.append({"file": name, "y": k})
        pd.DataFrame(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    recipe = recipe_for(str(folder), 'image_column = "file"\nlabel_column = "y"\ndataset_eval_split = "test"')
    session = open_session(recipe)
    assert session.splits.info["labels"] == ["0", "1", "2"]
    assert (len(session.splits.train), len(session.splits.eval)) == (18, 6)
    assert session.splits.train["image"][0].startswith(str(tmp_path / "pics"))  # relative to the dataset folder


def _make_hub_dataset_cache(cache: Path, tmp_path: Path, name: str = "someone/tiny-colours") -> None:
    """What `load_dataset(name)` leaves in HF_DATASETS_CACHE: a prepared arrow folder per config."""
    import datasets

    colour_dataset(4).to_parquet(str(tmp_path / "src.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "src.parquet")},
                          cache_dir=str(tmp_path / "prep"))
    src = Path(glob.glob(str(tmp_path / "prep" / "parquet" / "*" / "0.0.0" / "*" / "dataset_info.json"))[0]).parent
    namespace, short = name.split("/")
    dst = cache / f"{namespace}___{short}" / "default" / "0.0.0" / src.name
    dst.mkdir(parents=True)
    shutil.copy(src / "dataset_info.json", dst)
    shutil.copy(src / "parquet-train.arrow", dst / f"{short}-train.arrow")


@pytest.fixture
def no_network(monkeypatch):
    """Any outgoing connection attempt is recorded and refused."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"test: network access attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_hub_name_from_the_datasets_cache_and_from_the_hub_cache(recipe_for, tmp_path, monkeypatch, no_network):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    _make_hub_dataset_cache(tmp_path / "hf-datasets", tmp_path)
    session = open_session(recipe_for("someone/tiny-colours"))
    assert session.splits.info["labels"] == ["red", "green", "blue"] and session.splits.info["train_examples"] == 9
    assert "datasets cache" in session.splits.info["dataset_loaded_from"]
    # a snapshot downloaded into the Hub cache (e.g. by `huggingface-cli download --repo-type dataset`)
    snapshot = tmp_path / "hf-hub" / "datasets--someone--snap" / "snapshots" / ("b" * 40)
    (snapshot / "data").mkdir(parents=True)
    colour_dataset(4).to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    colour_dataset(1, seed=3).to_parquet(str(snapshot / "data" / "validation-00000-of-00001.parquet"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    session = open_session(recipe_for("someone/snap", 'dataset_eval_split = "validation"', name="snap.toml"))
    assert (session.splits.info["train_examples"], session.splits.info["eval_examples"]) == (12, 3)
    assert "Hub cache" in session.splits.info["dataset_loaded_from"]
    assert no_network == []


def test_image_data_sets_download_from_the_hub(recipe_for, tmp_path, monkeypatch):
    """Online (a local Hub-compatible server): parquet with embedded images and ClassLabel, and an
    imagefolder repo (class folders of PNG files); both downloaded once, then read from the cache."""
    from hub_server import HubServer, fetched, parquet_bytes, use_server

    from finetune.run.dry_run import dry_run

    with HubServer() as hub:
        use_server(monkeypatch, hub, tmp_path)
        commit = hub.add_repo("acme/colours", {
            "data/train-00000-of-00001.parquet": parquet_bytes(colour_dataset(4)),
            "data/validation-00000-of-00001.parquet": parquet_bytes(colour_dataset(1, seed=3))},
            repo_type="dataset")
        recipe = recipe_for("acme/colours", 'dataset_eval_split = "validation"')
        info = dry_run(recipe, [], Console(quiet=True))
        assert info["data"]["labels"] == ["red", "green", "blue"]  # the ClassLabel's order
        assert (info["data"]["train_examples"], info["data"]["eval_examples"]) == (12, 3)
        assert info["data"]["dataset_commit"] == commit and "download" in info["data"]["dataset_loaded_from"]
        assert info["batch"]["pixel_values"].startswith("(8, 3, 32, 32)")
        hub.state.requests.clear()
        assert open_session(recipe).recipe.data.dataset_revision == commit and hub.state.requests == []

        files = {f"train/{name}/{i}.png": _png(rgb, i * 3 + k)
                 for i in range(4) for k, (name, rgb) in enumerate(CLASSES.items())}
        hub.add_repo("acme/colour-folders", {**files, "README.md": b"# colours as class folders\n"},
                     repo_type="dataset")
        session = open_session(recipe_for("acme/colour-folders", name="folders.toml"))
        assert session.splits.info["labels"] == ["blue", "green", "red"]  # imagefolder: sorted folder names
        assert session.splits.info["train_examples"] + session.splits.info["eval_examples"] == 12
        assert {f for f in fetched(hub) if f.endswith(".png")} == set(files)


def test_hub_name_not_cached_fails_fast_offline_with_how_to(recipe_for, tmp_path, monkeypatch, no_network):
    import datasets  # noqa: F401 - imported before timing: the check is about the look-up, not the import
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-ds"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    recipe = recipe_for("someone/not-here")
    offline_before = datasets.config.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        open_session(recipe)
    assert time.perf_counter() - started < 2.0
    message = str(info.value)
    assert "'someone/not-here'" in message and "HF_HUB_OFFLINE is set" in message and "save_to_disk" in message
    assert no_network == []
    # online, but the Hub cannot be reached: as fast, and it says so
    monkeypatch.delenv("HF_HUB_OFFLINE")
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"data.dataset: could not look up someone/not-here: cannot reach .*"
                                        r"Nothing was downloaded.*save_to_disk"):
        open_session(recipe)
    assert time.perf_counter() - started < 2.0
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # offline mode was only set around the look-up


def test_hub_name_not_cached_fails_fast_in_the_cli_without_touching_the_endpoint(recipe_for, tmp_path):
    """Through the real CLI, HF_HUB_OFFLINE=1 and HF_ENDPOINT at a server that accepts and never answers:
    no connection."""
    from conftest import run_cli

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_DATASETS_CACHE": str(tmp_path / "d"),
           "HF_HUB_CACHE": str(tmp_path / "h"), "HF_HUB_OFFLINE": "1", "HF_HUB_ETAG_TIMEOUT": "600",
           "HF_HUB_DOWNLOAD_TIMEOUT": "600"}
    try:
        result = run_cli("validate", str(recipe_for("someone/not-here")), env=env, timeout=120)
        try:
            conn, _ = server.accept()
            conn.close()
            connected = True
        except OSError:
            connected = False
    finally:
        server.close()
    assert result.returncode == 2, result.stderr
    assert "not in the local caches" in result.stderr and "Traceback" not in result.stderr
    assert not connected


def test_bad_dataset_sources(recipe_for, vision_recipe, tmp_path):
    import datasets

    _dict(train=colour_dataset(2), test=colour_dataset(1)).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"split 'tset' not found.*did you mean 'test'.*\['train', 'test'\]"):
        open_session(recipe_for(str(tmp_path / "d"), 'dataset_eval_split = "tset"', name="a.toml"))
    with pytest.raises(DataError, match=r"data.image_column: column 'img' not found.*did you mean 'image'"):
        open_session(recipe_for(str(tmp_path / "d"), 'image_column = "img"', name="b.toml"))
    with pytest.raises(DataError, match=r"data.label_column: column 'labels' not found.*did you mean 'label'"):
        open_session(recipe_for(str(tmp_path / "d"), 'label_column = "labels"', name="c.toml"))
    with pytest.raises(DataError, match=r"not found: .*nowhere"):
        open_session(recipe_for("./nowhere", name="n.toml"))
    with pytest.raises(RecipeError, match="data.dataset is set together with data.train"):
        open_session(vision_recipe(data=f'dataset = "{tmp_path / "d"}"', name="t.toml"))  # train: a folder
    # a label column that is not ClassLabel/str/int
    ds = colour_dataset(2)
    floats = ds.remove_columns("label").add_column("label", [0.5] * len(ds))
    floats.save_to_disk(str(tmp_path / "floats"))
    with pytest.raises(DataError, match=r"data.label_column: column 'label' .* holds Value\('float64'.*expected a "
                                        "ClassLabel, string or integer"):
        open_session(recipe_for(str(tmp_path / "floats"), name="f.toml"))
    multi = ds.remove_columns("label").add_column("label", [["a", "b"]] * len(ds))
    multi.save_to_disk(str(tmp_path / "multi"))
    with pytest.raises(DataError, match=r"data.label_column: .*expected a ClassLabel"):
        open_session(recipe_for(str(tmp_path / "multi"), name="m.toml"))
    # an image column that holds numbers
    with pytest.raises(DataError, match=r"data.image_column: column 'label' .* expected a datasets Image"):
        open_session(recipe_for(str(tmp_path / "d"), 'image_column = "label"', name="i.toml"))
    # an empty split
    _dict(train=colour_dataset(2), test=colour_dataset(2).select([])).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"data.dataset_eval_split: .*\[test\] is empty \(0 rows\)"):
        open_session(recipe_for(str(tmp_path / "empty"), 'dataset_eval_split = "test"', name="e.toml"))
    colour_dataset(2).select([]).save_to_disk(str(tmp_path / "empty1"))
    with pytest.raises(DataError, match=r"data.dataset: .*empty1 is empty \(0 rows\)"):
        open_session(recipe_for(str(tmp_path / "empty1"), name="e1.toml"))
    (tmp_path / "emptyfiles" / "data").mkdir(parents=True)
    colour_dataset(2).to_parquet(str(tmp_path / "emptyfiles" / "data" / "train-0.parquet"))
    colour_dataset(2).select([]).to_parquet(str(tmp_path / "emptyfiles" / "data" / "test-0.parquet"))
    with pytest.raises(DataError, match=r"split 'test' is empty \(0 rows\)"):
        open_session(recipe_for(str(tmp_path / "emptyfiles"), name="e2.toml"))
    # unlabelled rows (ClassLabel -1, as in many test splits) and undecodable image bytes
    unlabelled = datasets.Dataset.from_dict({"image": list(ds["image"]), "label": [-1] + list(ds["label"])[1:]},
                                            features=ds.features)
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"1 row\(s\) have no image or no label \(e.g. row\(s\) \[0\]\)"):
        open_session(recipe_for(str(tmp_path / "unlabelled"), name="u.toml"))
    broken = colour_dataset(2, image_feature=False, label="str")
    broken = datasets.Dataset.from_dict({"image": [b"not a png"] + list(broken["image"])[1:],
                                         "label": list(broken["label"])}, features=broken.features)
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    with pytest.raises(DataError, match=r"1 of 6 image\(s\) are missing or unreadable: .*broken.parquet\[train\]\[0\] "
                                        r"\(UnidentifiedImageError: cannot identify image file \(encoded bytes\)\)"):
        open_session(recipe_for(str(tmp_path / "broken.parquet"), name="x.toml"))
