"""Docs that are generated from code stay current."""

from pathlib import Path

from finetune.reference import recipe_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    current = (REPO / "docs" / "recipes.md").read_text()
    assert current.strip() == recipe_reference_markdown().strip(), \
        "docs/recipes.md is stale: run `python -m finetune.reference > docs/recipes.md`"


def test_every_recipe_key_in_the_quickstart_is_documented():
    import tomllib

    reference = (REPO / "docs" / "recipes.md").read_text()
    recipe = tomllib.loads((REPO / "recipes" / "text-quickstart.toml").read_text())
    for section, keys in recipe.items():
        assert f"## [{section}]" in reference
        for key in keys:
            assert f"`{key}`" in reference, f"{section}.{key} missing from docs/recipes.md"
