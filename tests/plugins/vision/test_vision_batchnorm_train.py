"""BatchNorm layers that train (full fine-tuning): their running statistics are part of what a checkpoint
holds, so a run stopped and resumed ends exactly where an uninterrupted one does."""

from __future__ import annotations

from conftest import assert_resume_equals_uninterrupted
from vision_fixtures import *  # noqa: F401,F403  (fixtures)


def test_full_fine_tuning_resumes_with_its_batchnorm_statistics(vision_recipe, callback_plugin, tmp_path):
    from safetensors.torch import load_file

    settings = dict(peft='method = "full"', train="epochs = 3\ncheckpoint_every_steps = 2\nlog_every_steps = 1")
    full = vision_recipe(**settings, name="full.toml", output=str(tmp_path / "full"))
    cut = vision_recipe(**settings, name="cut.toml", output=str(tmp_path / "cut"))
    full_run, _ = assert_resume_equals_uninterrupted(callback_plugin, full, cut, stop_at=3)
    saved = load_file(str(full_run.adapter_dir / "trained.safetensors"))
    assert any(k.endswith("running_mean") for k in saved)
