"""Reward functions registered through the ``finetune_register_rewards`` hook: lookup, checks, errors."""

from __future__ import annotations

import math
import types

import pytest
from click.testing import CliRunner

from finetune import PluginError, RewardFunction, hookimpl
from finetune.engine.plugins import PluginRegistry


def _plugin(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def finetune_register_rewards(register):
        for reward_name, fn in functions.items():
            register(reward_name.replace("_", "-"), fn, description=f"{reward_name} from {name}")

    module.finetune_register_rewards = finetune_register_rewards
    return module


def _registry(*modules) -> PluginRegistry:
    registry = PluginRegistry()
    for module in modules:
        registry.register_module(module, module.__name__)
    return registry


def test_rewards_are_found_by_name_and_checked_when_called():
    registry = _registry(_plugin("p1", has_x=lambda c, e: [float("x" in t) for t in c]))
    reward = registry.rewards()["has-x"]
    assert isinstance(reward, RewardFunction) and reward.plugin == "plugin 'p1'"
    assert reward(["ax", "b"], [{}, {}]) == [1.0, 0.0]
    assert reward.description == "has_x from p1"


@pytest.mark.parametrize(("fn", "message"), [
    (lambda c, e: 1 / 0, "raised ZeroDivisionError"),
    (lambda c, e: [math.nan] * len(c), "returned nan for completion 0"),
    (lambda c, e: [1.0], "returned 1 values for 2 completions"),
    (lambda c, e: ["1.0", "2"], "returned '1.0' for completion 0"),
    (lambda c, e: 3.0, "not a list of numbers"),
])
def test_a_failing_reward_is_a_clear_error_naming_it_and_its_plugin(fn, message):
    reward = _registry(_plugin("p2", bad=fn)).rewards()["bad"]
    with pytest.raises(PluginError, match="reward function 'bad' \\(plugin 'p2'\\)") as info:
        reward(["one", "two"], [{}, {}])
    assert message in str(info.value)


def test_bools_and_numpy_numbers_count_as_numbers():
    import numpy as np

    reward = _registry(_plugin("p3", ok=lambda c, e: [True, np.float32(0.5)])).rewards()["ok"]
    assert reward(["a", "b"], [{}, {}]) == [1.0, 0.5]


def test_the_same_name_from_two_plugins_is_an_error_naming_both():
    registry = _registry(_plugin("p4", same=lambda c, e: c), _plugin("p5", same=lambda c, e: c))
    with pytest.raises(PluginError, match="'same' is registered by two plugins: plugin 'p4' and plugin 'p5'"):
        registry.rewards()


def test_bad_names_and_non_callables_are_refused():
    with pytest.raises(PluginError, match="reward name 'Bad Name'"):
        _registry(_plugin("p6", **{"Bad Name": lambda c, e: c})).rewards()
    with pytest.raises(PluginError, match="is not callable"):
        _registry(_plugin("p7", fine=3)).rewards()


def test_finetune_rewards_lists_the_registered_functions(monkeypatch):
    from finetune.cli.main import cli
    from finetune.engine import plugins

    monkeypatch.setattr(plugins, "_REGISTRY", _registry(_plugin("p8", shout=lambda c, e: [1.0] * len(c))))
    result = CliRunner().invoke(cli, ["rewards"])
    assert result.exit_code == 0, result.output
    assert "shout  shout from p8  [plugin 'p8']" in result.output
