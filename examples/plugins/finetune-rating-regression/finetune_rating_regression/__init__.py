"""finetune plugin: the rating-regression task.

Only hooks live here; the task class is imported inside the hook so that loading the plugin (which the
finetune CLI does at every start) does not import torch.
"""

from finetune import hookimpl

#: The hook contract this plugin was written for (finetune refuses other major versions).
finetune_hook_version = "1"


@hookimpl
def finetune_register_tasks(register):
    from finetune_rating_regression.task import RatingRegressionTask

    register(RatingRegressionTask)


#: Column names that say "a rating" (what this task is for; text-regression takes any number).
RATING_NAMES = ("rating", "ratings", "stars", "score", "scores", "grade")


@hookimpl
def finetune_claim_data(probe):
    """``finetune init``: claim a table with a text column and a rating column (a number named like one).

    Only the probe is read (``probe.table``: its columns summarised); the claim proposes the recipe."""
    from finetune import Claim

    table = probe.table
    if table is None:
        return None
    texts = [c for c in table.columns.values() if c.kind == "text"]
    ratings = [c for c in table.columns.values()
               if c.numeric and c.name.lower() in RATING_NAMES and c.distinct >= 2]
    if not texts or not ratings:
        return None
    text = max(texts, key=lambda c: c.mean_words)
    rating = ratings[0]
    return Claim(
        task="rating-regression", score=0.75,
        reasons=[f"column `{rating.name}` is named like a rating and holds numbers ({rating.describe()})",
                 f"column `{text.name}` looks like text: {text.describe()}"],
        settings={"model": {"backbone": "sentence-transformers/all-MiniLM-L6-v2"},
                  "data": {"train": probe.path, "text_column": text.name, "target_column": rating.name,
                           "split": 0.2},
                  "train": {"epochs": 3, "learning_rate": 5e-4}},
        comments={"data.target_column": "the rating to predict (standardised for training)",
                  "model.backbone": "offline on a finetune install"})
