"""semantic-segmentation: mask reading and its errors, joint transforms, metrics on hand-made cases, compact
masks and pictures, and a tiny end-to-end run (train, predict, draw, the card's plain-code snippet)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from segmentation_fixtures import *  # noqa: F403 - the segmentation fixtures
from segmentation_fixtures import write_disc_pairs

from finetune.engine.console import Console
from finetune.errors import DataError, RecipeError
from finetune.run.session import open_session
from finetune.run.training import run_recipe
from finetune_vision.segmentation_masks import (
    confusion,
    decode_masks,
    encode_masks,
    metrics_from_confusion,
)

# -- metrics -----------------------------------------------------------------------------------------------


def test_confusion_and_metrics_on_a_hand_made_case():
    # reference (rows) and prediction; 255 = ignored; class 3 appears in neither
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 2, 0, 1]])
    matrix = confusion(pred, target, 4, 255)
    assert matrix.tolist() == [[1, 1, 1, 0],   # reference 0: predicted 0, 1, 2 once each
                               [0, 2, 0, 0],   # reference 1: both right
                               [1, 0, 1, 0],   # reference 2: one right, one predicted 0
                               [0, 0, 0, 0]]
    m = metrics_from_confusion(matrix.numpy(), ["bg", "a", "b", "never"])
    # IoU: bg 1/(3+2-1)=1/4; a 2/(2+3-2)=2/3; b 1/(2+2-1)=1/3; "never" has no pixels in either: excluded
    assert m["per_class_iou"]["bg"] == pytest.approx(0.25)
    assert m["per_class_iou"]["a"] == pytest.approx(2 / 3)
    assert m["per_class_iou"]["b"] == pytest.approx(1 / 3)
    assert m["per_class_iou"]["never"] is None
    assert m["mean_iou"] == pytest.approx((0.25 + 2 / 3 + 1 / 3) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 7)  # the ignored pixel is not scored
    assert m["per_class_pixels"] == {"bg": 3, "a": 2, "b": 2, "never": 0}


def test_metrics_sum_confusions_of_examples_and_a_class_only_predicted_counts_as_zero():
    from finetune_vision.segmentation import SemanticSegmentation

    task = SemanticSegmentation.__new__(SemanticSegmentation)
    task.state = {"classes": ["bg", "fg", "other"], "ignore_index": 255}
    perfect = confusion(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), 3, 255)
    # second example: predicts "other" where the reference is background: class 2 is in the prediction only
    wrong = confusion(torch.tensor([[2, 1]]), torch.tensor([[0, 1]]), 3, 255)
    m = task.compute_metrics(torch.stack([perfect, wrong]).numpy(), np.array([2, 2]))
    assert m["per_class_iou"] == {"bg": 0.5, "fg": 1.0, "other": 0.0}
    assert m["mean_iou"] == pytest.approx(0.5) and m["pixel_accuracy"] == pytest.approx(0.75)


def test_loss_ignores_pixels_and_adds_dice_when_asked():
    from types import SimpleNamespace

    from finetune_vision.segmentation import SemanticSegmentation

    task = SemanticSegmentation.__new__(SemanticSegmentation)
    task.state = {"classes": ["bg", "fg"], "ignore_index": 255}
    task.recipe = SimpleNamespace(task=SimpleNamespace(dice_weight=0.0))
    labels = torch.tensor([[[0, 1], [1, 255]]])
    right = torch.tensor([[[[9.0, -9.0], [-9.0, 0.0]], [[-9.0, 9.0], [9.0, 0.0]]]])  # [1, 2, 2, 2]
    wrong_where_ignored = right.clone()
    wrong_where_ignored[0, :, 1, 1] = torch.tensor([-50.0, 50.0])
    ce = task._loss(right, labels)
    mild = right / 9  # margins of 2: each scored pixel's cross-entropy is softplus(-2)
    assert float(task._loss(mild, labels)) == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-2.0))))
    assert float(task._loss(wrong_where_ignored, labels)) == pytest.approx(float(ce))  # the ignored pixel: no loss
    all_ignored = torch.full_like(labels, 255)
    assert float(task._loss(right, all_ignored)) == 0.0  # not NaN
    task.recipe.task.dice_weight = 1.0
    assert float(task._loss(right, labels)) == pytest.approx(float(ce), abs=1e-4)  # perfect: Dice loss ~0
    flipped = -right  # every scored pixel wrong; the ignored one is left out of the Dice sums too
    # per class (2 * overlap + 1) / (predicted + reference pixels + 1): bg 1 / (2 + 1 + 1), fg 1 / (1 + 2 + 1)
    soft_dice = 1 - (1 / 4 + 1 / 4) / 2
    task.recipe.task.dice_weight = 0.0
    ce_flipped = float(task._loss(flipped, labels))
    task.recipe.task.dice_weight = 1.0
    assert float(task._loss(flipped, labels)) - ce_flipped == pytest.approx(soft_dice, abs=1e-3)


# -- transforms --------------------------------------------------------------------------------------------


def _transform(**options):
    from types import SimpleNamespace

    from finetune_vision.segmentation_data import SegmentationTransform

    opts = SimpleNamespace(**{"hflip": False, "vflip": False, "random_resized_crop": False, "crop_scale_min": 0.5,
                              **options})
    return SegmentationTransform({"input_size": 32, "interpolation": "bilinear", "mean": [0, 0, 0],
                                  "std": [1, 1, 1]}, True, opts)


@pytest.mark.parametrize("options", [{"hflip": True}, {"vflip": True},
                                     {"hflip": True, "random_resized_crop": True}])
def test_a_flipped_or_cropped_mask_still_covers_the_moved_object(options):
    """A bright square on the left (mask class 1 exactly there): after each random transform the mask's object
    pixels are the image's bright pixels; some draws flip it to the other side."""
    pixels = np.zeros((48, 48, 3), dtype=np.uint8)
    pixels[8:24, 2:18] = 255
    mask = np.zeros((48, 48), dtype=np.int64)
    mask[8:24, 2:18] = 1
    mask[40:, 40:] = 255  # an ignored corner stays 255 (nearest: never blended into another value)
    transform = _transform(**options)
    moved = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, out = transform(Image.fromarray(pixels), mask)
        assert out.dtype == torch.int64 and out.shape == (32, 32) and image.shape == (3, 32, 32)
        assert set(out.unique().tolist()) <= {0, 1, 255}
        bright = image.mean(0) > 0.5
        inside = out == 1
        if inside.any():  # the mask's object is on the image's object (up to the resized edges' blur)
            iou = (inside & bright).sum() / (inside | bright).sum()
            assert iou > 0.7, (seed, float(iou))
            centre = inside.nonzero().float().mean(0) - bright.nonzero().float().mean(0)
            assert centre.abs().max() < 1.0, (seed, centre)
        cols = inside.nonzero()[:, 1].float().mean() if inside.any() else torch.tensor(0.0)
        rows = inside.nonzero()[:, 0].float().mean() if inside.any() else torch.tensor(0.0)
        moved += bool(cols > 16) if options.get("hflip") else bool(rows > 16)
    assert moved >= 2  # the object did land on the other side in some draws


# -- compact masks and pictures ---------------------------------------------------------------------------


def test_rle_round_trip_and_fractions():
    mask = np.zeros((5, 7), dtype=np.int64)
    mask[1:3, 2:6] = 2
    mask[4, 0] = 1
    rles, fractions = encode_masks(mask, ["bg", "a", "b", "none"])
    assert set(rles) == {"bg", "a", "b"} and rles["b"]["size"] == [5, 7] and isinstance(rles["b"]["counts"], str)
    assert fractions == {"bg": 26 / 35, "a": 1 / 35, "b": 8 / 35, "none": 0.0}
    json.dumps(rles)
    assert (decode_masks(rles, ["bg", "a", "b", "none"], (5, 7)) == mask).all()
    from pycocotools import mask as coco  # what the card says: decode one class with pycocotools

    assert (coco.decode({"size": rles["b"]["size"], "counts": rles["b"]["counts"].encode()}) == (mask == 2)).all()


# -- data errors ---------------------------------------------------------------------------------------------


def test_palette_greyscale_16bit_and_rgb_greyscale_masks_read_as_indices(tmp_path):
    from finetune_vision.segmentation_data import read_mask

    values = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    p = Image.fromarray(values, "P")
    p.putpalette([9, 9, 9] * 256)  # the colours do not matter, the indices do
    p.save(tmp_path / "p.png")
    Image.fromarray(values, "L").save(tmp_path / "l.png")
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "i16.png")  # mode I;16
    Image.fromarray(np.stack([values] * 3, -1), "RGB").save(tmp_path / "grey_rgb.png")
    for name in ("p", "l", "i16", "grey_rgb"):
        assert read_mask(tmp_path / f"{name}.png").tolist() == values.tolist(), name
    colours = np.zeros((2, 2, 3), dtype=np.uint8)
    colours[0, 0] = (255, 0, 0)
    Image.fromarray(colours, "RGB").save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="not a class-index mask.*Image.fromarray"):
        read_mask(tmp_path / "rgb.png")


def _error(seg_recipe, folder, data: str = "", name: str = "seg.toml") -> str:
    with pytest.raises(DataError) as info:
        open_session(seg_recipe(folder=folder, data=data, name=name))
    return str(info.value)


def test_bad_pairs_are_named_before_the_run_folder_exists(seg_recipe, tmp_path):
    folder = write_disc_pairs(tmp_path / "d", count=6)
    # size mismatch: both sizes and both files
    Image.fromarray(np.zeros((30, 20), np.uint8), "L").save(folder / "masks" / "img_01.png")
    message = _error(seg_recipe, folder)
    assert "img_01.png is 20x30 but its image" in message and "40x40" in message and "data.train" in message
    write_disc_pairs(folder, count=6)  # repaired
    # a value outside the class list: the values and the file
    bad = np.zeros((40, 40), np.uint8)
    bad[0, 0], bad[1, 1] = 3, 7
    Image.fromarray(bad, "L").save(folder / "masks" / "img_02.png")
    message = _error(seg_recipe, folder)
    assert "img_02.png has value(s) [3, 7]" in message and "data.classes" in message
    # ... unless ignored
    assert "[7]" in _error(seg_recipe, folder, data="ignore_index = 3", name="ignore.toml")
    write_disc_pairs(folder, count=6)
    # an RGB colour mask: how to convert
    Image.fromarray(np.full((40, 40, 3), (200, 0, 0), np.uint8), "RGB").save(folder / "masks" / "img_03.png")
    message = _error(seg_recipe, folder)
    assert "img_03.png" in message and "not a class-index mask" in message and "Image.fromarray" in message
    write_disc_pairs(folder, count=6)
    # an unreadable image
    (folder / "images" / "img_04.png").write_bytes(b"not a png")
    message = _error(seg_recipe, folder)
    assert "img_04.png" in message and "unreadable" in message
    write_disc_pairs(folder, count=6)
    # an image without a mask and a mask without an image
    (folder / "masks" / "img_05.png").rename(folder / "masks" / "other.png")
    message = _error(seg_recipe, folder)
    assert "img_05.png" in message and "have no mask" in message and "other.png" in message
    assert "have no image" in message
    assert not (tmp_path / "run").exists()


def test_recipe_errors_and_class_lists(seg_recipe, tmp_path):
    folder = write_disc_pairs(tmp_path / "d", count=6, classes=3, palette=False)
    (tmp_path / "classes.txt").write_text("background\ndisc\nsquare\n")
    session = open_session(seg_recipe(folder=folder, data=f'classes_file = "{tmp_path / "classes.txt"}"\n'
                                                            "classes = []", name="file.toml"))
    assert session.task.state["classes"] == ["background", "disc", "square"]
    assert session.splits.info["train_class_pixels"]["square"] > 0
    # no class list: the values found
    import tomllib

    import tomli_w

    raw = seg_recipe(folder=folder, name="inferred.toml")
    recipe = tomllib.loads(raw.read_text())
    del recipe["data"]["classes"]
    raw.write_text(tomli_w.dumps(recipe))
    assert open_session(raw).task.state["classes"] == ["0", "1", "2"]
    # only images, no masks
    recipe = seg_recipe(folder=folder, name="images-only.toml")
    recipe.write_text(recipe.read_text().replace(f'train = "{folder}"', f'images = "{folder / "images"}"'))
    with pytest.raises(RecipeError, match="data.images is set without data.masks"):
        open_session(recipe)
    (tmp_path / "flat").mkdir()
    message = _error(seg_recipe, tmp_path / "flat", name="flat.toml")
    assert "no images/ and no masks/" in message


# -- end to end ----------------------------------------------------------------------------------------------


def test_tiny_run_predicts_draws_and_the_card_snippet_reproduces_it(seg_recipe, tmp_path):
    folder = write_disc_pairs(tmp_path / "pairs", count=12)
    run = run_recipe(seg_recipe(folder=folder), [], console=Console(quiet=True))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert set(metrics["best"]) >= {"mean_iou", "pixel_accuracy", "eval_loss"}
    assert set(metrics["best_details"]["per_class_iou"]) == {"background", "disc"}
    # eval pixels counted at each mask's own size (40 x 40), all 3 eval images once
    assert sum(metrics["best_details"]["per_class_pixels"].values()) == 3 * 40 * 40
    out = tmp_path / "pictures"
    image = folder / "images" / "img_00.png"
    result = run_cli("predict", str(run.path), "--input", str(folder / "images"), "--draw", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 12 and rows[0]["image"] == str(image) and rows[0]["pred_size"] == [40, 40]
    assert sum(rows[0]["pred_fractions"].values()) == pytest.approx(1.0)
    mask = decode_masks(rows[0]["pred_masks"], ["background", "disc"], (40, 40))
    drawn = Image.open(out / "img_00_mask.png")
    assert drawn.mode == "P" and (np.asarray(drawn) == mask).all()
    assert Image.open(out / "img_00_overlay.png").size == (40, 40)
    assert len(list(out.iterdir())) == 24
    # `finetune evaluate` scores a labelled folder (images/ + masks/) with the run: the same metric keys
    scored = run_cli("evaluate", str(run.path), "--input", str(folder))
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "mean_iou" in scored.stdout and "pixel_accuracy" in scored.stdout
    # the card's snippet: plain timm + torchvision + peft, same mask
    card = (run.path / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "finetune" not in snippet
    code = snippet.replace("'adapter'", repr(str(run.path / "adapter"))).replace("'image.png'", repr(str(image)))
    scope: dict = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - the card's own code
    assert (scope["mask"].numpy() == mask).all()
