"""Plugin discovery through entry points, failures, conflicts, contract versions, FINETUNE_PLUGINS.

Third-party plugins are faked as real installed distributions: a ``*.dist-info`` folder (METADATA +
entry_points.txt) and a module, in a folder put on PYTHONPATH for the CLI subprocess.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from conftest import run_cli
from fake_plugins import make_dist

from finetune import Task, TaskOptions, hookimpl
from finetune.contract.hookspecs import HOOK_VERSION
from finetune.engine.plugins import PluginRegistry, get_registry, reset_registry
from finetune.errors import PluginError, RecipeError


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv("FINETUNE_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()


def task_module(task_name: str, description: str = "A test task.", extra: str = "") -> str:
    """Source of a plugin module registering one Task subclass with its own [data] option."""
    return f'''
        from pydantic import Field

        from finetune import DataOptions, Task, hookimpl

        {extra}

        class Data(DataOptions):
            column: str = Field("text", description="The column.")


        class MyTask(Task):
            name = "{task_name}"
            description = "{description}"
            data_options = Data


        @hookimpl
        def finetune_register_tasks(register):
            register(MyTask)
        '''


def cli(*args: str, site: Path | None = None, plugins: str = ""):
    env = {"FINETUNE_PLUGINS": plugins}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return run_cli(*args, env=env, timeout=120)


def plugin_block(stdout: str, name: str) -> str:
    """The lines `finetune plugins` prints for one plugin."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{name} ("):
            block = [line]
            for follow in lines[i + 1:]:
                if not follow.startswith("  "):
                    break
                block.append(follow)
            return "\n".join(block)
    raise AssertionError(f"plugin {name!r} not listed in:\n{stdout}")


@pytest.fixture
def site(tmp_path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    return folder


def write_recipe(folder: Path, task: str, data_extra: str = "") -> Path:
    path = folder / "recipe.toml"
    path.write_text(f'[task]\nname = "{task}"\n[model]\nbackbone = "org/x"\n'
                    f'[data]\ntrain = "t.csv"\n{data_extra}\n[output]\ndir = "out"\n')
    return path


# ---------------------------------------------------------------------------
# the built-in plugin, discovered like any third-party one

def test_cli_plugins_shows_builtin_nlp():
    result = cli("plugins")
    assert result.returncode == 0, result.stderr
    block = plugin_block(result.stdout, "nlp")
    assert block.startswith("nlp (finetune ") and block.splitlines()[0].endswith("[ok]")
    assert "module: finetune_nlp" in block
    assert "hooks:  finetune_claim_data, finetune_register_tasks" in block
    assert "tasks:  text-classification" in block
    zoo = plugin_block(result.stdout, "finetune.zoo")
    assert "[ok]" in zoo and "finetune_resolve_backbone" in zoo
    assert result.stderr == ""


def test_cli_tasks_lists_text_classification():
    result = cli("tasks")
    assert result.returncode == 0, result.stderr
    line = next(li for li in result.stdout.splitlines() if li.startswith("text-classification"))
    assert "Classify texts" in line and line.endswith("[nlp]")
    assert result.stderr == ""


# ---------------------------------------------------------------------------
# third-party plugins

@pytest.mark.parametrize(("statement", "error"), [
    ('raise ImportError("needs libfoo, which is not installed")',
     "ImportError: needs libfoo, which is not installed"),
    ('raise RuntimeError("plugin exploded on import")', "RuntimeError: plugin exploded on import"),
    ("import no_such_module_anywhere_xyz", "ModuleNotFoundError: No module named 'no_such_module_anywhere_xyz'"),
    ("def broken(:\n    pass", "SyntaxError"),
])
def test_broken_plugin_is_listed_as_failed_and_others_still_work(site, statement, error):
    make_dist(site, "brokenplug", {"broken": "broken_mod"}, {"broken_mod": statement + "\n"})
    result = cli("plugins", site=site)
    assert result.returncode == 0, result.stderr
    block = plugin_block(result.stdout, "broken")
    assert block.splitlines()[0] == "broken (brokenplug 0.1) [FAILED]"
    assert "module: broken_mod" in block
    assert "error:  failed to import 'broken_mod'" in block and error in block
    assert "[ok]" in plugin_block(result.stdout, "nlp")
    assert "Traceback" not in result.stdout + result.stderr

    tasks = cli("tasks", site=site)
    assert tasks.returncode == 0, tasks.stderr
    assert any(line.startswith("text-classification ") for line in tasks.stdout.splitlines())


def test_broken_plugin_is_mentioned_when_a_task_is_unknown(site, tmp_path):
    make_dist(site, "brokenplug", {"broken": "broken_mod"},
              {"broken_mod": 'raise ImportError("needs libfoo")\n'})
    result = cli("validate", str(write_recipe(tmp_path, "no-such-task-family")), site=site)
    assert result.returncode == 2
    assert result.stderr.startswith("error: task.name: unknown task 'no-such-task-family'")
    assert "Some plugins failed to load: broken: failed to import 'broken_mod': ImportError: needs libfoo" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_plugin_providing_a_second_task_shows_up_and_its_options_are_validated(site, tmp_path):
    make_dist(site, "extraplug", {"extra": "extra_mod"},
              {"extra_mod": task_module("echo-task", "Echo the input back.")}, version="2.3")
    plugins = cli("plugins", site=site)
    assert plugins.returncode == 0, plugins.stderr
    block = plugin_block(plugins.stdout, "extra")
    assert block.splitlines()[0] == "extra (extraplug 2.3) [ok]"
    assert "hooks:  finetune_register_tasks" in block and "tasks:  echo-task" in block

    tasks = cli("tasks", site=site)
    lines = tasks.stdout.splitlines()
    assert any(li.startswith("echo-task") and "Echo the input back." in li and li.endswith("[extra]")
               for li in lines), tasks.stdout
    assert any(li.startswith("text-classification") for li in lines)

    # the third-party [data] option is part of the recipe schema: a typo gets did-you-mean
    result = cli("validate", str(write_recipe(tmp_path, "echo-task", 'colum = "x"')), site=site)
    assert result.returncode == 2
    assert "data.colum: unknown key (did you mean 'column'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_plugins_registering_the_same_task(site, tmp_path):
    make_dist(site, "dupa-dist", {"dupa": "dupa_mod"}, {"dupa_mod": task_module("dup-task", "From A.")})
    make_dist(site, "dupb-dist", {"dupb": "dupb_mod"}, {"dupb_mod": task_module("dup-task", "From B.")})
    tasks = cli("tasks", site=site)
    assert tasks.returncode == 0
    assert "error: task 'dup-task' is registered by two plugins: 'dupa' (distribution dupa-dist) and " \
           "'dupb' (distribution dupb-dist)" in tasks.stderr
    assert "FINETUNE_PLUGINS" in tasks.stderr
    assert "text-classification" in tasks.stdout

    result = cli("validate", str(write_recipe(tmp_path, "dup-task")), site=site)
    assert result.returncode == 2
    assert result.stderr.startswith("error: task 'dup-task' is registered by two plugins")
    assert "dupa-dist" in result.stderr and "dupb-dist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    # choosing one of them with FINETUNE_PLUGINS resolves the conflict
    only_a = cli("tasks", site=site, plugins="dupa")
    assert "dup-task" in only_a.stdout and "From A." in only_a.stdout and only_a.stderr == ""


def test_hook_contract_version_mismatch_is_refused(site):
    make_dist(site, "futureplug", {"future": "future_mod"},
              {"future_mod": task_module("future-task", extra='finetune_hook_version = "99"')}, version="9.0")
    result = cli("plugins", site=site)
    assert result.returncode == 0
    block = plugin_block(result.stdout, "future")
    assert block.splitlines()[0] == "future (futureplug 9.0) [FAILED]"
    assert "plugin 'future' (futureplug 9.0) was written for hook contract version 99" in block
    assert f"this finetune provides version {HOOK_VERSION}" in block
    assert "upgrade" in block
    tasks = cli("tasks", site=site)
    assert "future-task" not in tasks.stdout and "text-classification" in tasks.stdout


def test_finetune_plugins_restricts_loading(site):
    make_dist(site, "brokenplug", {"broken": "broken_mod"}, {"broken_mod": 'raise ImportError("x")\n'})
    make_dist(site, "extraplug", {"extra": "extra_mod"}, {"extra_mod": task_module("echo-task")})
    result = cli("plugins", site=site, plugins="nlp")
    assert result.returncode == 0
    assert "[ok]" in plugin_block(result.stdout, "nlp")
    assert "broken" not in result.stdout and "extra" not in result.stdout

    only_extra = cli("tasks", site=site, plugins="extra")
    assert "echo-task" in only_extra.stdout and "text-classification" not in only_extra.stdout

    both = cli("tasks", site=site, plugins=" nlp , extra ")
    assert "echo-task" in both.stdout and "text-classification" in both.stdout


def test_finetune_plugins_with_unknown_name_says_so(site):
    result = cli("plugins", plugins="nlpp")
    block = plugin_block(result.stdout, "nlpp")
    assert "[FAILED]" in block
    assert "FINETUNE_PLUGINS names 'nlpp', but no installed plugin has that name (did you mean 'nlp'?)" in block
    tasks = cli("tasks", plugins="nlpp")
    assert "no tasks installed" in tasks.stdout


def test_finetune_plugins_loaded_in_process(monkeypatch):
    monkeypatch.setenv("FINETUNE_PLUGINS", "nlp")
    registry = get_registry()
    assert get_registry() is registry  # cached, process-wide
    assert [p.name for p in registry.plugins] == ["finetune.zoo", "nlp"]
    assert registry.tasks["text-classification"].plugin == "nlp"
    assert registry.tasks["text-classification"].distribution == "finetune"
    monkeypatch.setenv("FINETUNE_PLUGINS", "nothing-here")
    assert get_registry() is registry  # still cached...
    reset_registry()
    fresh = get_registry()  # ...until reset
    assert fresh is not registry and "text-classification" not in fresh.tasks


# ---------------------------------------------------------------------------
# the registry, in process

def module_with(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def task_class(task_name: str, description: str = "x") -> type[Task]:
    return type(f"T_{task_name.replace('-', '_')}", (Task,), {"name": task_name, "description": description})


def registering(*classes, fail: Exception | None = None) -> types.ModuleType:
    @hookimpl
    def finetune_register_tasks(register):
        for cls in classes:
            register(cls)
        if fail is not None:
            raise fail

    return module_with("mod", finetune_register_tasks=finetune_register_tasks)


def test_register_module_adds_tasks_and_hooks():
    registry = PluginRegistry()
    cls = task_class("my-task")
    registry.register_module(registering(cls), name="mine", distribution="mydist", version="1.2")
    (info,) = registry.plugins
    assert (info.name, info.distribution, info.version, info.error) == ("mine", "mydist", "1.2", None)
    assert info.hooks == ["finetune_register_tasks"] and info.tasks == ["my-task"]
    assert registry.get_task("my-task") is cls
    assert registry.tasks["my-task"].distribution == "mydist"
    assert registry.loaded() == [{"name": "mine", "distribution": "mydist", "version": "1.2"}]


def test_get_task_unknown_lists_available_and_broken():
    registry = PluginRegistry()
    registry.register_module(registering(task_class("text-classification")), name="a")
    registry.register_module(module_with("bad", finetune_hook_version="2"), name="bad", distribution="baddist")
    with pytest.raises(RecipeError) as info:
        registry.get_task("text-clasification")
    message = str(info.value)
    assert "unknown task 'text-clasification' (did you mean 'text-classification'?)" in message
    assert "Available tasks: text-classification." in message
    assert "Some plugins failed to load: bad: plugin 'bad' (baddist) was written for hook contract version 2" \
        in message


def test_get_task_with_no_task_plugins():
    with pytest.raises(RecipeError, match=r"Available tasks: none \(no task plugin is installed\)"):
        PluginRegistry().get_task("text-classification")


def test_duplicate_task_conflict_names_both_distributions():
    registry = PluginRegistry()
    first, second = task_class("dup"), task_class("dup")
    registry.register_module(registering(first), name="a", distribution="dist-a")
    registry.register_module(registering(second), name="b", distribution="dist-b")
    assert registry.tasks["dup"].cls is first  # nothing is silently replaced...
    assert registry.plugins[1].tasks == []
    with pytest.raises(PluginError) as info:  # ...and using the name is an error
        registry.get_task("dup")
    message = str(info.value)
    assert "task 'dup' is registered by two plugins: 'a' (distribution dist-a) and 'b' (distribution dist-b)" \
        in message
    assert registry.conflicts == [message]


def test_conflict_does_not_leak_to_other_task_names():
    registry = PluginRegistry()
    registry.register_module(registering(task_class("dup"), task_class("dup-extended")), name="a")
    registry.register_module(registering(task_class("dup")), name="b")
    assert registry.get_task("dup-extended").name == "dup-extended"
    with pytest.raises(PluginError):
        registry.get_task("dup")


@pytest.mark.parametrize("declared", ["99", 2, "0.9", "2.0"])
def test_hook_version_mismatch_refused(declared):
    registry = PluginRegistry()
    module = registering(task_class("t"))
    module.finetune_hook_version = declared
    registry.register_module(module, name="future", distribution="futuredist", version="3.0")
    (info,) = registry.plugins
    assert info.error == (f"plugin 'future' (futuredist 3.0) was written for hook contract version {declared}, "
                          f"this finetune provides version {HOOK_VERSION}; upgrade the plugin or finetune")
    assert registry.tasks == {} and not registry.pm.has_plugin("future")
    assert registry.loaded() == []


@pytest.mark.parametrize("declared", ["1", "1.4", 1])
def test_compatible_hook_versions_accepted(declared):
    registry = PluginRegistry()
    module = registering(task_class("t"))
    module.finetune_hook_version = declared
    registry.register_module(module, name="ok")
    assert registry.plugins[0].error is None and "t" in registry.tasks


def test_failing_register_tasks_leaves_nothing_half_loaded():
    registry = PluginRegistry()
    cls = task_class("half")
    registry.register_module(registering(cls, fail=ValueError("boom")), name="half", distribution="hd")
    (info,) = registry.plugins
    assert info.error == "raised in finetune_register_tasks: ValueError: boom"
    assert "half" not in registry.tasks and info.tasks == []
    assert not registry.pm.has_plugin("half")
    with pytest.raises(RecipeError, match="Some plugins failed to load: half: raised in finetune_register_tasks"):
        registry.get_task("half")


def test_register_rejects_non_task_and_nameless_task():
    registry = PluginRegistry()
    registry.register_module(registering(object), name="notask")
    assert "register() expects a subclass of finetune.Task" in registry.plugins[0].error
    registry.register_module(registering(task_class("")), name="noname")
    assert "has no 'name'" in registry.plugins[1].error
    assert registry.tasks == {}


def test_unknown_hook_name_is_reported_with_did_you_mean():
    @hookimpl
    def finetune_register_task(register):  # typo: missing "s"
        pass

    registry = PluginRegistry()
    registry.register_module(module_with("typo", finetune_register_task=finetune_register_task), name="typo")
    error = registry.plugins[0].error
    assert "unknown hook 'finetune_register_task' (did you mean 'finetune_register_tasks'?)" in error
    assert not registry.pm.has_plugin("typo")


def test_hook_with_wrong_arguments_is_reported():
    @hookimpl
    def finetune_register_tasks(register, something_else):
        pass

    registry = PluginRegistry()
    registry.register_module(module_with("wrong", finetune_register_tasks=finetune_register_tasks), name="wrong")
    error = registry.plugins[0].error
    assert error.startswith("invalid hook implementation:")
    assert "something_else" in error and "\n" not in error


def test_same_plugin_name_twice_is_refused():
    registry = PluginRegistry()
    registry.register_module(registering(task_class("one")), name="same")
    registry.register_module(registering(task_class("two")), name="same")
    assert registry.plugins[1].error == "another plugin is already registered under the name 'same'"
    assert "two" not in registry.tasks


def test_callbacks_are_collected_from_plugins():
    class Observer:
        pass

    observer = Observer()

    @hookimpl
    def finetune_register_callbacks(register):
        register(observer)

    registry = PluginRegistry()
    registry.register_module(module_with("cb", finetune_register_callbacks=finetune_register_callbacks), name="cb")
    assert registry.plugins[0].hooks == ["finetune_register_callbacks"]
    callbacks = registry.callbacks()
    assert [cb.callback for cb in callbacks] == [observer]  # wrapped so errors name the plugin
    assert callbacks[0].owner == "plugin 'cb', callback Observer"


def test_plugin_task_options_become_the_recipe_schema(tmp_path):
    from pydantic import Field

    from finetune.engine.recipe_file import validate_recipe

    class Options(TaskOptions):
        temperature: float = Field(1.0, gt=0)

    cls = type("Temp", (Task,), {"name": "temp-task", "task_options": Options})
    registry = PluginRegistry()
    registry.register_module(registering(cls), name="temp")
    raw = {"task": {"name": "temp-task", "temperature": 0.5}, "model": {"backbone": "x"},
           "data": {"train": "t.csv"}}
    recipe = validate_recipe(raw, registry.get_task)
    assert recipe.task.temperature == 0.5
    raw["task"]["temprature"] = 2.0
    with pytest.raises(RecipeError, match=r"task.temprature: unknown key \(did you mean 'temperature'\?\)"):
        validate_recipe(raw, registry.get_task)
    del raw["task"]["temprature"]
    raw["task"]["temperature"] = -1
    with pytest.raises(RecipeError, match=r"task.temperature: invalid value -1 \(int\)"):
        validate_recipe(raw, registry.get_task)
