"""Threads and OpenMP wait policy chosen from the machine's state (faked here), and the overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from finetune.engine import threads
from finetune.engine.console import Console
from finetune.engine.plugins import get_registry
from finetune.engine.recipe_file import load_recipe
from finetune.engine.threads import MachineState, choose
from finetune.errors import RecipeError
from finetune.run.training import run_recipe

IDLE2 = MachineState(cores=2, busy=0.1, cores_why="2 cores")
BUSY2 = MachineState(cores=2, busy=1.9, cores_why="2 cores")
NO_ENV: dict[str, str] = {}


def test_an_idle_machine_gets_every_core_and_openmps_default_waiting():
    c = choose(state=IDLE2, environ=NO_ENV)
    assert (c.threads, c.wait_policy, c.threads_from, c.wait_policy_from) == (2, "default", "auto", "auto")
    assert "other processes use 0.1" in c.why


def test_a_busy_machine_gets_passive_waiting_on_every_usable_core():
    c = choose(state=BUSY2, environ=NO_ENV)
    assert (c.threads, c.wait_policy) == (2, "passive")  # benchmarks/threads.py: 2 passive beat 1 passive
    assert "busy" in c.why
    c = choose(state=MachineState(cores=8, busy=2.6, cores_why="8 cores"), environ=NO_ENV)
    assert (c.threads, c.wait_policy) == (8, "passive")
    c = choose(state=MachineState(cores=3, busy=7.0, cores_why="a cgroup CPU quota of 3 cores"), environ=NO_ENV)
    assert (c.threads, c.wait_policy) == (3, "passive")  # the usable cores (quota, affinity) are the ceiling


def test_unmeasurable_load_counts_as_idle_and_says_so():
    c = choose(state=MachineState(cores=4, busy=None, cores_why="4 cores"), environ=NO_ENV)
    assert (c.threads, c.wait_policy) == (4, "default")
    assert "not measurable" in c.why


def test_the_recipe_wins_over_the_environment_which_wins_over_the_machine():
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "active"}
    c = choose(state=BUSY2, environ=env)
    assert (c.threads, c.wait_policy, c.threads_from, c.wait_policy_from) == (3, "active", "environment",
                                                                                "environment")
    c = choose(1, "passive", state=IDLE2, environ=env)
    assert (c.threads, c.wait_policy, c.threads_from, c.wait_policy_from) == (1, "passive", "recipe", "recipe")
    c = choose(4, "auto", state=BUSY2, environ={"OMP_WAIT_POLICY": "bogus"})
    assert (c.threads, c.wait_policy, c.threads_from, c.wait_policy_from) == (4, "passive", "recipe", "auto")


def test_the_machine_is_not_sampled_when_everything_is_given(monkeypatch):
    def fail():
        raise AssertionError("sampled although nothing was left to choose")

    monkeypatch.setattr(threads, "machine_state", fail)
    assert choose(2, "passive", environ=NO_ENV).threads == 2
    assert choose(environ={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}).wait_policy == "passive"
    monkeypatch.setattr(threads, "machine_state", lambda: BUSY2)
    assert choose(2, environ=NO_ENV).wait_policy == "passive"  # the policy was still open: sampled


@pytest.mark.parametrize(("files", "cores"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 cores -> 2 threads
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_usable_cores_follow_affinity_and_a_cgroup_quota(tmp_path, monkeypatch, files, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    n, why = threads.usable_cores(tmp_path)
    assert n == (cores or 4)
    assert ("quota" in why) == (cores is not None)


def test_busy_cores_from_two_samples_of_proc_stat(monkeypatch):
    samples = iter([(100, 1000), (150, 1100)])  # 50 of 100 jiffies busy
    monkeypatch.setattr(threads, "_cpu_times", lambda stat: next(samples))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert threads.busy_cores(sample_s=0) == pytest.approx(2.0)
    if os.path.exists("/proc/stat"):
        monkeypatch.undo()
        assert 0 <= threads.busy_cores(sample_s=0.05) <= (os.cpu_count() or 1) + 1e-6


def test_the_choice_takes_effect_when_torch_starts():
    code = ("import os; from finetune.engine import threads as t\n"
            "c = t.apply(t.choose(1, 'passive'))  # torch's default here: every core (2+)\n"
            "import torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], 'environment' in c.applied)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         check=True).stdout.split()
    assert out == ["1", "PASSIVE", "True"]


def test_a_run_records_its_choice_and_the_recipe_keys_are_checked(make_recipe, tmp_path):
    recipe = make_recipe(train="epochs = 1\nthreads = 1\nwait_policy = 'passive'")
    run = run_recipe(recipe, [], console=Console(enabled=False))
    info = json.loads((run.path / "run.json").read_text())["threads"]
    assert (info["threads"], info["wait_policy"], info["threads_from"]) == (1, "passive", "recipe")
    assert info["applied"]
    registry = get_registry()
    with pytest.raises(RecipeError, match="train.threads"):
        load_recipe(recipe, ["train.threads=0"], registry.get_task)
    with pytest.raises(RecipeError, match="train.wait_policy"):
        load_recipe(recipe, ["train.wait_policy=sleepy"], registry.get_task)
