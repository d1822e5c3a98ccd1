"""finetune: adapt pretrained models to small domain datasets with LoRA.

The public API for plugin authors is the names in ``__all__``; everything else
may change. Importing this package does not import torch.
"""

from finetune.backbones import ResolvedBackbone, resolve_layers, transformer_layers
from finetune.data import load_table, require_columns, split_frame
from finetune.errors import BackboneError, DataError, FinetuneError, PluginError, RecipeError
from finetune.fast_dropout import fast_dropout_applies, numpy_dropout
from finetune.loop import LoopState, epoch_batches, length_grouped_batches
from finetune.plugins import HOOK_VERSION as FINETUNE_HOOK_VERSION
from finetune.plugins import hookimpl
from finetune.prefix_cache import FrozenPrefixCache
from finetune.recipe import DataOptions, PathStr, TaskOptions
from finetune.runner import load_run
from finetune.runs import RunDir
from finetune.task import DataSplits, Task
from finetune.zoo import cache_root, cached_folder, package_dir

__version__ = "0.1.0"

__all__ = [
    "FINETUNE_HOOK_VERSION",
    "BackboneError",
    "DataError",
    "DataOptions",
    "DataSplits",
    "FinetuneError",
    "FrozenPrefixCache",
    "LoopState",
    "PathStr",
    "PluginError",
    "RecipeError",
    "ResolvedBackbone",
    "RunDir",
    "Task",
    "TaskOptions",
    "cache_root",
    "cached_folder",
    "epoch_batches",
    "fast_dropout_applies",
    "hookimpl",
    "length_grouped_batches",
    "load_run",
    "load_table",
    "numpy_dropout",
    "package_dir",
    "require_columns",
    "resolve_layers",
    "split_frame",
    "transformer_layers",
]
