"""Fast dropout masks on CPU (finetune.engine.fast_dropout, train.fast_dropout), and the speed settings
`finetune validate` reports."""

from __future__ import annotations

from conftest import run_cli

from finetune.engine.console import Console

QUIET = Console(enabled=False)


def test_speed_settings_are_reported_by_validate(make_recipe):
    shown = run_cli("validate", str(make_recipe()))
    assert shown.returncode == 0
    assert "speed setting:    train.group_by_length" in shown.stdout
    assert "speed setting:    train.fast_dropout" in shown.stdout
    assert "speed setting:    task.last_layer_cls_only" in shown.stdout
    from finetune.run.dry_run import dry_run

    info = dry_run(make_recipe(), ["train.group_by_length=false", "train.fast_dropout=false",
                                   "task.last_layer_cls_only=false"], QUIET)
    assert info["speed_settings"] == []


def test_fast_dropout_drops_p_scales_and_follows_torch_seed():
    import torch

    from finetune.engine.fast_dropout import fast_dropout_module

    drop = fast_dropout_module(0.1)
    x = torch.ones(200, 1000)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # expectation preserved
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded by torch's RNG: reproducible, exact resume
    assert not torch.equal(drop(x), y)  # and a new mask on every call
    drop.eval()
    assert torch.equal(drop(x), x)
    # gradients flow through the kept elements only, scaled
    drop.train()
    w = torch.ones(50, 40, requires_grad=True)
    torch.manual_seed(1)
    out = drop(w)
    out.sum().backward()
    assert torch.allclose(w.grad, (out != 0).float() / 0.9)


def test_fast_dropout_mask_is_the_documented_pcg64_draw():
    """The mask is a function of torch's RNG state only (seed -> PCG64 lanes >= round(p * 65536)), so a
    checkpoint resumes with the same masks whichever way the mask is built."""
    import numpy as np
    import torch

    from finetune.engine.fast_dropout import fast_dropout_module

    x = torch.randn(3, 7, 11)
    torch.manual_seed(7)
    y = fast_dropout_module(0.25)(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)))
    lanes = np.random.PCG64(seed).random_raw((x.numel() + 3) // 4).view(np.uint16)[:x.numel()]
    keep = torch.from_numpy(lanes >= 16384).view(x.shape)
    assert torch.equal(y, torch.where(keep, x * np.float32(1 / 0.75), torch.zeros_like(x)))


def test_fast_dropout_is_installed_on_cpu_and_reported(make_recipe):
    import torch

    from finetune.run.session import build_model, open_session

    session = open_session(make_recipe())
    model, _, report = build_model(session)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert kinds == {"FastDropout"} and report.fast_dropout_modules > 0
    lora_dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_dropouts and all(type(m).__name__ == "FastDropout" for m in lora_dropouts)
    off = open_session(make_recipe(train="fast_dropout = false"))
    model, _, report = build_model(off)
    assert report.fast_dropout_modules == 0
    assert {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {"Dropout"}
