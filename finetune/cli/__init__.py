"""The command line (the top layer): ``finetune run``, ``validate``, ``predict``, ``push``, ... and the
plugin scaffold. ``python -m finetune.cli`` runs it too."""

from finetune.cli.main import cli, main

__all__ = ["cli", "main"]
