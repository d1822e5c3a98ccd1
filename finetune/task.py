"""The Task interface a task-family plugin implements.

A Task says how to read the data, load the model, where LoRA goes, how to
batch, evaluate and predict. The loop, checkpointing, logging and the run
folder belong to the core and are never rewritten by a plugin.

Keep torch/transformers imports inside methods: task classes are imported
when the CLI starts.

Lifecycle of one run (the core calls, in order)::

    task = TaskClass(recipe)
    splits = task.prepare_data()             # read + validate; may fill task.state
    model, processor = task.load_model(backbone)
    targets = task.lora_targets(model)        # when [peft] target_modules = "auto"
    saved = task.modules_to_save(model)       # when [peft] modules_to_save = "auto"
    train_ds = task.build_dataset(splits.train, processor, training=True)
    eval_ds = task.build_dataset(splits.eval, processor, training=False)
    collate = task.collate_fn(processor)
    ... loop: task.train_batches(train_ds, batch_size, seed, epoch)  # each epoch's index batches
          task.training_loss(model, batch); task.evaluation_step(model, batch)
    task.compute_metrics(predictions, references)
    task.baseline(splits)                     # optional non-neural baseline

For prediction from a finished run the core restores ``task.state`` (saved in
``adapter/finetune_task.json``), calls ``load_model`` and attaches the adapter,
then ``task.predict(model, processor, records)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from finetune.recipe import DataOptions, TaskOptions

if TYPE_CHECKING:
    from finetune.backbones import ResolvedBackbone
    from finetune.recipe import Recipe


@dataclass
class DataSplits:
    """What :meth:`Task.prepare_data` returns: train and eval examples (any sized sequence)."""

    train: Any
    eval: Any
    info: dict[str, Any] = field(default_factory=dict)  #: shown by `finetune validate` (sizes, labels...)


class Task:
    """Base class of every task family. Subclass, set the class attributes, implement the methods."""

    #: Unique task name used in recipes (``[task] name = ...``).
    name: ClassVar[str] = ""
    #: One line shown by ``finetune tasks``.
    description: ClassVar[str] = ""
    #: Typed options of the ``[task]`` section (subclass of :class:`finetune.TaskOptions`).
    task_options: ClassVar[type[TaskOptions]] = TaskOptions
    #: Typed options of the ``[data]`` section (subclass of :class:`finetune.DataOptions`).
    data_options: ClassVar[type[DataOptions]] = DataOptions
    #: Metric used for best-checkpoint selection unless ``[train] metric`` says otherwise.
    default_metric: ClassVar[str] = "eval_loss"
    #: Scalar metric names :meth:`compute_metrics` returns (besides ``eval_loss``); lets a
    #: misspelled ``[train] metric`` fail before training. ``None``: not declared.
    metric_names: ClassVar[tuple[str, ...] | None] = None
    #: Metric names for which lower is better (best-checkpoint selection); names containing
    #: loss, perplexity, mse, mae, wer, cer or error are treated so without being listed.
    lower_is_better: ClassVar[tuple[str, ...]] = ()
    #: Hub metadata for the model card.
    pipeline_tag: ClassVar[str | None] = None
    library_name: ClassVar[str] = "peft"

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        #: JSON-serialisable facts needed to rebuild the model for inference (e.g. label names).
        #: Saved beside the adapter and restored before :meth:`load_model` at prediction time.
        self.state: dict[str, Any] = {}

    # -- data ----------------------------------------------------------
    def prepare_data(self) -> DataSplits:
        """Read and validate the recipe's data; raise :class:`finetune.DataError` on bad input."""
        raise NotImplementedError

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        """Turn examples into a map-style dataset (``__len__`` + ``__getitem__``) of features."""
        raise NotImplementedError

    def collate_fn(self, processor: Any):
        """Return a function mapping a list of dataset items to a batch dict of tensors."""
        raise NotImplementedError

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: ResolvedBackbone) -> tuple[Any, Any]:
        """Return ``(model, processor)`` built from the resolved backbone's local files."""
        raise NotImplementedError

    def lora_targets(self, model: Any) -> list[str] | str:
        """Default LoRA target modules for this model (names or a regex)."""
        raise NotImplementedError

    def modules_to_save(self, model: Any) -> list[str]:
        """Modules trained in full and saved with the adapter (the task head)."""
        return []

    def peft_task_type(self) -> str | None:
        """PEFT ``TaskType`` name (e.g. ``"SEQ_CLS"``) or None."""
        return None

    # -- training and evaluation ---------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        """The scalar loss of one batch (default: ``model(**batch).loss``)."""
        return model(**batch).loss

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """Return ``{"loss": scalar tensor, "predictions": tensor, "references": tensor}`` for a batch.

        Tensors are gathered across processes by the core, then passed to
        :meth:`compute_metrics`.
        """
        outputs = model(**batch)
        return {"loss": outputs.loss}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        """Metrics from all eval predictions (numpy arrays). Scalar values are logged;
        a nested dict (e.g. a per-class report) goes to metrics.json only."""
        return {}

    def finalize_eval(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Adjust the metrics of one evaluation (they include ``eval_loss``), e.g. add perplexity."""
        return metrics

    def after_evaluate(self, model: Any, processor: Any, run_path: Path, step: int,
                       metrics: dict[str, Any]) -> None:
        """Called on the main process after each evaluation; write artifacts (e.g. sample
        generations) under ``run_path``. Must not change the model."""

    def finalize_run(self, run_path: Path, metrics: dict[str, Any]) -> None:
        """Called once when training finished, before metrics.json and the model card are written.
        ``metrics`` is what metrics.json will hold (``best`` includes non-scalar entries of the
        best evaluation under ``best_details``): add entries to it (e.g. data counts) and the core
        writes them to metrics.json and passes them to the card; do not write metrics.json
        yourself. Write other final artifacts (e.g. a confusion-matrix image) under ``run_path``."""

    def train_batches(self, dataset: Any, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The training batches of one epoch, as lists of dataset indices.

        Default: a permutation seeded by ``(seed, epoch)`` cut into batches of ``batch_size``.
        Override to batch differently (e.g. group examples of similar length to save padding).
        The result must depend only on the arguments (exact resume replays it) and hold
        ``ceil(len(dataset) / batch_size)`` batches (the loop plans its steps from that count).
        With ``train.group_by_length`` (the default) and :meth:`example_lengths` implemented,
        examples of similar length are batched together (:func:`finetune.length_grouped_batches`).
        """
        from finetune.loop import epoch_batches, length_grouped_batches

        if self.recipe.train.group_by_length:
            lengths = self.example_lengths(dataset)
            if lengths is not None:
                return length_grouped_batches(list(lengths), batch_size, seed, epoch)
        return epoch_batches(len(dataset), batch_size, seed, epoch)

    def speed_notes(self) -> list[str]:
        """Task speed options in effect that change results (shown by ``finetune validate`` and
        recorded in run.json), one sentence each. Default: none."""
        return []

    def example_lengths(self, dataset: Any) -> list[int] | None:
        """The length of each example of a dataset built by :meth:`build_dataset` (tokens,
        audio samples, ...), in dataset order, or ``None`` (the default) when batches should
        not be grouped by length. Implement it when the collator pads batches to their longest
        example: ``train.group_by_length`` then cuts the padding (and the time spent on it)."""
        return None

    def train_mode(self, model: Any) -> None:
        """Put the model in training mode (default ``model.train()``). Override to keep e.g.
        BatchNorm layers in eval mode, whose running statistics a LoRA adapter does not save."""
        model.train()

    def baseline(self, splits: DataSplits) -> dict[str, float] | None:
        """Optional simple non-neural baseline on the same split; stored as ``baseline.*``."""
        return None

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        """Predict for raw records (dicts with the recipe's input columns).

        ``stream`` is True when results go to a terminal (a generation task may print
        tokens as they come). Prediction settings come from ``self.recipe`` (which
        ``finetune predict --set`` can override)."""
        raise NotImplementedError

    def predict_input_columns(self) -> list[str]:
        """Columns a prediction input must have; the first one receives stdin lines and
        ``--text`` values."""
        return []

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        """Records from ``finetune predict --input PATH`` (default: a table file with
        :meth:`predict_input_columns`). Override for e.g. a folder of images."""
        from finetune.data import load_table, require_columns

        df = load_table(path, key="--input")
        require_columns(df, {f"--input column ({c})": c for c in self.predict_input_columns()}, path)
        return df.to_dict(orient="records")
