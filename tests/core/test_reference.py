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


def task_sections(reference: str) -> dict[str, str]:
    """``task name -> its section`` of docs/recipes.md."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^## Task `([\w-]+)`(.*?)(?=^## |\Z)", reference,
                                                        flags=re.M | re.S)}


def data_key_row(section: str, key: str) -> str:
    block = section.split("Keys of `[data]`", 1)[1]
    return next(line for line in block.splitlines() if line.startswith(f"| `{key}` |"))


def test_each_task_section_says_what_its_data_keys_take():
    """data.train is a table for some tasks and a folder for others: each task's section says which (from its
    own DataOptions subclass), and the core's [data] table says to look there."""
    reference = recipe_reference_markdown()
    sections = task_sections(reference)
    assert {"text-classification", "image-classification", "audio-classification", "speech-recognition",
            "causal-lm"} <= set(sections)
    core_train = next(line for line in reference.split("## [data]", 1)[1].splitlines() if line.startswith("| `train`"))
    assert "each task's section says what it takes" in core_train
    expected = {"image-classification": "Image folder", "audio-classification": "folder of audio clips with one "
                "subfolder per class", "speech-recognition": "a folder is not enough",
                "text-classification": "Training table", "causal-lm": "a .jsonl file"}
    for task, words in expected.items():
        for key in ("train", "eval"):
            row = data_key_row(sections[task], key)  # every built-in task describes both
            assert row != next(line for line in reference.splitlines() if line.startswith(f"| `{key}` |")), (task, key)
        assert words in data_key_row(sections[task], "train"), task


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


#: How a repository path named in the docs starts (code spans and bare paths); a path relative to
#: finetune/ (``engine/loop.py``) or tests/ (``core/test_cli.py``) counts as well. Link targets always count.
_REPO_PATH_STARTS = ("../", "./", "docs/", "tests/", "finetune/", "plugins/", "recipes/", "examples/", "benchmarks/",
                     "contract/", "engine/", "run/", "cli/", "core/")


def named_paths(markdown: str) -> set[str]:
    """Repository paths a Markdown page names outside code blocks: link targets, code spans and bare words
    such as docs/recipes.md. Placeholders (``runs/<name>``), URLs and absolute paths are not paths here."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)  # code blocks show other trees
    links = re.findall(r"\]\(([^)\s#]+)", text)
    spans = re.findall(r"`([^`\s]+)`", text) + re.findall(
        r"(?<![\w/.`-])((?:docs|tests|finetune|plugins|recipes|examples|benchmarks)/[\w./*-]*[\w/*])", text)
    candidates = links + [c for c in spans if c.startswith(_REPO_PATH_STARTS)]
    return {c.rstrip(".,:;") for c in candidates
            if "://" not in c and not c.startswith(("/", "mailto:")) and not any(ch in c for ch in "<>$~{}()")}


def _in_repository(name: str, page: Path) -> bool:
    """Whether ``name`` (a glob when it has ``*``) is a path inside the repository, relative to the repository,
    the page's folder, finetune/ or tests/."""
    for root in (REPO, page.parent, REPO / "finetune", REPO / "tests"):
        for path in root.glob(name.rstrip("/")) if "*" in name else [root / name]:
            if path.exists() and path.resolve().is_relative_to(REPO):
                return True
    return False


def test_paths_named_in_the_docs_exist_in_the_repository():
    missing = [f"docs/{page.name}: {name}" for page in sorted((REPO / "docs").glob("*.md"))
               for name in sorted(named_paths(page.read_text())) if not _in_repository(name, page)]
    assert missing == [], "paths named in the docs that are not in the repository:\n" + "\n".join(missing)


def test_named_paths_finds_paths_and_skips_what_is_not_one():
    page = ("See `../shared/design/ARCHITECTURE.md`, [recipes](recipes.md#data) and docs/hub.md; `engine/loop.py`.\n"
            "```\nmy-plugin/tests/test_x.py\n```\n`runs/<recipe name>` `https://x.org/a/b` `/usr/bin/time` `a.b`\n"
            "[site](https://example.org/x)\n")
    assert named_paths(page) == {"../shared/design/ARCHITECTURE.md", "recipes.md", "docs/hub.md", "engine/loop.py"}
    assert not _in_repository("../shared/design/ARCHITECTURE.md", REPO / "docs" / "design.md")  # outside
    assert _in_repository("core/test_distributed*.py", REPO / "docs" / "design.md")
