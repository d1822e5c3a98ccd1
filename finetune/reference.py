"""The reference pages, generated from the code so they cannot drift (tests check both are current):

* docs/recipes.md, every recipe key, from the typed sections:
  ``python -m finetune.reference recipes > docs/recipes.md``;
* docs/plugin-reference.md, the plugin contract, from the public docstrings (the hooks, ``Task``, the
  callbacks, every name in ``finetune.__all__``):
  ``python -m finetune.reference plugins > docs/plugin-reference.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel

from finetune.contract.recipe import CORE_SECTIONS, DataOptions, Section, TaskOptions

INTRO = """# Recipe reference

A recipe is a TOML file. `finetune validate recipe.toml` prints the keys it sets and
those that matter for the run (`--all`: every key, defaults filled in), and names keys
that are set but not used; `--set SECTION.KEY=VALUE` overrides any key from the
command line (the value parses as a TOML literal, else as a string). Unknown
sections and keys are errors with a "did you mean" hint. Relative paths resolve
against the recipe file's folder, not the current directory: data files and
`output.dir` alike (the recipes in `recipes/` write to `runs/<name>` with
`dir = "../runs/<name>"`). Each task's section also lists the fields
`finetune predict` adds to every input record.

Generated from the code by `python -m finetune.reference recipes`; do not edit by hand.
"""


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in rows:
        out.append(f"| `{key}` | {typ.replace('|', 'or')} | `{default}` | {desc} |")
    return out


def recipe_reference_markdown() -> str:
    from finetune.engine.plugins import get_registry

    lines = [INTRO]
    def add_section(name: str, section: type) -> None:
        lines.extend([f"## [{name}]", ""] + _table(describe_fields(section)) + [""])
        for field_name, info in section.model_fields.items():  # sub-tables such as [distributed.fsdp]
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
                add_section(f"{name}.{field_name}", info.annotation)

    for name, section in CORE_SECTIONS.items():
        add_section(name, section)
    registry = get_registry()
    # Built-in task families only: third-party plugins document their own options.
    for task_name in sorted(n for n, e in registry.tasks.items() if e.distribution == "finetune"):
        task = registry.tasks[task_name].cls
        lines += [f"## Task `{task_name}` ({registry.tasks[task_name].plugin} plugin)", "", task.description, ""]
        for section_name, cls, base in (("task", task.task_options, TaskOptions),
                                         ("data", task.data_options, DataOptions)):
            own = task_specific_fields(cls, base)
            if own:
                heading = f"Keys of `[{section_name}]` this task adds or gives its own meaning:"
                lines += [heading, "", *_table(own), ""]
        if task.prediction_fields:
            lines += ["`finetune predict` adds to each input record (whose own fields are kept as they are):", "",
                      "| field | meaning |", "|---|---|"]
            lines += [f"| `{name}` | {meaning} |" for name, meaning in task.prediction_fields.items()] + [""]
    return "\n".join(lines)


def task_specific_fields(cls: type[BaseModel], base: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """The rows of a task's option class that the core section's table does not already say: keys it adds,
    and keys it redeclares with another description, type or default (``data.train``: an image folder)."""
    core = {row[0]: row for row in describe_fields(base)}
    return [row for row in describe_fields(cls) if core.get(row[0]) != row]


def describe_fields(section: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) rows of a recipe section, for the docs."""
    from pydantic_core import PydanticUndefined

    rows = []
    for name, info in section.model_fields.items():
        if info.default_factory is not None:
            made = info.default_factory()
            default = "see below" if isinstance(made, BaseModel) else repr(made)
        else:
            default = "required" if info.default is PydanticUndefined else repr(info.default)
        rows.append((name, _type_name(info.annotation), default, info.description or ""))
    return rows


def _type_name(annotation: Any) -> str:
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " / ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is Annotated:
        return _type_name(args[0])
    if annotation is type(None):
        return "unset"
    return getattr(annotation, "__name__", str(annotation))


# ---------------------------------------------------------------------------
# the plugin contract (docs/plugin-reference.md)

PLUGIN_INTRO = """# Plugin contract reference

Everything a plugin may rely on: the hooks finetune calls, the `Task` a task family implements (with the
order in which the core calls it), the callback events, and every public name of `finetune`
(`finetune.__all__`). Anything else in finetune may change without notice. The guide with a worked
example is [plugins.md](plugins.md).

Generated from the code's docstrings by `python -m finetune.reference plugins`; do not edit by hand.
"""


def rst_to_markdown(text: str) -> str:
    """A docstring (reST-flavoured) as Markdown: roles and double backticks become code spans, a
    paragraph ending in ``::`` introduces a fenced code block, ``:param x:`` fields become a list."""
    import inspect
    import re

    text = inspect.cleandoc(text)
    text = re.sub(r":(?:class|meth|func|attr|data|mod|exc):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1] if not line.rstrip().endswith(" ::") else line.rstrip()[:-3])
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:] if lines[i].startswith("    ") else "")
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```", *block, "```", ""]
            continue
        field = re.match(r"^:(param \w+|returns?|raises \w+):\s*(.*)", line)
        if field:
            name = field.group(1).replace("param ", "")
            out.append(f"- **{name}**: {field.group(2)}")
        elif out and out[-1].startswith("- **") and line.startswith("    ") and line.strip():
            out[-1] += " " + line.strip()
        else:
            out.append(line)
        i += 1
    return "\n".join(out).strip()


def _signature(obj: Any, name: str | None = None) -> str:
    """``name(arg: type = default, ...) -> type`` with the annotations as written in the source."""
    import inspect

    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name or obj.__name__

    def text(annotation: Any) -> str:
        return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))

    params, star = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        part = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.kind is p.VAR_POSITIONAL:
            star = True
        if p.annotation is not p.empty:
            part += f": {text(p.annotation)}"
        if p.default is not p.empty:
            part += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        params.append(part)
    returns = f" -> {text(sig.return_annotation)}" if sig.return_annotation is not sig.empty else ""
    return f"{name or obj.__name__}({', '.join(params)}){returns}"


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name -> doc`` from the ``#:`` comments of a class body (above an attribute, or after it)."""
    import ast
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.split("\n")
    docs: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if not isinstance(target, ast.Name):
            continue
        above, j = [], node.lineno - 2
        while j >= 0 and lines[j].strip().startswith("#:"):
            above.insert(0, lines[j].strip()[2:].strip())
            j -= 1
        after = lines[node.lineno - 1].split("#:", 1)[1].strip() if "#:" in lines[node.lineno - 1] else ""
        docs[target.id] = " ".join(above) or after
    return docs


def _module_attribute_doc(module: str, name: str) -> str:
    """The ``#:`` comment above a module-level assignment."""
    import importlib
    import inspect

    lines = inspect.getsource(importlib.import_module(module)).split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
    above = []
    while index > 0 and lines[index - 1].startswith("#:"):
        index -= 1
        above.insert(0, lines[index][2:].strip())
    return rst_to_markdown(" ".join(above))


def _annotation(cls: type, name: str) -> str:
    raw = cls.__dict__.get("__annotations__", {}).get(name, "")
    text = raw if isinstance(raw, str) else getattr(raw, "__name__", str(raw))
    return text[len("ClassVar["):-1] if text.startswith("ClassVar[") else text


_REQUIRED_TASK_METHODS = ("prepare_data", "load_model", "lora_targets", "build_dataset", "collate_fn", "predict")


def _task_section() -> list[str]:
    import inspect

    from finetune.contract import task as task_module
    from finetune.contract.task import Task

    out = ["## The lifecycle: what the core calls, in which command", "", rst_to_markdown(task_module.__doc__), "",
           "## `Task`", "", rst_to_markdown(Task.__doc__), "", "### Attributes", "",
           "| attribute | type | default | meaning |", "|---|---|---|---|"]
    docs = _attribute_docs(Task)
    for name, doc in docs.items():
        default = repr(getattr(Task, name)) if name in Task.__dict__ else "(set in `__init__`)"
        default = default.replace("finetune.contract.recipe.", "")
        if default.startswith("<class "):
            default = default[len("<class '"):-2].rsplit(".", 1)[-1]
        out.append(f"| `{name}` | `{_annotation(Task, name)}` | `{default}` | {rst_to_markdown(doc)} |")
    out += ["", "### Methods", ""]
    for name, member in Task.__dict__.items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        kind = "required" if name in _REQUIRED_TASK_METHODS else "optional"
        if name in ("evaluation_step", "compute_metrics"):
            kind = "optional; implement for metrics beyond the loss"
        out += [f"#### `{_signature(member)}`", "", f"*{kind}*", "", rst_to_markdown(member.__doc__ or ""), ""]
    return out


def _hooks_section() -> list[str]:
    from finetune.contract import hookspecs

    out = ["## Hooks", "", rst_to_markdown(hookspecs.__doc__), ""]
    for name in sorted(n for n in dir(hookspecs) if n.startswith("finetune_")):
        fn = getattr(hookspecs, name)
        first = " (first result wins)" if getattr(fn, "finetune_spec", {}).get("firstresult") else ""
        out += [f"### `{_signature(fn)}`{first}", "", rst_to_markdown(fn.__doc__ or ""), ""]
    return out


def _class_section(cls: type, heading: str | None = None, members: bool = True) -> list[str]:
    import inspect

    out = [f"### `{heading or cls.__name__}`", "", rst_to_markdown(cls.__doc__ or ""), ""]
    fields = {k: v for k, v in _attribute_docs(cls).items() if v and k != "PUBLIC"}
    if fields:
        out += ["| field | meaning |", "|---|---|"]
        out += [f"| `{k}` | {rst_to_markdown(v)} |" for k, v in fields.items()]
        out.append("")
    if members:
        public = getattr(cls, "PUBLIC", None)
        for name, member in cls.__dict__.items():
            if name.startswith("_") or (public is not None and name not in public):
                continue
            if getattr(member, "__module__", cls.__module__) != cls.__module__:
                continue  # e.g. pydantic's generated methods
            if isinstance(member, property) and member.__doc__:
                out += [f"- `{cls.__name__}.{name}` (property): {rst_to_markdown(member.__doc__)}"]
            elif inspect.isfunction(member) and member.__doc__:
                out += [f"- `{_signature(member, cls.__name__ + '.' + name)}`: "
                        f"{rst_to_markdown(member.__doc__).replace(chr(10), ' ')}"]
        if out[-1] != "":
            out.append("")
    return out


def _options_section() -> list[str]:
    from finetune.contract.recipe import DataOptions, TaskOptions

    out = ["## Recipe options of a task", "",
           "A task adds its own recipe keys by subclassing `TaskOptions` (the `[task]` section) and "
           "`DataOptions` (`[data]`), pydantic models whose fields take `Field(default, description=...)`; "
           "set them as the task's `task_options` / `data_options`. They are validated with the core's "
           "keys (unknown keys get a did-you-mean hint), shown resolved by `finetune validate`, and a field "
           "typed `PathStr` resolves against the recipe's folder. Read them as `self.recipe.task.<key>` and "
           "`self.recipe.data.<key>`. The keys every subclass inherits:", ""]
    for name, cls in (("task", TaskOptions), ("data", DataOptions)):
        out += [f"`[{name}]` (`{cls.__name__}`):", ""] + _table(describe_fields(cls)) + [""]
    out += ["The other sections (`[model]`, `[peft]`, `[train]`, `[distributed]`, `[output]`, `[hub]`) are the "
            "core's; a task reads them (e.g. `self.recipe.train.seed`) but does not extend them. Every key is "
            "in [recipes.md](recipes.md).", ""]
    return out


def plugin_reference_markdown() -> str:
    import inspect

    import finetune
    from finetune.contract.callbacks import Callback, LoopState
    from finetune.contract.task import DataSplits

    lines = [PLUGIN_INTRO, *_hooks_section(), *_task_section(), "## Types a task receives and returns", ""]
    lines += _class_section(DataSplits, members=False)
    lines += _options_section()
    lines += ["## Callbacks", "", rst_to_markdown(inspect.getmodule(Callback).__doc__), ""]
    lines += _class_section(Callback) + _class_section(LoopState)
    from finetune.contract.rewards import RewardFunction

    lines += ["## Reward functions", "", rst_to_markdown(inspect.getmodule(RewardFunction).__doc__), ""]
    lines += _class_section(RewardFunction)
    documented = {"Task", "DataSplits", "Callback", "LoopState", "RewardFunction", "TaskOptions", "DataOptions",
                  "hookimpl", "FINETUNE_HOOK_VERSION"}
    lines += ["## Everything else in `finetune.__all__`", "",
              "`hookimpl` marks hook implementations (above); `FINETUNE_HOOK_VERSION` is the contract's version, "
              f"`\"{finetune.FINETUNE_HOOK_VERSION}\"`.", ""]
    errors = [n for n in finetune.__all__ if n.endswith("Error")]
    for name in sorted((n for n in finetune.__all__ if n not in documented and n not in errors), key=str.lower):
        obj = getattr(finetune, name)
        if name == "PathStr":
            lines += ["### `PathStr`", "", _module_attribute_doc("finetune.contract.recipe", "PathStr"), ""]
        elif inspect.isclass(obj):
            lines += _class_section(obj)
        elif callable(obj):
            lines += [f"### `{_signature(obj, name)}`", "", rst_to_markdown(obj.__doc__ or ""), ""]
        else:
            lines += [f"### `{name}`", "", rst_to_markdown(getattr(obj, "__doc__", "") or ""), ""]
    lines += ["### Errors", "", "Raise these for problems a user can fix; finetune prints them without a "
              "traceback. Anything else a plugin raises is reported as a `PluginError` naming the plugin.", ""]
    lines += [f"- `{name}`: {rst_to_markdown(getattr(finetune, name).__doc__)}" for name in sorted(errors)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    which = sys.argv[1] if len(sys.argv) > 1 else "recipes"
    if which not in ("recipes", "plugins"):
        sys.exit("usage: python -m finetune.reference recipes|plugins")
    print(recipe_reference_markdown() if which == "recipes" else plugin_reference_markdown(), end="")
