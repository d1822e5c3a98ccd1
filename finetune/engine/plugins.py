"""The pluggy plugin manager: entry-point loading, task registry, failures.

Plugins are found through the ``finetune`` entry-point group. We iterate the
entry points ourselves (instead of pluggy's ``load_setuptools_entrypoints``)
so that one plugin failing to import is recorded and shown while the others
still load, and so that two plugins with the same entry-point name are not
silently skipped.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import pluggy

from finetune.contract import hookspecs
from finetune.contract.hookspecs import HOOK_VERSION
from finetune.contract.probe import Claim, DataProbe
from finetune.contract.rewards import RewardFunction
from finetune.contract.task import Task
from finetune.engine.conformance import method_problems
from finetune.engine.guard import GuardedCallback, GuardedTask, attributed
from finetune.errors import PluginError, RecipeError, did_you_mean

ENTRY_POINT_GROUP = "finetune"


@dataclass
class PluginInfo:
    """What ``finetune plugins`` shows for one plugin."""

    name: str
    module: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class TaskEntry:
    cls: type[Task]
    plugin: str
    distribution: str


class PluginRegistry:
    """All loaded plugins, their tasks and callbacks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("finetune")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.tasks: dict[str, TaskEntry] = {}
        self.conflicts: list[str] = []
        self._conflict_plugins: list[str] = []  #: the plugin whose registration caused each conflict
        self._rewards: dict[str, RewardFunction] | None = None  #: collected on first use

    # -- loading -------------------------------------------------------
    def load_entry_points(self) -> None:
        allowed = _allowed_plugins()
        eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        if allowed is not None:
            installed = {ep.name for ep in eps}
            for name in sorted(allowed - installed):
                # A typo in FINETUNE_PLUGINS must not silently load nothing.
                listed = ", ".join(sorted(installed)) or "none"
                self.plugins.append(PluginInfo(
                    name=name, module="?", distribution="?", version="?",
                    error=f"FINETUNE_PLUGINS names {name!r}, but no installed plugin has that name"
                          f"{did_you_mean(name, installed)}; installed: {listed}"))
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            info = PluginInfo(name=ep.name, module=ep.value, distribution=dist, version=version)
            self.plugins.append(info)
            try:
                module = ep.load()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import failure is reported, not fatal
                info.error = f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}"
                continue
            self._register_module(module, info)

    def register_module(self, module: Any, name: str, distribution: str = "local", version: str = "") -> None:
        """Register an already-imported module or object as a plugin (tests, embedding)."""
        info = PluginInfo(name=name, module=getattr(module, "__name__", repr(module)),
                          distribution=distribution, version=version)
        self.plugins.append(info)
        self._register_module(module, info)

    def _register_module(self, module: Any, info: PluginInfo) -> None:
        declared = getattr(module, "finetune_hook_version", HOOK_VERSION)
        if str(declared).split(".")[0] != HOOK_VERSION:
            origin = f"{info.distribution} {info.version}".strip()
            info.error = (f"plugin {info.name!r} ({origin}) was written for hook "
                          f"contract version {declared}, this finetune provides version {HOOK_VERSION}; "
                          "upgrade the plugin or finetune")
            return
        if self.pm.has_plugin(info.name):
            info.error = f"another plugin is already registered under the name {info.name!r}"
            return
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # noqa: BLE001 - pluggy validation errors name the bad hook
            info.error = "invalid hook implementation: " + " ".join(str(exc).split())
            return
        callers = self.pm.get_hookcallers(module) or []
        unknown = sorted(h.name for h in callers if h.spec is None)
        if unknown:
            # pluggy accepts hookimpls it has no spec for; they would never be called (a typo).
            self.pm.unregister(module)
            specs = [name for name in dir(hookspecs) if name.startswith("finetune_")]
            info.error = "invalid hook implementation: " + "; ".join(
                f"unknown hook {name!r}{did_you_mean(name, specs)}" for name in unknown) + \
                f" (hooks finetune provides: {', '.join(specs)})"
            return
        info.hooks = sorted(h.name for h in callers)
        register_tasks = getattr(module, "finetune_register_tasks", None)
        if register_tasks is None:
            return
        try:
            register_tasks(register=lambda cls: self._add_task(cls, info))
        except Exception as exc:  # noqa: BLE001
            info.error = f"raised in finetune_register_tasks: {type(exc).__name__}: {exc}"
            # A plugin that failed is not half-loaded: drop its tasks and hooks.
            for task_name in info.tasks:
                self.tasks.pop(task_name, None)
            info.tasks = []
            info.hooks = []
            kept = [(c, p) for c, p in zip(self.conflicts, self._conflict_plugins) if p != info.name]
            self.conflicts = [c for c, _ in kept]
            self._conflict_plugins = [p for _, p in kept]
            self.pm.unregister(module)

    def _add_task(self, cls: type[Task], info: PluginInfo) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise PluginError(f"register() expects a subclass of finetune.Task, got {cls!r}")
        name = getattr(cls, "name", None)
        if not name:
            raise PluginError(f"task class {cls.__module__}.{cls.__qualname__} has no 'name'")
        if name in self.tasks:
            other = self.tasks[name]
            self.conflicts.append(
                f"task {name!r} is registered by two plugins: {other.plugin!r} (distribution "
                f"{other.distribution}) and {info.name!r} (distribution {info.distribution}); "
                "uninstall one of them or restrict loading with FINETUNE_PLUGINS")
            self._conflict_plugins.append(info.name)
            return
        self.tasks[name] = TaskEntry(cls=cls, plugin=info.name, distribution=info.distribution)
        info.tasks.append(name)

    # -- queries -------------------------------------------------------
    def get_task(self, name: str) -> type[Task]:
        for conflict in self.conflicts:
            if conflict.startswith(f"task {name!r} "):
                raise PluginError(conflict)
        if name not in self.tasks:
            available = ", ".join(sorted(self.tasks)) or "none (no task plugin is installed)"
            broken = [p for p in self.plugins if p.error]
            hint = ""
            if broken:
                hint = " Some plugins failed to load: " + "; ".join(f"{p.name}: {p.error}" for p in broken) + "."
            raise RecipeError(
                f"task.name: unknown task {name!r}{did_you_mean(name, self.tasks)}. "
                f"Available tasks: {available}. Run `finetune tasks` to list them.{hint}")
        return self.tasks[name].cls

    def owner_of(self, task_name: str) -> str:
        """"plugin 'name' (distribution)" of the plugin that registered a task, for error messages."""
        entry = self.tasks.get(task_name)
        return f"plugin {entry.plugin!r} ({entry.distribution})" if entry else "the task's plugin"

    def create_task(self, recipe: Any) -> GuardedTask:
        """The recipe's task, as the core calls it: errors and bad return values name its plugin. A method
        the core could not call as the contract says is an error now, before anything runs; a method name
        that looks like a misspelled contract method is a warning (the core would never call it)."""
        cls = self.get_task(recipe.task.name)
        owner = self.owner_of(recipe.task.name)
        errors, warnings = method_problems(cls)
        if errors:
            raise PluginError(f"{owner}: task {cls.name!r} does not fit the contract (docs/plugin-reference.md):\n  "
                              + "\n  ".join(errors))
        for warning in warnings:
            print(f"warning: {owner}: {warning}", file=sys.stderr)
        return GuardedTask(attributed(owner, f"{cls.__name__}.__init__", cls, recipe), owner)

    def callbacks(self) -> list[GuardedCallback]:
        """Every registered callback, wrapped so that its errors name the plugin that registered it."""
        found: list[GuardedCallback] = []
        for impl in self.pm.hook.finetune_register_callbacks.get_hookimpls():
            owner = f"plugin {impl.plugin_name!r}"
            try:
                impl.function(register=lambda cb, owner=owner: found.append(GuardedCallback(cb, owner)))
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"{owner} raised in finetune_register_callbacks: {type(exc).__name__}: {exc}") \
                    from exc
        return found

    def claims(self, probe: DataProbe) -> list[Claim]:
        """Every plugin's ``finetune_claim_data`` answers for ``probe``, best first. A plugin that raises or
        returns something other than claims is an error naming it; a claim for a task nobody registered is
        dropped (with a warning on stderr)."""
        found: list[Claim] = []
        for impl in self.pm.hook.finetune_claim_data.get_hookimpls():
            owner = f"plugin {impl.plugin_name!r}"
            try:
                answer = impl.function(probe=probe)
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"{owner} raised in finetune_claim_data: {type(exc).__name__}: {exc}") from exc
            if answer is None:
                continue
            for claim in answer if isinstance(answer, (list, tuple)) else [answer]:
                if not isinstance(claim, Claim) or not isinstance(claim.score, (int, float)) \
                        or not isinstance(claim.settings, dict):
                    raise PluginError(f"{owner}, finetune_claim_data: returned {claim!r}; return None, a "
                                      "finetune.Claim or a list of them (docs/plugin-reference.md)")
                if claim.task not in self.tasks:
                    print(f"warning: {owner} claimed the data for task {claim.task!r}, which no plugin "
                          "registers; ignored", file=sys.stderr)
                    continue
                claim.plugin = impl.plugin_name
                claim.score = max(0.0, min(1.0, float(claim.score)))
                found.append(claim)
        return sorted(found, key=lambda c: -c.score)

    def rewards(self) -> dict[str, RewardFunction]:
        """Every reward function registered through ``finetune_register_rewards``, by name (collected once).
        A name registered twice, a name that is not a recipe-friendly word, or a function that is not
        callable is an error naming the plugin(s)."""
        if self._rewards is not None:
            return self._rewards
        found: dict[str, RewardFunction] = {}

        def register(name: Any, function: Any, description: str = "", *, plugin: str) -> None:
            if not isinstance(name, str) or not _REWARD_NAME.match(name):
                raise PluginError(f"reward name {name!r}: use lower-case words joined by '-' or '_' (e.g. "
                                  "'exact-number')")
            if not callable(function):
                raise PluginError(f"reward {name!r}: {function!r} is not callable")
            if name in found:
                raise PluginError(f"reward function {name!r} is registered by two plugins: {found[name].plugin} "
                                  f"and {plugin}; uninstall one of them or restrict loading with FINETUNE_PLUGINS")
            found[name] = RewardFunction(name=name, function=function, description=str(description or ""),
                                         plugin=plugin)

        for impl in self.pm.hook.finetune_register_rewards.get_hookimpls():
            owner = f"plugin {impl.plugin_name!r}"
            try:
                impl.function(register=lambda name, function, description="", owner=owner:
                              register(name, function, description, plugin=owner))
            except PluginError as exc:
                raise PluginError(f"{owner}, finetune_register_rewards: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"{owner} raised in finetune_register_rewards: {type(exc).__name__}: {exc}") \
                    from exc
        self._rewards = dict(sorted(found.items()))
        return self._rewards

    def loaded(self) -> list[dict[str, str]]:
        """Name, distribution and version of every plugin that loaded (for the run folder)."""
        return [{"name": p.name, "distribution": p.distribution, "version": p.version}
                for p in self.plugins if p.error is None]


_REWARD_NAME = re.compile(r"^[a-z][a-z0-9]*([-_][a-z0-9]+)*$")


def reward_functions() -> dict[str, RewardFunction]:
    """The reward functions every installed plugin registered (``finetune_register_rewards``), by name.

    Each value is a :class:`finetune.RewardFunction`; call it as ``reward(completions, examples)``. A task
    that lets recipes name reward functions looks them up here, so that a misspelled name can be refused
    with the closest registered one before training."""
    return get_registry().rewards()


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get("FINETUNE_PLUGINS")
    if raw is None or raw.strip() == "":
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


_REGISTRY: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = PluginRegistry()
        from finetune.engine import zoo

        registry.register_module(zoo, name="finetune.zoo", distribution="finetune",
                                 version=_own_version())
        registry.load_entry_points()
        _REGISTRY = registry
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded plugins (tests)."""
    global _REGISTRY
    _REGISTRY = None


def _own_version() -> str:
    try:
        return importlib.metadata.version("finetune")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
