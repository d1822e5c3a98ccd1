"""What `finetune validate` (and the model card) show of a recipe: the keys the user set and the ones that
matter for this run; defaults and settings that do not apply only with --all (finetune.run.recipe_view)."""

from __future__ import annotations

import tomllib

from conftest import run_cli

from finetune.engine.recipe_file import load_recipe
from finetune.run.recipe_view import recipe_view


def shown_recipe(stdout: str) -> dict:
    """The TOML block `validate` prints, parsed (it ends where the summary starts)."""
    block = stdout.split("# resolved recipe", 1)[1].split("\ntask:", 1)[0]
    return tomllib.loads(block.split("\n", 1)[1])


def without_split(recipe):
    raw = tomllib.loads(recipe.read_text())
    del raw["data"]["split"]
    import tomli_w

    recipe.write_text(tomli_w.dumps(raw))
    return recipe


def test_validate_shows_the_keys_set_and_what_matters_and_all_shows_every_key(make_recipe, sentiment_csv):
    recipe = without_split(make_recipe(data=f'eval = "{sentiment_csv}"'))
    short = run_cli("validate", str(recipe))
    assert short.returncode == 0, short.stderr
    assert "defaults not shown; --all shows every key" in short.stdout
    shown = shown_recipe(short.stdout)
    assert "split" not in shown["data"]  # data.eval gives the evaluation data
    assert "distributed" not in shown and "hub" not in shown  # a plain single-process run, nothing pushed
    assert "dataset_split" not in shown["data"] and "fast_dropout" not in shown["train"]  # defaults
    # every key the recipe sets is shown, whatever its value
    assert shown["data"]["max_length"] == 16 and shown["data"]["eval"] == str(sentiment_csv)
    assert shown["peft"] == {"method": "lora", "r": 4, "alpha": 8}  # method: what the run does, though default
    assert shown["train"]["log_every_steps"] == 2 and shown["train"]["mixed_precision"] == "no"
    assert shown["output"]["dir"].endswith("run")

    full = run_cli("validate", str(recipe), "--all")
    assert full.returncode == 0, full.stderr
    every = shown_recipe(full.stdout)
    assert every["data"]["split"] == 0.2 and every["train"]["fast_dropout"] is True
    assert {"fsdp", "deepspeed"} <= set(every["distributed"]) and every["hub"]["push"] is False
    dry = run_cli("run", str(recipe), "--dry-run", "--all", "--set", "data.split=0.3")
    assert dry.returncode == 0, dry.stderr
    assert shown_recipe(dry.stdout) == {**every, "data": {**every["data"], "split": 0.3}}
    assert "note:             data.split is not used: data.eval gives the evaluation data." in dry.stdout
    misplaced = run_cli("run", str(recipe), "--all")
    assert misplaced.returncode == 2 and "--all only changes what --dry-run shows" in misplaced.stderr


def test_keys_set_that_do_not_apply_are_shown_with_why(make_recipe, sentiment_csv):
    recipe = load_recipe(make_recipe(data=f'eval = "{sentiment_csv}"', extra='[hub]\nrepo_id = "me/x"\n'),
                         ["peft.method=none", "distributed.fsdp.cpu_offload=true"])
    table, notes, hidden = recipe_view(recipe)
    assert table["data"]["split"] == 0.25 and table["hub"] == {"repo_id": "me/x"}
    assert table["distributed"] == {"fsdp": {"cpu_offload": True}}
    assert "data.split is not used: data.eval gives the evaluation data." in notes
    assert "hub.repo_id is not used: hub.push is false (nothing is pushed to the Hub)." in notes
    assert "distributed.fsdp.cpu_offload is not used: distributed.strategy is 'ddp'." in notes
    assert "peft.r is not used: peft.method is 'none' (it does not use r)." in notes  # set by make_recipe
    assert hidden > 20
    everything, no_notes, _ = recipe_view(recipe, everything=True)
    assert everything == recipe.to_dict() and no_notes == []


def test_what_the_run_resolved_is_shown_and_a_strategy_shows_its_own_options(make_recipe):
    recipe = load_recipe(make_recipe(), ["distributed.strategy=fsdp"])
    recipe.model.revision = "a" * 40  # pinned by the backbone's resolution, not written by the user
    table = recipe_view(recipe)[0]
    assert table["model"]["revision"] == "a" * 40
    assert table["distributed"] == {"strategy": "fsdp"}  # fsdp options at their defaults stay hidden
    assert "deepspeed" not in table["distributed"]
    assert recipe.user_keys >= {"distributed.strategy", "data.split", "train.seed"}
    assert "model.revision" not in recipe.user_keys
