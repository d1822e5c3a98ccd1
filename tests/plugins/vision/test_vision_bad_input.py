"""Bad vision input: clear errors before the run folder exists (or a listed skip), odd image modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from vision_fixtures import *  # noqa: F403 - the vision fixtures
from vision_fixtures import write_colour_images

from finetune.engine.console import Console
from finetune.errors import DataError, RecipeError, RunError
from finetune.run.session import open_session
from finetune.run.training import run_recipe
from finetune_vision.images import to_rgb


def assert_cli_error(result, *fragments: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_empty_class_folder_is_named(vision_recipe, colour_folder, tmp_path):
    (colour_folder / "purple").mkdir()
    (colour_folder / "purple" / "notes.txt").write_text("not an image")
    recipe = vision_recipe()
    result = run_cli("run", str(recipe))
    assert_cli_error(result, "data.train", "['purple']", "hold no image files")
    assert not (tmp_path / "run").exists()


def test_single_class_and_no_subfolders(vision_recipe, tmp_path):
    one = write_colour_images(tmp_path / "one", classes={"red": (200, 0, 0)}, per_class=4)
    with pytest.raises(DataError, match="only one class"):
        open_session(vision_recipe(data=f'train = "{one}"'))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(DataError, match="no class subfolders.*a.png"):
        open_session(vision_recipe(data=f'train = "{flat}"', name="flat.toml"))
    with pytest.raises(DataError, match="folder not found.*nowhere"):
        open_session(vision_recipe(data=f'train = "{tmp_path / "nowhere"}"', name="nowhere.toml"))
    with pytest.raises(RecipeError, match="data.train: required"):
        open_session(vision_recipe(data='train = ""', name="empty.toml"))


def test_unreadable_images_fail_or_skip_by_option(vision_recipe, colour_folder, tmp_path):
    (colour_folder / "red" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (colour_folder / "blue" / "empty.jpg").write_bytes(b"")
    result = run_cli("run", str(vision_recipe()))
    assert_cli_error(result, "2 of 50 image(s) are missing or unreadable", "truncated.png", "empty.jpg",
                     'data.on_bad_image = "skip"')
    assert not (tmp_path / "run").exists()
    session = open_session(vision_recipe(data='on_bad_image = "skip"', name="skip.toml"))
    skipped = session.splits.info["skipped_images"]
    assert sorted(p.rsplit("/", 1)[-1] for p in skipped) == ["empty.jpg", "truncated.png"]
    assert len(session.splits.train) + len(session.splits.eval) == 48


def test_missing_files_in_a_table_are_reported(vision_recipe, colour_folder):
    table = colour_folder / "list.csv"
    table.write_text("image,label\nred/img_00.png,red\nred/gone.png,red\nblue/img_00.png,blue\n")
    with pytest.raises(DataError, match=r"1 of 3 image\(s\).*gone.png \(file not found\)"):
        open_session(vision_recipe(data=f'train = "{table}"'))
    with pytest.raises(DataError, match="'path' not found"):
        open_session(vision_recipe(data=f'train = "{table}"\nimage_column = "path"', name="col.toml"))


def test_eval_class_missing_from_training(vision_recipe, tmp_path):
    train = write_colour_images(tmp_path / "tr", classes={"red": (200, 0, 0), "blue": (0, 0, 200)}, per_class=4)
    eval_ = write_colour_images(tmp_path / "ev", per_class=2)
    with pytest.raises(DataError, match=r"classes \['green'\] appear in the eval data but never in training"):
        open_session(vision_recipe(data=f'train = "{train}"\neval = "{eval_}"'))


def test_image_mode_surprises_become_sensible_rgb(tmp_path):
    grey = Image.fromarray(np.full((4, 4), 100, np.uint8), "L")
    assert to_rgb(grey).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: composited on white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    assert to_rgb(half).getpixel((0, 0)) == (0, 0, 0)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    # a 16-bit greyscale PNG round-tripped through disk: scaled to 8 bits, not clipped to white
    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896], [65535, 1000]], dtype=np.uint16)).save(deep)
    with Image.open(deep) as im:
        im.load()
        assert im.mode in ("I;16", "I")
        rgb = to_rgb(im)
    assert rgb.mode == "RGB" and [rgb.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1))] == [0, 128, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 255, 0] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_mixed_image_modes_load_as_batches(vision_recipe, colour_folder):
    """Greyscale, RGBA, CMYK and 16-bit images in one dataset become ordinary RGB batches."""
    from finetune.run.session import build_model

    Image.new("L", (20, 20), 90).save(colour_folder / "red" / "grey.png")
    Image.new("RGBA", (20, 20), (40, 40, 200, 128)).save(colour_folder / "blue" / "alpha.png")
    Image.new("CMYK", (20, 20), (200, 0, 200, 0)).save(colour_folder / "green" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 50000, np.uint16)).save(colour_folder / "red" / "deep.png")
    session = open_session(vision_recipe(data="split = 0.1"))
    _, processor, _ = build_model(session)
    task = session.task
    ds = task.build_dataset(session.splits.train, processor, training=True)
    batch = task.collate_fn(processor)([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (len(ds), 3, 32, 32) and len(ds) + len(session.splits.eval) == 52
    assert bool(batch["pixel_values"].isfinite().all())


def test_resume_with_a_changed_number_of_classes_is_refused(vision_recipe, colour_folder, tmp_path):
    recipe = vision_recipe(train="epochs = 1\ncheckpoint_every_steps = 2")
    run = run_recipe(recipe, [], console=Console(quiet=True))
    info = json.loads(run.run_file.read_text())
    run.run_file.write_text(json.dumps({**info, "status": "interrupted"}))  # as after Ctrl-C
    write_colour_images(colour_folder, classes={"yellow": (220, 220, 30)}, per_class=16)
    with pytest.raises(RunError, match=r"does not fit the model.*classifier.*number of classes"):
        run_recipe(recipe, [], resume=True, console=Console(quiet=True))


def test_weightless_timm_architecture_needs_random_init(vision_recipe):
    from finetune.errors import BackboneError

    with pytest.raises(BackboneError, match="no pretrained weights.*task.init = \"random\""):
        from finetune.run.session import build_model

        build_model(open_session(vision_recipe(backbone="test_resnet")))
