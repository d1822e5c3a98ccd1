"""finetune: adapt pretrained models to small domain datasets with LoRA.

The public API for plugin authors is the names in ``__all__``; everything else
may change. Importing this package does not import torch.
"""

from finetune.backbones import ResolvedBackbone
from finetune.data import load_table, require_columns, split_frame
from finetune.errors import BackboneError, DataError, FinetuneError, PluginError, RecipeError
from finetune.plugins import HOOK_VERSION as FINETUNE_HOOK_VERSION
from finetune.plugins import hookimpl
from finetune.recipe import DataOptions, PathStr, TaskOptions
from finetune.task import DataSplits, Task

__version__ = "0.1.0"

__all__ = [
    "FINETUNE_HOOK_VERSION",
    "BackboneError",
    "DataError",
    "DataOptions",
    "DataSplits",
    "FinetuneError",
    "PathStr",
    "PluginError",
    "RecipeError",
    "ResolvedBackbone",
    "Task",
    "TaskOptions",
    "hookimpl",
    "load_table",
    "require_columns",
    "split_frame",
]
