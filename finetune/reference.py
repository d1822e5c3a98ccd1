"""The recipe reference (docs/recipes.md), generated from the typed sections so it cannot drift.

Regenerate with ``python -m finetune.reference > docs/recipes.md``; a test checks it is current.
"""

from __future__ import annotations

from finetune.recipe import CORE_SECTIONS, DataOptions, Section, TaskOptions, describe_fields

INTRO = """# Recipe reference

A recipe is a TOML file. `finetune validate recipe.toml` prints it fully resolved
(every default filled in); `--set SECTION.KEY=VALUE` overrides any key from the
command line (the value parses as a TOML literal, else as a string). Unknown
sections and keys are errors with a "did you mean" hint. Relative paths resolve
against the recipe file's folder.

Generated from the code by `python -m finetune.reference`; do not edit by hand.
"""


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in rows:
        out.append(f"| `{key}` | {typ.replace('|', 'or')} | `{default}` | {desc} |")
    return out


def recipe_reference_markdown() -> str:
    from finetune.plugins import get_registry

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
            extra = [r for r in describe_fields(cls) if r[0] not in base.model_fields]
            if extra:
                lines += [f"Extra keys in `[{section_name}]`:", ""] + _table(extra) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(recipe_reference_markdown())
