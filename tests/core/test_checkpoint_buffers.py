"""Checkpoints and the weights of peft.method = "none" hold the trained modules' persistent buffers (a
training BatchNorm's running statistics), so that a resumed run continues from the same statistics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from finetune.contract.callbacks import LoopState
from finetune.engine.checkpoint import load_checkpoint, save_rng_state, trainable_state_dict, trained_buffer_names
from finetune.errors import RunError


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    for p in net[:2].parameters():  # a frozen conv + BatchNorm, then a trained pair
        p.requires_grad_(False)
    net.register_buffer("scratch", torch.zeros(1), persistent=False)
    net[3].register_buffer("not_saved", torch.zeros(2), persistent=False)
    return net


def test_buffers_of_trained_modules_only():
    assert trained_buffer_names(model()) == ["3.running_mean", "3.running_var", "3.num_batches_tracked"]


def test_checkpoint_round_trips_running_statistics(tmp_path):
    net = model()
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 3, 8, 8))  # the trained BatchNorm's statistics move
    weights = trainable_state_dict(net)
    assert set(weights) == {"2.weight", "2.bias", "3.weight", "3.bias", "3.running_mean", "3.running_var",
                            "3.num_batches_tracked"}
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "trainable.safetensors"))
    save_rng_state(tmp_path / "rng.pt")
    (tmp_path / "loop_state.json").write_text(json.dumps(LoopState().to_json()))
    fresh = model()
    assert not torch.equal(fresh[3].running_mean, net[3].running_mean)
    load_checkpoint(tmp_path, fresh, None, None)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fresh[3], name), getattr(net[3], name)), name
    assert torch.equal(fresh[1].running_mean, torch.zeros(4))  # the frozen one is not in the checkpoint


def test_checkpoint_with_a_tensor_the_model_lacks_is_refused(tmp_path):
    from safetensors.torch import save_file

    weights = trainable_state_dict(model())
    weights["5.running_mean"] = torch.zeros(4)
    save_file(weights, str(tmp_path / "trainable.safetensors"))
    with pytest.raises(RunError, match="5.running_mean"):
        load_checkpoint(tmp_path, model(), None, None)
