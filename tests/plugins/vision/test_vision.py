"""Image classification on tiny random timm and transformers backbones: data, LoRA targets, BatchNorm,
training end to end, exact adapter reload (finetune and plain peft), probing/full, predict, metrics."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_cli
from vision_fixtures import *  # noqa: F403 - the vision fixtures
from vision_fixtures import write_colour_images

from finetune.engine.console import Console
from finetune.run.inference import load_run
from finetune.run.session import build_model, open_session
from finetune.run.training import run_recipe


def _accuracy(logits, labels) -> float:
    return int((logits.argmax(-1) == labels).sum()) / len(labels)


def _eval_batch(task, processor, splits):
    ds = task.build_dataset(splits.eval, processor, training=False)
    return task.collate_fn(processor)([ds[i] for i in range(len(ds))])


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, tiny_timm_cnn):
    folder = tmp_path_factory.mktemp("timm-run")
    write_colour_images(folder / "images")
    write_colour_images(folder / "test-images", per_class=4, seed=3)
    import tomli_w

    recipe = folder / "recipe.toml"
    recipe.write_text(tomli_w.dumps({
        "task": {"name": "image-classification"}, "model": {"backbone": str(tiny_timm_cnn)},
        "data": {"train": str(folder / "images"), "test": str(folder / "test-images"), "split": 0.25,
                 "image_size": 32},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 2e-2, "mixed_precision": "no", "seed": 0},
        "output": {"dir": str(folder / "run")}}))
    return recipe, run_recipe(recipe, [], console=Console(quiet=True))


def test_timm_lora_run_writes_metrics_confusion_matrix_and_card(timm_run):
    _, run = timm_run
    metrics = json.loads(run.metrics_file.read_text())
    best = metrics["best"]
    assert {"accuracy", "top_k_accuracy", "macro_f1", "eval_loss"} <= set(best)
    assert best["accuracy"] > 0.6  # 3 colour classes: chance is 0.33
    assert best["top_k_accuracy"] == 1.0  # k = min(5, 3 classes)
    # the test folder: scored once with the selected adapter, never selected on
    assert metrics["data"]["test_examples"] == 12 and metrics["test"]["step"] == best["step"]
    assert metrics["test"]["accuracy"] > 0.6 and "macro_f1" in metrics["test"]
    cm = metrics["best_details"]["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == metrics["data"]["eval_examples"]
    assert (run.path / "confusion_matrix.png").stat().st_size > 1000
    card = run.card_file.read_text()
    assert "pipeline_tag: image-classification" in card and "timm.create_model('test_efficientnet'" in card
    saved = json.loads((run.adapter_dir / "finetune_task.json").read_text())["state"]
    assert saved["labels"] == ["blue", "green", "red"] and saved["backend"] == "timm"
    assert json.loads((run.adapter_dir / "finetune_preprocess.json").read_text())["input_size"] == 32


def test_timm_run_report_has_classes_per_split_confusion_matrix_and_thumbnails(timm_run):
    _, run = timm_run
    data = json.loads((run.path / "report_data.json").read_text())
    counts = data["data"]["label_counts"]
    assert set(counts) == {"train", "eval", "test"} and sum(counts["test"].values()) == 12
    samples = data["samples"]
    assert samples and all(s["image"].startswith("data:image/png;base64,") for s in samples)
    assert all(s["correct"] == (s["prediction"] == s["reference"]) and s["input"].endswith(".png") for s in samples)
    page = (run.path / "report.html").read_text()
    assert 'id="confusion-matrix"' in page and page.count('<img class="thumb" src="data:image/png;base64,') == len(
        samples)


def test_timm_adapter_reloads_exactly_with_finetune_and_plain_peft(timm_run, tiny_timm_cnn):
    import timm
    from peft import PeftModel
    from safetensors.torch import load_file

    recipe, run = timm_run
    session = open_session(recipe)
    task, model, processor, _ = load_run(run.path)
    batch = _eval_batch(task, processor, session.splits)
    with torch.no_grad():
        ours = model(batch["pixel_values"])
    accuracy = _accuracy(ours, batch["labels"])
    assert accuracy == pytest.approx(json.loads(run.metrics_file.read_text())["best"]["accuracy"], abs=1e-9)
    # plain timm + peft, no finetune code
    base = timm.create_model("test_efficientnet", num_classes=3)
    weights = load_file(str(tiny_timm_cnn / "model.safetensors"))
    base.load_state_dict({k: v for k, v in weights.items() if not k.startswith("classifier.")}, strict=False)
    plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    with torch.no_grad():
        assert torch.equal(plain(batch["pixel_values"]), ours)
    # BatchNorm statistics were frozen during LoRA training: the base buffers are the pretrained ones
    bn = [k for k in weights if k.endswith("running_mean")]
    state = model.get_base_model().state_dict()
    assert bn and all(torch.equal(state[k], weights[k]) for k in bn)


def test_lora_targets_auto_for_cnn_and_vit(vision_recipe, tiny_timm_vit, tiny_hf_vit, tiny_hf_mobilenet):
    session = open_session(vision_recipe())
    model, _, report = build_model(session)
    import torch.nn as nn

    modules = dict(model.get_base_model().named_modules())
    convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d) and not n.endswith("base_layer")}
    wrapped = {t: modules[t].base_layer for t in report.target_modules}  # LoRA wraps each target
    assert wrapped and all(isinstance(m, nn.Conv2d) and m.groups == 1 for m in wrapped.values())
    assert any(m.groups > 1 for m in convs.values())  # depthwise convs exist and are left alone
    assert report.modules_to_save == ["classifier"]
    session = open_session(vision_recipe(backbone=tiny_timm_vit, name="vit.toml"))
    _, _, report = build_model(session)
    assert {t.rsplit(".", 1)[-1] for t in report.target_modules} == {"qkv", "proj", "fc1", "fc2"}
    assert report.modules_to_save == ["head"]
    session = open_session(vision_recipe(backbone=tiny_hf_vit, name="hfvit.toml"))
    _, _, report = build_model(session)
    leaves = {t.rsplit(".", 1)[-1] for t in report.target_modules}
    assert {"q_proj", "k_proj", "v_proj", "fc1", "fc2"} <= leaves and "classifier" not in leaves
    assert len(report.target_modules) == 2 * 6  # 2 layers x (q, k, v, out, fc1, fc2)
    assert report.modules_to_save == ["classifier"]
    session = open_session(vision_recipe(backbone=tiny_hf_mobilenet, name="hfmnv2.toml"))
    _, _, report = build_model(session)
    assert all(t.endswith("convolution") for t in report.target_modules)


def test_cnn_input_goes_channels_last_and_vit_input_stays(vision_recipe, tiny_timm_vit):
    """CNNs get channels-last input (faster oneDNN convolutions on CPU), with the same logits."""
    for backbone, expect in ((None, True), (tiny_timm_vit, False)):
        session = open_session(vision_recipe(backbone=backbone, name="v.toml"))
        model, _, _ = build_model(session)
        model.eval()
        seen = []
        hook = model.get_base_model().register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            logits = session.task._logits(model, x)
            plain = model(x)
        hook.remove()
        assert seen[0].is_contiguous(memory_format=torch.channels_last) is expect
        assert torch.allclose(logits, getattr(plain, "logits", plain), atol=1e-5)


def test_new_num_classes_replaces_the_head_and_keeps_the_backbone(vision_recipe, tiny_timm_cnn, tiny_hf_vit):
    from safetensors.torch import load_file

    session = open_session(vision_recipe(peft='method = "full"'))
    model, _, _ = build_model(session)
    assert model.get_classifier().out_features == 3  # the fixture was saved with 7
    saved = load_file(str(tiny_timm_cnn / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("classifier."))
    session = open_session(vision_recipe(backbone=tiny_hf_vit, peft='method = "full"', name="hf.toml"))
    model, _, _ = build_model(session)
    assert model.classifier.out_features == 3 and model.config.id2label[0] == "blue"  # the fixture had 5
    from transformers import AutoModelForImageClassification

    original = AutoModelForImageClassification.from_pretrained(str(tiny_hf_vit)).state_dict()
    state = model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], v) for k, v in original.items() if not k.startswith("classifier."))


def test_random_init_differs_from_pretrained(vision_recipe):
    pre, _, _ = build_model(open_session(vision_recipe(peft='method = "full"')))
    rnd, _, _ = build_model(open_session(vision_recipe(peft='method = "full"', task='init = "random"',
                                                       name="r.toml")))
    key = "conv_stem.weight"
    assert not torch.equal(pre.state_dict()[key], rnd.state_dict()[key])


def test_preprocessing_follows_the_backbone_and_augmentation_is_train_only(vision_recipe, tiny_hf_mobilenet):
    session = open_session(vision_recipe(backbone=tiny_hf_mobilenet, data="image_size = 0\n".replace(
        "image_size = 0\n", ""), name="a.toml"))
    _, processor, _ = build_model(session)
    pre = processor.preprocess
    assert pre["input_size"] == 32 and pre["crop_pct"] == pytest.approx(32 / 36) and pre["mean"] == [0.5] * 3
    session = open_session(vision_recipe(data='random_resized_crop = true\nhflip = true\nauto_augment = "trivial"',
                                         name="b.toml"))
    _, processor, _ = build_model(session)
    train_t = processor.transform(training=True, options=session.recipe.data)
    eval_t = processor.transform(training=False, options=session.recipe.data)
    names = [type(t).__name__ for t in train_t.transforms]
    assert names[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide"]
    assert [type(t).__name__ for t in eval_t.transforms][:2] == ["Resize", "CenterCrop"]
    from PIL import Image

    image = Image.new("RGB", (40, 30), (10, 200, 30))
    assert torch.equal(eval_t(image), eval_t(image)) and eval_t(image).shape == (3, 32, 32)


@pytest.mark.parametrize("method", ["none", "full"])
def test_linear_probe_and_full_finetuning(vision_recipe, method, tmp_path):
    recipe = vision_recipe(peft=f'method = "{method}"', train="epochs = 1", output=str(tmp_path / method))
    run = run_recipe(recipe, [], console=Console(quiet=True))
    from safetensors.torch import load_file

    saved = load_file(str(run.adapter_dir / "trained.safetensors"))
    card = (run.path / "README.md").read_text()
    assert "LoRA" not in card.split("## Training")[0]  # the card says what was trained
    if method == "none":
        assert set(saved) == {"classifier.weight", "classifier.bias"}
        assert "A head-only fine-tune (frozen backbone) of" in card and "the backbone frozen" in card
    else:
        assert any(k.endswith("running_mean") for k in saved)  # BatchNorm statistics trained and saved
        assert "A full fine-tune of" in card and "- trained: every parameter" in card
    session = open_session(recipe)
    task, model, processor, _ = load_run(run.path)
    batch = _eval_batch(task, processor, session.splits)
    with torch.no_grad():
        accuracy = _accuracy(model(batch["pixel_values"]), batch["labels"])
    assert accuracy == pytest.approx(json.loads(run.metrics_file.read_text())["best"]["accuracy"], abs=1e-9)


def test_transformers_backend_trains_and_reloads_with_plain_peft(vision_recipe, tiny_hf_vit, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    recipe = vision_recipe(backbone=tiny_hf_vit, train="epochs = 1", output=str(tmp_path / "hf"))
    run = run_recipe(recipe, [], console=Console(quiet=True))
    task, ours, processor, _ = load_run(run.path)
    batch = _eval_batch(task, processor, open_session(recipe).splits)
    base = AutoModelForImageClassification.from_pretrained(str(tiny_hf_vit), num_labels=3,
                                                           ignore_mismatched_sizes=True)
    plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(plain(pixel_values=batch["pixel_values"]).logits,
                              ours(batch["pixel_values"]).logits, atol=1e-6)
    assert (run.adapter_dir / "preprocessor_config.json").exists()


def test_automodel_plus_head_for_vision_towers_without_a_classifier_class(vision_recipe, tiny_hf_clip_vision,
                                                                           tmp_path):
    recipe = vision_recipe(backbone=tiny_hf_clip_vision, train="epochs = 1", output=str(tmp_path / "clip"))
    session = open_session(recipe)
    model, _, report = build_model(session)
    assert report.modules_to_save == ["classifier"]
    assert {"q_proj", "v_proj", "fc1"} <= {t.rsplit(".", 1)[-1] for t in report.target_modules}
    run = run_recipe(recipe, [], console=Console(quiet=True))
    task, ours, processor, _ = load_run(run.path)
    batch = _eval_batch(task, processor, session.splits)
    with torch.no_grad():
        accuracy = _accuracy(ours(batch["pixel_values"]), batch["labels"])
    assert accuracy == pytest.approx(json.loads(run.metrics_file.read_text())["best"]["accuracy"], abs=1e-9)


def test_table_data_csv_and_jsonl(vision_recipe, colour_folder, tmp_path):
    rows = [{"path": str(p.relative_to(colour_folder)), "y": p.parent.name}
            for p in sorted(colour_folder.rglob("*.png"))]
    table = colour_folder / "labels.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "y"])
        writer.writeheader()
        writer.writerows(rows)
    (colour_folder / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("labels.csv", "labels.jsonl"):
        session = open_session(vision_recipe(data=f'train = "{colour_folder / name}"\nimage_column = "path"\n'
                                                  'label_column = "y"', name=f"{name}.toml"))
        assert session.splits.info["labels"] == ["blue", "green", "red"]
        assert len(session.splits.train) + len(session.splits.eval) == 48


def test_split_by_folder(vision_recipe, tmp_path):
    root = tmp_path / "split"
    write_colour_images(root / "train", per_class=6)
    write_colour_images(root / "val", per_class=2, seed=1)
    session = open_session(vision_recipe(data=f'train = "{root}"', name="s.toml"))
    assert (len(session.splits.train), len(session.splits.eval)) == (18, 6)


def test_predict_cli_on_a_folder_prints_top_k(timm_run, tmp_path):
    _, run = timm_run
    inputs = write_colour_images(tmp_path / "new", per_class=2, seed=5)
    (inputs / "red" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    result = run_cli("predict", str(run.path), "--input", str(inputs), "--output", str(out),
                     "--set", "task.top_k=2")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7
    broken = [r for r in rows if r["image"].endswith("broken.png")]
    assert broken and broken[0]["pred_error"] and not broken[0]["pred_label"]
    good = [r for r in rows if not r["image"].endswith("broken.png")]
    for row in good:
        assert row["pred_label"] == row["pred_label_1"] and row["pred_label_2"] in ("red", "green", "blue")
        assert 1.0 >= float(row["pred_score_1"]) >= float(row["pred_score_2"]) >= 0.0
    correct = sum(r["pred_label"] == r["image"].split("/")[-2] for r in good)
    assert correct >= 4
    result = run_cli("predict", str(run.path), "--text", str(inputs / "blue" / "img_00.png"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["pred_label"] in ("red", "green", "blue")


def test_predict_on_a_labelled_table_keeps_its_columns_and_a_missing_image_column_names_the_key(timm_run, tmp_path):
    from finetune.errors import DataError
    from finetune.run.predictions import read_records

    _, run = timm_run
    write_colour_images(tmp_path / "new", per_class=1, seed=3)
    table = tmp_path / "new" / "labelled.csv"  # image paths relative to the table, the user's gold labels
    table.write_text("file,label,note\nred/img_00.png,red,a\nblue/img_00.png,blue,b\n")
    task, model, processor, _ = load_run(run.path)
    with pytest.raises(DataError) as error:
        read_records(task, table)
    message = str(error.value)
    assert "has no column 'image'" in message and "'file', 'label', 'note'" in message
    assert "`finetune predict RUN --set data.image_column=<column>`" in message and "--input image" not in message
    task, model, processor, _ = load_run(run.path, ["data.image_column=file"])
    with torch.no_grad():
        rows = task.predict(model, processor, read_records(task, table))
    assert [(r["label"], r["note"]) for r in rows] == [("red", "a"), ("blue", "b")]  # kept as they were
    assert [r["file"] for r in rows] == [str(tmp_path / "new" / c / "img_00.png") for c in ("red", "blue")]
    assert all(r["pred_label"] in ("red", "green", "blue") for r in rows)


def test_timm_name_resolves_from_the_local_hugging_face_cache(vision_recipe, tiny_timm_cnn, tmp_path):
    """`timm/<name>` comes from the HF cache (offline) when a timm checkpoint was downloaded there."""
    import shutil

    snapshot = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_timm_cnn, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    recipe = vision_recipe(backbone="timm/test_efficientnet.r160_in1k")
    result = run_cli("validate", str(recipe), env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0, result.stderr
    assert "Hugging Face cache" in result.stdout and "pixel_values: (8, 3, 32, 32) float32" in result.stdout
