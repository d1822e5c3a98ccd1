"""`finetune init` on image data: class folders, image tables (one or several labels), COCO / YOLO / VOC
detection layouts, image + mask folders (the vision plugin's claims)."""

from __future__ import annotations

import json

from conftest import write_csv
from detection_fixtures import square_scenes, write_coco, write_voc, write_yolo
from init_fixtures import init_and_read
from segmentation_fixtures import write_disc_pairs
from vision_fixtures import write_colour_images


def test_class_folders_are_image_classification(tmp_path):
    write_colour_images(tmp_path / "pics", per_class=2, size=8)
    recipe, said = init_and_read(tmp_path / "pics", tmp_path / "r.toml")
    assert recipe["task"]["name"] == "image-classification" and recipe["data"]["train"] == "pics"
    assert recipe["model"]["backbone"] == "mobilenetv2_100.tv_in1k" and recipe["data"]["split"] == 0.2
    assert any("3 sub-folders of images (6 images)" in s for s in said)
    write_colour_images(tmp_path / "split" / "train", per_class=2, size=8)
    write_colour_images(tmp_path / "split" / "val", per_class=1, size=8)
    recipe, _ = init_and_read(tmp_path / "split", tmp_path / "s.toml")
    assert (recipe["data"]["train"], recipe["data"]["eval"]) == ("split/train", "split/val")


def test_image_tables(tmp_path):
    write_colour_images(tmp_path / "img", per_class=4, size=8)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "img").rglob("*.png"))
    multi = write_csv(tmp_path / "multi.csv", [{"file": f, "labels": "a,b" if i % 2 else "c"}
                                               for i, f in enumerate(files)])
    recipe, _ = init_and_read(multi, tmp_path / "m.toml")
    assert recipe["task"]["name"] == "multi-label-image-classification"
    assert (recipe["data"]["image_column"], recipe["data"]["label_column"]) == ("file", "labels")
    single = write_csv(tmp_path / "single.csv", [{"image": f, "label": f.split("/")[1]} for f in files])
    recipe, _ = init_and_read(single, tmp_path / "s.toml")
    assert recipe["task"]["name"] == "image-classification" and recipe["data"]["image_column"] == "image"
    # image names whose files are not there are no images (e.g. SNLI's Flickr ids): a text task's data
    missing = write_csv(tmp_path / "ids.csv", [{"image": f"x/{i}.jpg", "label": "a"} for i in range(9)])
    assert not _claims_of(missing, "vision")


def _claims_of(path, plugin):
    from finetune import DataProbe
    from finetune.engine.plugins import get_registry

    return [c for c in get_registry().claims(DataProbe(path)) if c.plugin == plugin]


def test_detection_layouts(tmp_path):
    scenes = square_scenes(6)
    voc = write_voc(tmp_path / "voc", scenes, lists={"train": [0, 1, 2, 3], "val": [4, 5]})
    recipe, said = init_and_read(voc, tmp_path / "voc.toml")
    assert recipe["task"]["name"] == "object-detection"
    assert recipe["data"]["train"] == "voc/ImageSets/Main/train.txt"
    assert recipe["data"]["eval"] == "voc/ImageSets/Main/val.txt" and recipe["data"]["image_size"] == 64
    assert any("Pascal VOC folder" in s for s in said)
    coco = write_coco(tmp_path / "coco", scenes)
    recipe, _ = init_and_read(coco, tmp_path / "coco.toml")
    assert recipe["task"]["name"] == "object-detection" and recipe["data"]["train"] == "coco/annotations.json"
    recipe, _ = init_and_read(tmp_path / "coco", tmp_path / "coco2.toml")  # the folder holding it
    assert recipe["task"]["name"] == "object-detection"
    yolo = write_yolo(tmp_path / "yolo", scenes)
    recipe, _ = init_and_read(yolo, tmp_path / "yolo.toml")
    assert recipe["task"]["name"] == "object-detection" and "classes" not in recipe["data"]  # data.yaml has them


def test_images_and_masks_are_segmentation(tmp_path):
    write_disc_pairs(tmp_path / "cells" / "train", count=3, size=40)
    write_disc_pairs(tmp_path / "cells" / "val", count=2, size=40)
    recipe, said = init_and_read(tmp_path / "cells", tmp_path / "r.toml")
    assert recipe["task"]["name"] == "semantic-segmentation"
    assert (recipe["data"]["train"], recipe["data"]["eval"]) == ("cells/train", "cells/val")
    assert recipe["data"]["image_size"] == 32
    assert not any("image-classification" in s for s in said)  # images/ and masks/ are not two classes
    assert json.dumps(recipe)
