"""finetune: adapt pretrained models to small domain datasets with LoRA.

The public API for plugin authors is the names in ``__all__``, each documented in
docs/plugin-reference.md; everything else may change. Importing this package does
not import torch.

The package is layered, imports going one way (a test keeps it so): ``errors`` at the
bottom; ``contract/`` (what a plugin implements and uses); ``engine/`` (recipes, plugins,
backbones, LoRA, the loop, evaluation, checkpoints, the run folder); ``run/`` (a run end to
end and what it leaves: adapter, card, hub, inference); ``cli/`` and ``testing`` on top.
"""

from finetune.contract.backbone import ResolvedBackbone, cache_root, cached_folder, package_dir, upstream_id_of
from finetune.contract.batching import epoch_batches, length_grouped_batches
from finetune.contract.cache import TokenColumns, cached_encode, frame_fingerprint, tokenizer_fingerprint
from finetune.contract.callbacks import Callback, LoopState
from finetune.contract.hookspecs import HOOK_VERSION as FINETUNE_HOOK_VERSION
from finetune.contract.hookspecs import hookimpl
from finetune.contract.labels import label_text, sorted_labels
from finetune.contract.layers import attention_projections, resolve_layers, transformer_layers
from finetune.contract.multilabel import (
    average_precisions,
    multi_hot,
    multilabel_metrics,
    multilabel_report,
    parse_labels,
    selected_thresholds,
    thresholded_report,
    tune_thresholds,
)
from finetune.contract.probe import Claim, ColumnStats, DataProbe, FolderInfo, TableInfo
from finetune.contract.recipe import DataOptions, PathStr, Recipe, TaskOptions, is_adapter_method
from finetune.contract.rewards import RewardFunction
from finetune.contract.tables import load_table, read_jsonl, require_columns, split_frame
from finetune.contract.task import DataSplits, ExportGraph, Task, missing_input_column, named_inputs_graph
from finetune.engine.datasets_source import DatasetSource, DatasetSplit, open_dataset
from finetune.engine.plugins import reward_functions
from finetune.engine.quantize import quantization_kwargs
from finetune.engine.run_folder import RunDir
from finetune.errors import BackboneError, DataError, ExportError, FinetuneError, PluginError, RecipeError, did_you_mean
from finetune.run.inference import load_run
from finetune.run.merge import MergedRun, merge_run

__version__ = "0.1.0"

__all__ = [
    "FINETUNE_HOOK_VERSION",
    "BackboneError",
    "Callback",
    "Claim",
    "ColumnStats",
    "DataError",
    "DataOptions",
    "DataProbe",
    "DataSplits",
    "DatasetSource",
    "DatasetSplit",
    "ExportError",
    "ExportGraph",
    "FinetuneError",
    "FolderInfo",
    "LoopState",
    "MergedRun",
    "PathStr",
    "PluginError",
    "Recipe",
    "RecipeError",
    "ResolvedBackbone",
    "RewardFunction",
    "RunDir",
    "TableInfo",
    "Task",
    "TokenColumns",
    "TaskOptions",
    "attention_projections",
    "average_precisions",
    "cache_root",
    "cached_encode",
    "cached_folder",
    "did_you_mean",
    "epoch_batches",
    "frame_fingerprint",
    "hookimpl",
    "is_adapter_method",
    "label_text",
    "length_grouped_batches",
    "load_run",
    "load_table",
    "merge_run",
    "missing_input_column",
    "multi_hot",
    "multilabel_metrics",
    "multilabel_report",
    "named_inputs_graph",
    "open_dataset",
    "package_dir",
    "parse_labels",
    "quantization_kwargs",
    "read_jsonl",
    "require_columns",
    "resolve_layers",
    "reward_functions",
    "selected_thresholds",
    "sorted_labels",
    "split_frame",
    "thresholded_report",
    "tokenizer_fingerprint",
    "transformer_layers",
    "tune_thresholds",
    "upstream_id_of",
]
