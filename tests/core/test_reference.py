"""Docs that are generated from code stay current, and the plugin contract is documented whole."""

import re
from pathlib import Path

from finetune.reference import plugin_reference_markdown, recipe_reference_markdown

REPO = Path(__file__).resolve().parents[2]


def test_recipe_reference_is_current():
    current = (REPO / "docs" / "recipes.md").read_text()
    assert current.strip() == recipe_reference_markdown().strip(), \
        "docs/recipes.md is stale: run `python -m finetune.reference recipes > docs/recipes.md`"


def test_every_recipe_key_in_the_quickstart_is_documented():
    import tomllib

    reference = (REPO / "docs" / "recipes.md").read_text()
    recipe = tomllib.loads((REPO / "recipes" / "text-quickstart.toml").read_text())
    for section, keys in recipe.items():
        assert f"## [{section}]" in reference
        for key in keys:
            assert f"`{key}`" in reference, f"{section}.{key} missing from docs/recipes.md"


def test_plugin_reference_is_current():
    current = (REPO / "docs" / "plugin-reference.md").read_text()
    assert current == plugin_reference_markdown(), \
        "docs/plugin-reference.md is stale: run `python -m finetune.reference plugins > docs/plugin-reference.md`"


def test_the_plugin_reference_documents_every_public_name_hook_and_task_member():
    import inspect

    import finetune
    from finetune.contract import hookspecs
    from finetune.contract.task import Task

    reference = (REPO / "docs" / "plugin-reference.md").read_text()
    headings = re.findall(r"^#+ `([A-Za-z_]+)", reference, flags=re.M)
    listed = set(headings) | set(re.findall(r"^- `([A-Za-z_]+)`", reference, flags=re.M))
    for name in finetune.__all__:
        assert name in listed or f"`{name}`" in reference, f"finetune.{name} is not documented"
    for name in dir(hookspecs):
        if name.startswith("finetune_"):
            assert name in headings, name
    for name, member in vars(Task).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            assert name in headings, f"Task.{name}"
            assert member.__doc__ and len(member.__doc__) > 40, f"Task.{name} needs a docstring saying what to return"
    for name in ("name", "description", "task_options", "data_options", "default_metric", "metric_names",
                 "lower_is_better", "pipeline_tag", "library_name", "eval_pad_value", "state"):
        assert f"| `{name}` |" in reference, f"Task.{name}"


def test_the_guide_sends_no_one_to_the_core_source():
    guide = (REPO / "docs" / "plugins.md").read_text()
    assert "plugin-reference.md" in guide
    assert not re.search(r"finetune/(contract|engine|run|cli)/\w+\.py", guide), "the docs are the contract"
