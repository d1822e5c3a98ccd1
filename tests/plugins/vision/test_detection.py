"""object-detection: the three annotation layouts and their errors, box-moving augmentations, COCO metrics
on hand-made cases, and (tiny random timm backbone) training, predict, --draw, the card's snippet."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import run_cli
from detection_fixtures import detection_recipe, square_scenes, write_coco, write_voc, write_yolo
from vision_fixtures import tiny_timm_cnn  # noqa: F401 - fixture

from finetune import DataError
from finetune_vision.detection_data import read_detection


def _boxes(data):
    return {(e.image.rsplit("/", 1)[-1].rsplit(".", 1)[0]): (e.width, e.height,
            [[round(v, 3) for v in b] for b in e.boxes], e.labels) for e in data.examples}


# ---------------------------------------------------------------------------------------------------- formats

def test_coco_yolo_and_voc_read_into_the_same_examples(tmp_path):
    scenes = square_scenes(10)
    coco = read_detection(write_coco(tmp_path / "coco", scenes, classes=("blue", "red")), "data.train")
    yolo = read_detection(write_yolo(tmp_path / "yolo", scenes, classes=("blue", "red")), "data.train")
    voc = read_detection(write_voc(tmp_path / "voc", scenes), "data.train")
    assert (coco.layout, yolo.layout, voc.layout) == ("coco", "yolo", "voc")
    expected = {s["name"]: (64, 48, [[float(v) for v in b] for b in s["boxes"]], s["labels"]) for s in scenes}
    assert _boxes(coco) == _boxes(yolo) == _boxes(voc) == expected
    assert any(not e.boxes for e in coco.examples)  # negatives kept
    # class order: the data set's own (COCO ids, YOLO names), VOC sorted
    assert coco.classes == yolo.classes == ["blue", "red"] and voc.classes == ["blue", "red"]
    assert read_detection(write_yolo(tmp_path / "y2", scenes, classes=("red", "blue"), names_file="classes.txt"),
                          "k").classes == ["red", "blue"]
    # a folder holding one json is COCO; images from data.images
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "coco" / "images"), str(moved / "images"))
    with pytest.raises(DataError, match="scene_000.png not found"):
        read_detection(tmp_path / "coco", "data.train")
    assert _boxes(read_detection(tmp_path / "coco", "data.train", images=moved)) == expected


def test_voc_image_set_lists_and_yolo_class_list_from_the_recipe(tmp_path):
    scenes = square_scenes(8)
    root = write_voc(tmp_path / "voc", scenes, lists={"train": [0, 1, 2, 3, 4], "val": [5, 6, 7]})
    train = read_detection(root / "ImageSets" / "Main" / "train.txt", "data.train")
    val = read_detection(root / "ImageSets" / "Main" / "val.txt", "data.eval")
    assert [e.image.rsplit("/", 1)[-1] for e in val.examples] == ["scene_005.png", "scene_006.png", "scene_007.png"]
    assert len(train.examples) == 5
    yolo = write_yolo(tmp_path / "yolo", scenes, names_file="none")
    with pytest.raises(DataError, match="names no classes"):
        read_detection(yolo, "data.train")
    assert read_detection(yolo, "data.train", classes=["red", "blue"]).classes == ["red", "blue"]


def _break(kind: str, tmp_path):
    """A data path with one defect, and the words its error must contain."""
    scenes = square_scenes(4)
    scenes[1]["boxes"] = [[10, 10, 30, 30]]
    scenes[1]["labels"] = ["red"]
    if kind == "coco-outside":
        scenes[1]["boxes"] = [[40, 10, 80, 30]]
        return write_coco(tmp_path, scenes), ["image id 2", "outside the 64x48 image"]
    if kind == "coco-negative":
        path = write_coco(tmp_path, scenes)
        doc = json.loads(path.read_text())
        next(a for a in doc["annotations"] if a["image_id"] == 2)["bbox"] = [10, 10, -5, 8]
        path.write_text(json.dumps(doc))
        return path, ["annotations[", "zero or negative size"]
    if kind == "coco-category":
        path = write_coco(tmp_path, scenes)
        doc = json.loads(path.read_text())
        doc["annotations"][0]["category_id"] = 7
        path.write_text(json.dumps(doc))
        return path, ["annotations[0]", "unknown category id 7", "1=red"]
    if kind == "coco-no-file":
        path = write_coco(tmp_path, scenes)
        (tmp_path / "images" / "scene_002.png").unlink()
        return path, ["image id 3 (images/scene_002.png)", "not found"]
    if kind == "coco-unreadable":
        (tmp_path / "a.json").write_text("{not json")
        return tmp_path / "a.json", ["a.json cannot be read"]
    if kind == "yolo-outside":
        root = write_yolo(tmp_path, scenes)
        (root / "labels" / "scene_001.txt").write_text("0 0.95 0.5 0.2 0.2\n")
        return root, ["scene_001.txt: line 1", "outside the image"]
    if kind == "yolo-class":
        root = write_yolo(tmp_path, scenes)
        (root / "labels" / "scene_001.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n")
        return root, ["scene_001.txt: line 2", "unknown class id 3"]
    if kind == "yolo-negative":
        root = write_yolo(tmp_path, scenes)
        (root / "labels" / "scene_001.txt").write_text("0 0.5 0.5 0 0.2\n")
        return root, ["scene_001.txt: line 1", "must be positive"]
    if kind == "yolo-no-image":
        root = write_yolo(tmp_path, scenes)
        (root / "images" / "scene_001.png").unlink()
        return root, ["label file(s) without an image", "scene_001.txt"]
    if kind == "voc-outside":
        scenes[1]["boxes"] = [[10, 30, 30, 60]]
        return write_voc(tmp_path, scenes), ["scene_001.xml: object 1 (red)", "outside the 64x48 image"]
    if kind == "voc-negative":
        scenes[1]["boxes"] = [[30, 10, 20, 30]]
        return write_voc(tmp_path, scenes), ["scene_001.xml: object 1 (red)", "zero or negative size"]
    if kind == "voc-no-file":
        root = write_voc(tmp_path, scenes)
        (root / "JPEGImages" / "scene_002.png").unlink()
        return root, ["scene_002.xml", "is not in"]
    if kind == "voc-size":
        root = write_voc(tmp_path, scenes)
        from PIL import Image

        Image.new("RGB", (128, 96)).save(root / "JPEGImages" / "scene_002.png")  # re-saved larger than annotated
        return root, ["scene_002.xml", "image size 64x48", "is 128x96"]
    if kind == "coco-size":
        path = write_coco(tmp_path, scenes)
        doc = json.loads(path.read_text())
        doc["images"][0]["width"] = 640
        path.write_text(json.dumps(doc))
        return path, ["image id 1 (images/scene_000.png)", "image size 640x48", "is 64x48"]
    if kind == "voc-unreadable":
        root = write_voc(tmp_path, scenes)
        (root / "Annotations" / "scene_003.xml").write_text("<annotation><object>")
        return root, ["scene_003.xml cannot be read"]
    if kind == "ambiguous":
        write_voc(tmp_path, scenes)
        write_yolo(tmp_path, scenes)
        return tmp_path, ["both a Pascal VOC folder", "YOLO"]
    if kind == "unknown":
        (tmp_path / "pictures").mkdir()
        return tmp_path, ["cannot tell the annotation layout"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["coco-outside", "coco-negative", "coco-category", "coco-no-file", "coco-unreadable",
                                  "yolo-outside", "yolo-class", "yolo-negative", "yolo-no-image", "voc-outside",
                                  "voc-negative", "voc-no-file", "voc-unreadable", "voc-size", "coco-size",
                                  "ambiguous", "unknown"])
def test_bad_annotations_name_the_file_and_object(kind, tmp_path):
    path, words = _break(kind, tmp_path)
    with pytest.raises(DataError) as info:
        read_detection(path, "data.train")
    message = str(info.value)
    assert message.startswith("data.train: ")
    for word in words:
        assert word in message, (word, message)


def test_eval_classes_unknown_to_training_are_refused_before_the_run(tmp_path, tiny_timm_cnn):  # noqa: F811
    from finetune.run.session import open_session

    scenes = square_scenes(10)
    train = write_voc(tmp_path / "train", scenes)
    odd = square_scenes(3, seed=5)
    odd[0]["labels"] = ["green"] * len(odd[0]["boxes"])
    odd[0]["boxes"] = odd[0]["boxes"] or [[1, 1, 9, 9]]
    odd[0]["labels"] = ["green"] * len(odd[0]["boxes"])
    evaluation = write_voc(tmp_path / "eval", odd)
    recipe = detection_recipe(tmp_path / "r.toml", tiny_timm_cnn, train, tmp_path / "run",
                              data=f'eval = "{evaluation}"')
    with pytest.raises(DataError, match=r"data.eval: .*\['green'\] never appear in the training data"):
        open_session(recipe)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- transforms

def test_a_flipped_box_still_covers_its_bright_square(tmp_path):
    import numpy as np
    from torchvision.transforms import v2

    from finetune_vision.detection import DetectionDataset
    from finetune_vision.detection_data import DetectionExample

    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[8:20, 5:17] = 255  # a bright square near the top-left corner
    from PIL import Image

    Image.fromarray(pixels).save(tmp_path / "a.png")
    example = DetectionExample(str(tmp_path / "a.png"), 64, 48, [[5.0, 8.0, 17.0, 20.0]], ["white"])

    class Options:
        image_size, hflip, vflip, color_jitter = 128, True, True, 0.0

    dataset = DetectionDataset([example], ["white"], Options(), training=True)
    dataset.augment = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0)])  # always flip
    item = dataset[0]
    image, (x1, y1, x2, y2) = item["pixel_values"], item["boxes"][0].tolist()
    assert image.shape == (3, 96, 128) and item["scale_xy"] == (2.0, 2.0)
    assert (x1, y1, x2, y2) == (128 - 34, 96 - 40, 128 - 10, 96 - 16)  # moved to the bottom-right corner
    bright = (image.mean(0) > 0.5).nonzero()
    assert bright[:, 1].min() >= x1 and bright[:, 1].max() < x2 and bright[:, 0].min() >= y1 and bright[:, 0].max() < y2
    assert float(image[:, int(y1):int(y2), int(x1):int(x2)].mean()) > 0.95  # the box is filled by the square
    assert item["reference"]["boxes"] == [[5.0, 8.0, 17.0, 20.0]]  # metrics use the original box


# ---------------------------------------------------------------------------------------------------- metrics

def _ref(boxes, labels):
    return {"boxes": boxes, "labels": labels, "width": 100, "height": 100}


def _pred(boxes, labels, scores=None):
    return {"boxes": boxes, "labels": labels, "scores": scores or [0.9] * len(boxes)}


def test_coco_map_on_hand_made_cases():
    from finetune_vision.detection_model import coco_metrics

    classes = ["cat", "dog"]
    a, b, c = [10, 10, 40, 40], [50, 50, 90, 80], [5, 60, 30, 95]
    refs = [_ref([a, b], [0, 1]), _ref([c], [0])]
    perfect = coco_metrics([_pred([a, b], [0, 1]), _pred([c], [0])], refs, classes)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert perfect["per_class"]["dog"] == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "boxes": 1}
    # one of the two cats missed: recall stops at 1/2 with precision 1 -> 51 of COCO's 101 recall points
    missed = coco_metrics([_pred([a, b], [0, 1]), _pred([], [])], refs, classes)
    assert missed["per_class"]["cat"]["ap"] == pytest.approx(51 / 101)
    assert missed["map"] == pytest.approx((51 / 101 + 1) / 2)
    # the dog box called a cat: no dog found (AP 0); the cat's AP: detections sorted by score, the wrong one
    # (score 0.95) first -> precision 1/2 at recall 1/2 and 2/3 at recall 1 -> 51 points at 2/3 + 50 at 2/3
    wrong = coco_metrics([_pred([a, b], [0, 0], [0.9, 0.95]), _pred([c], [0])], refs, classes)
    assert wrong["per_class"]["dog"]["ap"] == 0.0
    assert wrong["per_class"]["cat"]["ap"] == pytest.approx(2 / 3)
    assert wrong["map"] == pytest.approx(1 / 3)
    # a box at IoU 0.58 with its reference counts at thresholds 0.5 and 0.55 only: AP 2/10 over the ten
    shifted = [10, 10, 40, 10 + 30 / 0.58]  # IoU = 30*30 / (30 * 30/0.58) = 0.58
    one = coco_metrics([_pred([shifted], [0])], [_ref([a], [0])], classes)
    assert one["map50"] == pytest.approx(1.0) and one["map"] == pytest.approx(0.2) and one["map75"] == 0.0
    assert one["per_class"]["dog"]["ap"] is None  # no dog reference: not counted
    nothing = coco_metrics([_pred([], [])], [_ref([a], [0])], classes)
    assert nothing["map"] == 0.0 and nothing["detections"] == 0 and math.isclose(nothing["mar100"], 0.0)


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def detection_run(tmp_path_factory, tiny_timm_cnn):  # noqa: F811
    """A LoRA run on COCO squares (test split in VOC layout), trained in-process on the tiny random CNN."""
    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    folder = tmp_path_factory.mktemp("detection-run")
    coco = write_coco(folder / "coco", square_scenes(24))
    voc = write_voc(folder / "voc", square_scenes(6, seed=3))
    recipe = detection_recipe(folder / "recipe.toml", tiny_timm_cnn, coco, folder / "run",
                              data=f'test = "{voc}"\nvflip = true\ncolor_jitter = 0.2', task="score_threshold = 0.0")
    run_recipe(recipe, [], console=Console(quiet=True))
    return folder


def test_trains_evaluates_predicts_in_original_pixels_and_draws(detection_run, tmp_path):
    from PIL import Image

    run = detection_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for part in ("before", "best", "test"):
        assert 0.0 <= metrics[part]["map"] <= 1.0 and "map50" in metrics[part], part
    assert metrics["before"]["reference_boxes"] == metrics["best"]["reference_boxes"] > 0
    assert set(metrics["best_details"]["per_class"]) == {"red", "blue"}
    state = json.loads((run / "adapter" / "finetune_task.json").read_text())["state"]
    assert state["classes"] == ["red", "blue"] and state["head"] == "fcos"
    # an image twice the training size: boxes come back in its own pixels
    big = tmp_path / "in"
    big.mkdir()
    scene = square_scenes(1, seed=9)[0]
    Image.fromarray(scene["pixels"]).resize((128, 96)).save(big / "big.png")
    shutil.copy(detection_run / "coco" / "images" / "scene_000.png", big / "small.png")
    out, drawn = tmp_path / "pred.jsonl", tmp_path / "drawn"
    result = run_cli("predict", str(run), "--input", str(big), "--output", str(out), "--draw", str(drawn))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {json.loads(line)["image"].rsplit("/", 1)[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(rows) == {"big.png", "small.png"}
    for name, (width, height) in (("big.png", (128, 96)), ("small.png", (64, 48))):
        row = rows[name]
        assert len(row["pred_boxes"]) == len(row["pred_labels"]) == len(row["pred_scores"]) > 0
        assert set(row["pred_labels"]) <= {"red", "blue"} and row["pred_scores"] == sorted(row["pred_scores"])[::-1]
        assert all(-0.1 <= x1 < x2 <= width + 0.1 and -0.1 <= y1 < y2 <= height + 0.1
                   for x1, y1, x2, y2 in row["pred_boxes"])
        picture = Image.open(drawn / f"{name.split('.')[0]}.png")
        assert picture.size == (width, height)
        assert picture.convert("RGB").tobytes() != Image.open(big / name).convert("RGB").tobytes()  # boxes drawn
    # the same input scaled x2 gives boxes scaled x2 (within resampling noise) for the top box
    same = run_cli("predict", str(run), "--input", str(big / "small.png"))
    assert json.loads(same.stdout.splitlines()[-1])["pred_boxes"] == rows["small.png"]["pred_boxes"]


def test_draw_predictions_marks_each_box_in_its_class_colour(tmp_path, detection_run):
    from PIL import Image

    from finetune.run.inference import load_run

    task = load_run(detection_run / "run")[0]
    Image.new("RGB", (64, 48), (0, 0, 0)).save(tmp_path / "black.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "black.png").write_bytes(b"taken")  # never overwritten
    rows = [{"image": str(tmp_path / "black.png"), "pred_boxes": [[10, 10, 30, 40]], "pred_labels": ["blue"],
             "pred_scores": [0.9]}]
    written = task.draw_predictions(rows, tmp_path / "out")
    assert written == [tmp_path / "out" / "black-2.png"]
    pixels = Image.open(written[0]).convert("RGB")
    colour = pixels.getpixel((10, 25))  # on the left edge of the box
    assert colour != (0, 0, 0) and colour == pixels.getpixel((30, 25)) and pixels.getpixel((20, 35)) == (0, 0, 0)


def test_card_snippet_rebuilds_the_detector_with_plain_code(detection_run, tiny_timm_cnn, monkeypatch, capsys):  # noqa: F811
    from PIL import Image

    run = detection_run / "run"
    card = (run / "README.md").read_text()
    assert "FeaturePyramidNetwork" in card and "PeftModel.from_pretrained" in card
    import tomllib

    from finetune.run.inference import load_run

    task = load_run(run)[0]
    snippet = task.usage_snippet(str(tiny_timm_cnn))
    assert tomllib.loads((run / "recipe.toml").read_text())["task"]["head"] == "fcos"
    Image.open(detection_run / "coco" / "images" / "scene_001.png").save(run / "image.jpg", format="PNG")
    monkeypatch.chdir(run)
    capsys.readouterr()
    exec(snippet, {})  # noqa: S102 - our own card code, as a user runs it
    printed = [line.split(" ", 2) for line in capsys.readouterr().out.strip().splitlines()]
    predicted = run_cli("predict", str(run), "--input", str(run / "image.jpg"))
    row = json.loads(predicted.stdout.splitlines()[-1])
    assert len(printed) == len(row["pred_boxes"]) > 0
    for (label, score, box), want_label, want_score, want_box in zip(printed, row["pred_labels"], row["pred_scores"],
                                                                     row["pred_boxes"]):
        assert label == want_label and float(score) == pytest.approx(want_score, abs=2e-3)
        assert json.loads(box) == pytest.approx(want_box, abs=0.15)


def test_two_processes_train_and_the_pushed_run_predicts_as_the_folder(tmp_path, tiny_timm_cnn, monkeypatch):  # noqa: F811
    """A 2-process run (YOLO data; ragged per-image predictions gathered for the metric), pushed to a local
    Hub server, pulled and predicted by id: the same boxes as from the run folder."""
    from hub_server import HubServer

    from finetune.engine.run_folder import RunDir
    from finetune.run.hub import parse_front_matter, push_run

    yolo = write_yolo(tmp_path / "yolo", square_scenes(20))
    recipe = detection_recipe(tmp_path / "r.toml", tiny_timm_cnn, yolo, tmp_path / "run", task="score_threshold = 0.0")
    token = "hf_test_secret_token_123"
    with HubServer(token) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf-home")}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        trained = run_cli("run", str(recipe), "--num-processes", "2", env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert RunDir(tmp_path / "run").info()["processes"] == 2
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        held_out = metrics["data"]["eval_examples"]
        boxes = sum(len(s["boxes"]) for s in square_scenes(20))
        assert 0 < metrics["best"]["reference_boxes"] < boxes and held_out == 5  # each eval image once
        push_run(tmp_path / "run", "me/squares")
        meta = parse_front_matter(hub.state.repos["me/squares"].branches["main"][-1]["files"]["README.md"].decode())
        assert meta["pipeline_tag"] == "object-detection" and meta["library_name"] == "peft"
        image = str(yolo / "images" / "scene_003.png")
        from_hub = run_cli("predict", "me/squares", "--input", image, env=env)
        from_run = run_cli("predict", str(tmp_path / "run"), "--input", image)
        assert from_hub.returncode == 0, from_hub.stderr[-2000:]
        hub_row, run_row = json.loads(from_hub.stdout.splitlines()[-1]), json.loads(from_run.stdout.splitlines()[-1])
        assert hub_row["pred_boxes"] == run_row["pred_boxes"] and len(run_row["pred_boxes"]) > 0


@pytest.mark.parametrize("method", ["none", "full"])
def test_probe_and_full_training_reload_and_predict_from_a_table(method, tmp_path, tiny_timm_cnn):  # noqa: F811
    """peft.method "none" trains only the FPN and head (backbone untouched), "full" everything (BatchNorm
    statistics included); both reload from trained.safetensors and predict from a CSV of relative paths."""
    import torch

    from finetune.engine.console import Console
    from finetune.run.inference import load_run
    from finetune.run.training import run_recipe

    voc = write_voc(tmp_path / "voc", square_scenes(12))
    recipe = detection_recipe(tmp_path / "r.toml", tiny_timm_cnn, voc, tmp_path / "run", peft=f'method = "{method}"',
                              task="score_threshold = 0.0")
    run_recipe(recipe, [], console=Console(quiet=True))
    assert (tmp_path / "run" / "adapter" / "trained.safetensors").is_file()
    task, model, _, _ = load_run(tmp_path / "run")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / "trained.safetensors"))
    body = [k for k in saved if k.startswith("backbone.body.")]
    assert (not body) if method == "none" else any(k.endswith("running_mean") for k in body)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    (tmp_path / "table.csv").write_text("image,note\nvoc/JPEGImages/scene_001.png,a\nvoc/JPEGImages/missing.png,b\n")
    rows = task.predict(model, None, task.read_predict_input(tmp_path / "table.csv"), batch_size=4)
    assert [r["note"] for r in rows] == ["a", "b"] and rows[0]["pred_boxes"] and "pred_error" not in rows[0]
    assert rows[1]["pred_boxes"] == [] and "FileNotFoundError" in rows[1]["pred_error"]
