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


@hookimpl
def finetune_claim_data(probe):
    from finetune_rating_regression.task import claim_data

    return claim_data(probe)
