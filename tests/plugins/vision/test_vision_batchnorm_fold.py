"""task.fold_batchnorm: frozen BatchNorms computed folded into the convolutions before them.

The fold must give the same function and the same LoRA gradients as the unfolded model (checked in float64,
where rounding cannot hide a wrong formula), leave the state dict and the adapter untouched, step aside when a
BatchNorm trains, and refuse a pair whose convolution output is used elsewhere too."""

from __future__ import annotations

import pytest
import torch
from vision_fixtures import *  # noqa: F401,F403  (fixtures)

from finetune.run.session import build_model, open_session
from finetune_vision.batchnorm_fold import fold_batchnorm


def _model(recipe):
    session = open_session(recipe)
    model, _, _ = build_model(session)
    return session.task, model


def _loss_and_grads(task, model, x):
    task.train_mode(model)
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks (the transformers MobileNetV2 has classifier dropout)
    loss = (task._logits(model, x).double() ** 2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone", ["timm", "transformers"])
@pytest.mark.parametrize("method", ["lora", "none"])
def test_folded_model_has_the_same_loss_and_gradients_in_float64(vision_recipe, tiny_hf_mobilenet, backbone, method):
    recipe = vision_recipe(backbone=tiny_hf_mobilenet if backbone == "transformers" else None,
                           peft=f'method = "{method}"', task="fold_batchnorm = false")
    task, model = _model(recipe)
    model.double()
    torch.manual_seed(1)
    for p in model.parameters():  # LoRA's B starts at zero; give every trained weight a value
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    for m in model.modules():  # statistics and affine parameters far from the identity
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.2)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads = _loss_and_grads(task, model, x)

    folded, found = fold_batchnorm(model, lambda: task._logits(model, x[:2]))
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert folded == found and folded >= bns - 1  # every BatchNorm fed by a convolution (all, in these models)
    assert folded > 3
    folded_loss, folded_grads = _loss_and_grads(task, model, x)
    assert folded_loss == pytest.approx(loss, rel=1e-12)
    assert set(folded_grads) == set(grads) and grads
    for name, grad in grads.items():
        assert torch.allclose(folded_grads[name], grad, rtol=1e-9, atol=1e-12 * grad.abs().max()), name
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_batchnorm_in_training_mode_is_computed_unfolded(vision_recipe):
    import copy

    task, model = _model(vision_recipe(task="fold_batchnorm = false"))
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    assert fold_batchnorm(model, lambda: task._logits(model, x[:2]))[0] > 3
    model.train(), plain.train()  # a plain train(): BatchNorm uses batch statistics, so nothing may be folded
    assert torch.allclose(task._logits(model, x), task._logits(plain, x), atol=1e-5)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(m.num_batches_tracked == 1 for m in bns)  # statistics updated, as unfolded BatchNorm does
    task.train_mode(model), task.train_mode(plain)  # eval-mode BatchNorm: folded again, same function
    assert torch.allclose(task._logits(model, x), task._logits(plain, x), atol=1e-5)


def test_a_convolution_output_used_twice_is_not_folded():
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    for p in (*conv.parameters(), *bn.parameters()):
        p.requires_grad_(False)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c  # the convolution's output also feeds the sum

    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    assert fold_batchnorm(net, lambda: net(x)) == (0, 1)
    assert "forward" not in conv.__dict__ and "forward" not in bn.__dict__
    assert torch.equal(net(x), expected)
    # the same pair without the second use folds
    net.forward = lambda x: net.bn(net.conv(x))
    assert fold_batchnorm(net, lambda: net(x)) == (1, 1)
    assert torch.allclose(net(x), type(bn).forward(bn, type(conv).forward(conv, x)), atol=1e-6)


def test_trainable_convolutions_or_batchnorms_are_not_folded(vision_recipe):
    task, model = _model(vision_recipe(peft='method = "full"', task="fold_batchnorm = false"))
    x = torch.randn(2, 3, 32, 32)
    assert fold_batchnorm(model, lambda: task._logits(model, x)) == (0, 0)


def test_runs_fold_by_default_and_say_so_and_the_option_turns_it_off(vision_recipe):
    from finetune.run.session import speed_settings

    for option, expect in (("", True), ("fold_batchnorm = false", False)):
        session = open_session(vision_recipe(task=option, name=f"r{expect}.toml"))
        model, _, report = build_model(session)
        task = session.task
        task.train_mode(model)
        task._logits(model, torch.randn(2, 3, 32, 32))
        assert bool(getattr(model, "_finetune_batchnorm_folded", 0)) is expect
        notes = speed_settings(task, session.recipe, [], report)
        assert any("task.fold_batchnorm" in n for n in notes) is expect
    session = open_session(vision_recipe(peft='method = "full"', name="full.toml"))
    assert not any("fold_batchnorm" in n for n in speed_settings(session.task, session.recipe, [], None))


def test_disabled_or_merged_lora_after_the_fold_computes_the_right_function(vision_recipe):
    """disable_adapter switches LoRA off, merge_and_unload replaces each LoRA convolution by its merged base:
    both must give what the unfolded model gives."""
    task, model = _model(vision_recipe(task="fold_batchnorm = false"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = task._logits(model, x)
        with model.disable_adapter():
            base = task._logits(model, x)
        assert fold_batchnorm(model, lambda: task._logits(model, x))[0] > 3
        assert torch.allclose(task._logits(model, x), reference, atol=1e-5)
        with model.disable_adapter():  # LoRA switched off after the fold: the base model's function
            assert torch.allclose(task._logits(model, x), base, atol=1e-5)
        assert torch.allclose(task._logits(model, x), reference, atol=1e-5)
        merged = model.merge_and_unload()
        assert torch.allclose(task._logits(merged, x), reference, atol=1e-4)
