"""The learning-rate schedule: the warm-up's first step already learns (transformers' get_scheduler starts at
0) and a one-step warm-up is still a ramp, after the warm-up the curves are transformers' own, and the
scheduler resumes from its state dict."""

from __future__ import annotations

import pytest
import torch

from finetune.engine.schedule import lr_multiplier, make_scheduler


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_warm_up_starts_above_zero_and_then_follows_transformers(kind):
    from transformers import get_scheduler

    total, ratio = 104, 0.06
    warmup = int(ratio * total)
    ours = _lrs(make_scheduler(opt := _optimizer(), kind, ratio, total), opt, total)
    theirs = _lrs(get_scheduler(kind, opt2 := _optimizer(), num_warmup_steps=warmup, num_training_steps=total), opt2,
                  total)
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(2.0 / (warmup + 1))  # the first step is not wasted
    assert ours[:warmup] == pytest.approx([2.0 * (s + 1) / (warmup + 1) for s in range(warmup)])
    assert ours[warmup] == pytest.approx(2.0)  # the peak right after the warm-up, as transformers'
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)
    assert min(ours) > 0


def test_no_warm_up_a_one_step_warm_up_and_constant():
    assert [lr_multiplier("linear", 0, 10)(s) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert [lr_multiplier("linear", 1, 31)(s) for s in (0, 1)] == pytest.approx([0.5, 1.0])  # still a ramp
    assert {lr_multiplier("constant", 3, 10)(s) for s in range(10)} == {1.0}
    with pytest.raises(ValueError, match="step"):
        lr_multiplier("step", 1, 10)


def test_scheduler_resumes_from_its_state_dict():
    opt = _optimizer()
    scheduler = make_scheduler(opt, "linear", 0.1, 50)
    _lrs(scheduler, opt, 17)
    state = scheduler.state_dict()
    opt2 = _optimizer()
    resumed = make_scheduler(opt2, "linear", 0.1, 50)
    resumed.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # the optimizer's own state dict restores it
    assert _lrs(resumed, opt2, 33) == pytest.approx(_lrs(scheduler, opt, 33))
