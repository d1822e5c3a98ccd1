"""``python -m finetune`` runs the command line, as the ``finetune`` script does."""

from finetune.cli.main import main

if __name__ == "__main__":
    main()
