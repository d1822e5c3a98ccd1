"""finetune plugin: the text-regression task, a callback and a CLI command.

Only hooks live here; the task class is imported inside the hook so that loading the
plugin (which the finetune CLI does at every start) does not import torch.
"""

from finetune import hookimpl

#: The hook contract this plugin was written for (finetune refuses other major versions).
finetune_hook_version = "1"


@hookimpl
def finetune_register_tasks(register):
    from finetune_text_regression.task import TextRegressionTask

    register(TextRegressionTask)


@hookimpl
def finetune_register_callbacks(register):
    register(BestSoFar())


@hookimpl
def finetune_register_commands(cli):
    import click

    @cli.command(name="text_regression-info")
    def info():
        """Say which task the text_regression plugin provides."""
        click.echo("finetune-text-regression provides the task 'text-regression'.")


class BestSoFar:
    """An example observer: appends each evaluation to <run>/text_regression-evals.txt."""

    def on_evaluate(self, run, state, metrics):
        if "text-regression" not in str(run.recipe_file.read_text()):
            return  # only for runs of this plugin's task
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with open(run.path / "text_regression-evals.txt", "a") as fh:
            fh.write(f"step {state.global_step}: {scalars}\n")
