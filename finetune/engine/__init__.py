"""Layer 2, the engine: turning a recipe into a trained model. Reading recipes, loading plugins and
backbones, attaching LoRA, the training loop, evaluation, checkpoints, precision and distribution,
the run folder on disk. Imports the contract, never the layers above."""
