"""How many threads torch computes with, and how its OpenMP threads wait: chosen from the machine's state.

On an idle machine OpenMP's default (threads spin a little before they sleep) is fastest. On a busy one the
spinning threads fight the other processes for the cores: a run measured 4x slower than with
``OMP_WAIT_POLICY=PASSIVE`` on a 2-core machine at load 4-7. No fixed setting is right for both, so the
run looks before torch is imported (OpenMP reads its settings once, when torch loads it): how many cores
this process may use (CPU affinity, a cgroup CPU quota) and how busy they are right now (a short sample of
``/proc/stat``). ``[train] threads`` / ``[train] wait_policy`` in the recipe, or ``OMP_NUM_THREADS`` /
``OMP_WAIT_POLICY`` in the environment, override the choice (recipe first). The choice and its reasons
are recorded in run.json (``threads``). See benchmarks/threads.py for the measurements behind the rule.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Other processes using less than this many cores' worth of CPU: the machine counts as idle.
IDLE_BELOW = 0.5


@dataclass(frozen=True)
class MachineState:
    """What the choice is made from. ``busy`` is None where it cannot be measured (not Linux)."""

    cores: int
    busy: float | None
    cores_why: str


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    wait_policy: str  # "passive", "active" or "default" (OpenMP's own: spin a while, then sleep)
    threads_from: str  # "recipe", "environment" or "auto"
    wait_policy_from: str
    why: str
    applied: str = ""  # how it took effect (set by apply)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        policy = "OpenMP's default waiting" if self.wait_policy == "default" else f"{self.wait_policy} waiting"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}, {policy} ({self.why})"


def usable_cores(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (v2 or v1)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    why = f"{affinity} cores in this process's CPU affinity"
    quota = _cgroup_quota(root)
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"{why}, a cgroup CPU quota of {quota:g} cores"
    return affinity, why


def _cgroup_quota(root: Path) -> float | None:
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def _cpu_times(stat: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line."""
    try:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(sample_s: float = 0.25, stat: Path = Path("/proc/stat")) -> float | None:
    """Cores' worth of CPU the machine's other processes use now (this process sleeps while it samples)."""
    before = _cpu_times(stat)
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times(stat)
    if after is None or after[1] <= before[1]:
        return None
    fraction = (after[0] - before[0]) / (after[1] - before[1])
    return fraction * (os.cpu_count() or 1)


def machine_state(sample_s: float = 0.25) -> MachineState:
    cores, why = usable_cores()
    return MachineState(cores=cores, busy=busy_cores(sample_s), cores_why=why)


def choose(threads: int | str = "auto", wait_policy: str = "auto", *, state: MachineState | None = None,
           environ: dict[str, str] | None = None) -> ThreadChoice:
    """The rule. Recipe values (``threads``, ``wait_policy``; "auto" means no value) win, then the
    environment's ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY``, then the machine's state: idle -> every usable
    core and OpenMP's default waiting; busy -> every usable core and passive waiting (sleeping threads
    give the cores back between kernels; measured on 2 cores beside 2 busy processes, keeping both threads
    with passive waiting beat one thread: benchmarks/README.md). The machine is only looked at (a 0.25 s
    sample) when something is left to choose."""
    environ = os.environ if environ is None else environ
    env_threads = _env_int(environ.get("OMP_NUM_THREADS"))
    env_policy = environ.get("OMP_WAIT_POLICY", "").strip().lower()
    env_policy = env_policy if env_policy in ("active", "passive") else None
    if state is None:
        decided = (threads != "auto" or env_threads) and (wait_policy != "auto" or env_policy)
        state = MachineState(cores=os.cpu_count() or 1, busy=None, cores_why="not looked at") if decided \
            else machine_state()
    if state.busy is None:
        seen = f"{state.cores_why}; how busy they are is not measurable here, taken as idle"
        busy = 0.0
    else:
        busy = state.busy
        seen = f"{state.cores_why}; other processes use {busy:.1f} of them"
    idle = busy < IDLE_BELOW
    auto_threads = state.cores
    auto_policy = "default" if idle else "passive"

    if threads != "auto":
        n, threads_from = int(threads), "recipe"
    elif env_threads:
        n, threads_from = env_threads, "environment"
    else:
        n, threads_from = auto_threads, "auto"
    if wait_policy != "auto":
        policy, policy_from = wait_policy, "recipe"
    elif env_policy:
        policy, policy_from = env_policy, "environment"
    else:
        policy, policy_from = auto_policy, "auto"
    if threads_from == policy_from == "auto":
        why = seen + ("" if idle else ": busy, so passive waiting")
    elif "auto" not in (threads_from, policy_from):
        why = f"threads from the {threads_from}, wait policy from the {policy_from}"
    else:
        why = (f"threads from the {threads_from}, wait policy from the {policy_from}; {seen}"
               .replace("from the auto", "chosen"))
    return ThreadChoice(threads=n, wait_policy=policy, threads_from=threads_from, wait_policy_from=policy_from,
                        why=why)


def _env_int(value: str | None) -> int | None:
    try:
        n = int(str(value).split(",")[0])
    except ValueError:
        return None
    return n if n > 0 else None


def apply(choice: ThreadChoice) -> ThreadChoice:
    """Put the choice into effect. Before torch is imported this sets ``OMP_NUM_THREADS`` and
    ``OMP_WAIT_POLICY`` (read once when OpenMP starts); afterwards only the thread count can change
    (``torch.set_num_threads``), and the record says so."""
    if "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
        if choice.wait_policy == "default":
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = choice.wait_policy.upper()
        how = "environment set before torch was imported"
    else:
        import torch

        torch.set_num_threads(choice.threads)
        how = "torch.set_num_threads (torch was already imported: the wait policy stays as OpenMP started)"
    return ThreadChoice(**{**choice.to_dict(), "applied": how})
