"""The Task interface a task-family plugin implements.

A Task says how to read the data, load the model, where LoRA goes, how to batch, evaluate and
predict. The loop, checkpointing, logging, the run folder, pushing and distribution belong to the
core and are never rewritten by a plugin. One Task object is made per command from the recipe
(``TaskClass(recipe)``); the core calls its methods in the order below. Keep torch/transformers
imports inside methods: task classes are imported when the CLI starts.

``finetune run`` (and ``finetune validate``, which stops after one collated batch)::

    task = TaskClass(recipe)
    splits = task.prepare_data()                   # read + validate train/eval(/test); fill task.state
    model, processor = task.load_model(backbone)   # task.state is already filled
    task.lora_targets(model)                       # when [peft] target_modules = "auto"
    task.modules_to_save(model)                    # when [peft] modules_to_save = "auto"
    task.peft_task_type()
    train_ds = task.build_dataset(splits.train, processor, training=True)
    eval_ds = task.build_dataset(splits.eval, processor, training=False)
    collate = task.collate_fn(processor)
    task.example_lengths(train_ds), task.speed_notes()   # reported by validate, recorded in run.json
    --- validate stops here, after collate(first items) ---
    task.baseline(splits)                          # optional non-neural baseline
    task.example_lengths(eval_ds)                  # eval batches longest first
    evaluation before training (step 0, train.eval_before_training): as below
    every epoch:
        task.train_batches(train_ds, batch_size, seed, epoch)
        task.train_mode(model)
        per micro-batch: task.training_loss(model, batch)
        at each logging step: task.training_logs()    # extra numbers for the log line
        at each evaluation (eval mode, no grad):
            task.evaluating = "eval"                  # the eval split: may tune (a threshold) into task.state
            per eval batch: task.evaluation_step(model, batch)
            task.compute_metrics(predictions, references)   # all batches, all processes gathered
            task.finalize_eval(metrics)
            task.after_evaluate(model, processor, run_path, step, metrics)   # main process only
            task.train_mode(model)
    the test split (``splits.test``, if any): the selected adapter is loaded back, its saved ``state`` put
    back into ``task.state``, and scored once as at an evaluation with ``task.evaluating = "test"``
    (build_dataset, evaluation_step, compute_metrics, finalize_eval): metrics.json ``test``
    task.state = <the selected adapter's state>   # what an evaluation tuned goes with the selected weights
    task.finalize_run(run_path, metrics)           # main process, before metrics.json and the card
    task.data_summary(splits)                      # main process: for report.html (report_data.json)
    task.report_samples(model, processor, splits.eval, run_path, limit)   # the selected adapter, no grad
    task.usage_snippet(base)                       # for the model card

A resumed run (``finetune run recipe.toml`` on an unfinished run folder, or ``--resume``) makes the
task the same way: ``prepare_data`` runs again (so ``state`` is rebuilt from the data), the model is
loaded, then the checkpoint's trainable weights, optimizer and RNG states replace the fresh ones; the
step-0 evaluation is not repeated. ``finetune predict RUN`` (and ``load_run``)::

    task = TaskClass(recipe)                       # the run's resolved recipe (+ predict's --set)
    task.state = <adapter/finetune_task.json>      # restored BEFORE load_model
    model, processor = task.load_model(backbone)   # then the adapter is attached, model.eval()
    records = task.read_predict_input(path)        # --input FILE; --text/stdin use predict_input_columns()
    task.predict(model, processor, records, batch_size, stream)   # under torch.no_grad()

``finetune serve RUN`` loads the run the same way, then answers requests in one worker thread:
``task.predict`` on the records of several requests at once (``POST /predict``), and, when the task
implements it, ``task.generate_text`` for one OpenAI-style completion at a time.

``finetune evaluate RUN --input FILE`` loads the run as ``predict`` does, then scores FILE::

    examples = task.read_examples(path, "--input")
    task.build_dataset(examples, processor, training=False), collate_fn
    task.evaluating = "input", then evaluation_step, compute_metrics, finalize_eval   # as at an evaluation

``finetune sweep RECIPE`` makes the task once, as ``finetune run`` does, before any trial::

    task = TaskClass(recipe)
    task.sweep_space()                             # only when the recipe and --param name no search space

then runs each trial as ``finetune run`` (above) on a recipe with the trial's values.

``finetune export RUN --format FORMAT`` loads the run as ``predict`` does (refused unless FORMAT is in
:attr:`Task.export_formats`), then::

    examples = splits.eval of task.prepare_data() (task.state kept as saved), or task.read_examples(--input)
    batch = collate_fn(processor)([build_dataset(examples, processor, training=False)[i] for the first rows])
    onnx:  task.export_graph(model, processor, batch)     # the trained model (adapter attached): reference
           task.export_graph(merged, processor, batch)    # the merged model: exported, checked with onnxruntime
    other: task.export_file(FORMAT, merged, processor, folder, options)   # writes and checks its files

``finetune push`` calls no task method: it uploads the run folder (adapter, processor, recipe, metrics,
card) as written at the end of training.

The core passes every argument by position, except ``training`` (``build_dataset``) and
``batch_size``/``stream`` (``predict``), which it passes by name: an override may rename the others.
Every method runs through the core's guard: an exception (other than a ``finetune`` error, which is
shown as it is) is reported naming the plugin, the task and the method, and a return value that breaks
the contract (wrong type, one prediction per example missing, a prediction that overwrites an input
field, a loss without gradient, ...) is reported the same way, with what was wrong with it.
``finetune.testing.check_plugin`` checks method names and signatures against this class before anything
runs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from finetune.contract.batching import epoch_batches, length_grouped_batches
from finetune.contract.recipe import DataOptions, Recipe, TaskOptions
from finetune.contract.tables import load_table
from finetune.errors import DataError, did_you_mean

if TYPE_CHECKING:
    from finetune.contract.backbone import ResolvedBackbone


@dataclass
class ExportGraph:
    """What :meth:`Task.export_graph` returns: the model as a graph ``finetune export --format onnx`` can trace.

    ``module`` is a ``torch.nn.Module`` that takes the tensors of ``inputs`` by position, in that order, and
    returns one tensor whose first dimension is the batch (the logits). ``inputs`` maps each input's name
    (the ONNX input name) to an example tensor taken from a real batch. ``dynamic_axes`` names the axes that
    may change size per input, e.g. ``{"input_ids": {0: "batch", 1: "sequence"}}`` (the batch axis of
    every input is dynamic even when not listed). ``usage`` is Python code for the exported folder's card:
    it builds the inputs from raw data with the preprocessing files saved beside ``model.onnx`` and runs
    ``onnxruntime`` (the ``session`` variable is ``ort.InferenceSession('model.onnx')``)."""

    module: Any
    inputs: dict[str, Any]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    usage: str = ""
    output_name: str = "logits"


def named_inputs_graph(model: Any, batch: dict[str, Any], names: list[str], *,
                       dynamic_axes: dict[str, dict[int, str]] | None = None, usage: str = "") -> ExportGraph:
    """The :class:`ExportGraph` of a model called with named tensors that returns an output with ``.logits`` (a
    transformers model, with or without its adapter): ``model(**{name: tensor}).logits``, the tensors taken by
    position in the order of ``names`` (the ONNX input names), the example inputs ``batch[name]``. What the text
    and audio classification tasks return from :meth:`Task.export_graph`; write your own module for a model that
    takes its inputs otherwise (e.g. positional pixels) or returns something else."""
    from finetune.contract.export_module import NamedInputsLogits

    return ExportGraph(module=NamedInputsLogits(model, names), inputs={n: batch[n] for n in names},
                       dynamic_axes=dict(dynamic_axes or {}), usage=usage)


@dataclass
class DataSplits:
    """What :meth:`Task.prepare_data` returns.

    ``train`` and ``eval`` are the examples in any sized form the task's :meth:`Task.build_dataset`
    understands (a pandas DataFrame, a list of dicts, ...); neither may be empty. ``eval`` is scored at
    every evaluation and selects the best checkpoint. ``test`` (None unless the recipe sets ``data.test``,
    ``data.test_split`` or ``data.dataset_test_split``) is never used for selection: the core scores it
    once, with the selected adapter, after training. ``info`` holds JSON-serialisable facts shown by
    ``finetune validate`` as ``data.<key>: value`` and recorded in run.json (sizes, label names,
    counts...)."""

    train: Any
    eval: Any
    info: dict[str, Any] = field(default_factory=dict)
    test: Any = None


class Task:
    """Base class of every task family. Subclass it, set the class attributes, implement the methods.

    Required: :attr:`name`, :meth:`prepare_data`, :meth:`load_model`, :meth:`lora_targets`,
    :meth:`build_dataset`, :meth:`collate_fn`, :meth:`predict`, and, for anything but a loss,
    :meth:`evaluation_step` with :meth:`compute_metrics`. Everything else has a working default.

    Instance attributes: ``self.recipe`` (the validated :class:`finetune.Recipe`, with the task's own
    ``[task]``/``[data]`` option classes) and ``self.state`` (see :attr:`state`)."""

    #: Unique task name used in recipes (``[task] name = ...``): lower-case words joined by ``-``.
    name: ClassVar[str] = ""
    #: One line shown by ``finetune tasks``.
    description: ClassVar[str] = ""
    #: Typed options of the ``[task]`` section: a subclass of :class:`finetune.TaskOptions`.
    task_options: ClassVar[type[TaskOptions]] = TaskOptions
    #: Typed options of the ``[data]`` section: a subclass of :class:`finetune.DataOptions`.
    data_options: ClassVar[type[DataOptions]] = DataOptions
    #: Metric used for best-checkpoint selection unless ``[train] metric`` says otherwise.
    default_metric: ClassVar[str] = "eval_loss"
    #: Scalar metric names :meth:`compute_metrics` returns (besides ``eval_loss``); lets a misspelled
    #: ``[train] metric`` fail before training. ``None``: not declared (checked after the first evaluation).
    metric_names: ClassVar[tuple[str, ...] | None] = None
    #: Metric names for which lower is better (best-checkpoint selection); names containing loss,
    #: perplexity, mse, mae, wer, cer or error are treated so without being listed.
    lower_is_better: ClassVar[tuple[str, ...]] = ()
    #: The Hub's pipeline tag for the model card (e.g. ``"text-classification"``), or None.
    pipeline_tag: ClassVar[str | None] = None
    #: The library that loads what is pushed: ``"peft"`` (an adapter), ``"transformers"`` or ``"timm"``.
    library_name: ClassVar[str] = "peft"
    #: Whether ``peft.method = "prompt-tuning" / "prefix-tuning"`` may train this task: virtual tokens go
    #: before every input (prompt) or into every attention layer (prefix), so the task's loss and outputs must
    #: come from the PEFT model's own forward (which accounts for them) and must not assume one output
    #: position per input token. Off: such a recipe is refused at validate time.
    prompt_learning: ClassVar[bool] = False
    #: Whether ``model.quantize = "4bit" / "8bit"`` (QLoRA) may train this task: :meth:`load_model` passes
    #: ``finetune.quantization_kwargs(self.recipe)`` to its transformers ``from_pretrained`` (bitsandbytes
    #: quantizes the nn.Linear layers). Off: such a recipe is refused at validate time.
    quantizable: ClassVar[bool] = False
    #: Fill value for evaluation outputs of different widths (see :meth:`evaluation_step`): tensors are
    #: padded with it to the widest batch before :meth:`compute_metrics` sees them.
    eval_pad_value: ClassVar[int | float] = -100
    #: The fields :meth:`predict` adds to each input record, name -> one-line meaning (listed by ``finetune
    #: predict --help`` and the docs). Names start with ``pred_`` (``prob_`` for a class probability);
    #: ``<...>`` stands for a varying part, e.g. ``{"prob_<label>": "probability of that label"}``. When
    #: given, the core checks that every field a prediction adds is listed. Empty: not declared.
    prediction_fields: ClassVar[dict[str, str]] = {}
    #: What ``finetune export RUN --format ...`` can make of this task's runs: ``"onnx"`` (implement
    #: :meth:`export_graph`; the core exports and checks it), ``"safetensors"`` (the merged model as a
    #: standalone folder: :meth:`export_file`'s default saves a model that has ``save_pretrained``), or a
    #: format :meth:`export_file` writes itself (e.g. ``"gguf"``). Empty: the task exports nothing.
    export_formats: ClassVar[tuple[str, ...]] = ()

    #: Which examples the evaluation in progress scores, set by the core before it calls
    #: :meth:`evaluation_step` and :meth:`compute_metrics`: ``"eval"`` (the eval split, during training,
    #: before the first step included: it selects the checkpoint, so a task may tune something on it, e.g.
    #: decision thresholds kept in :attr:`state`), ``"test"`` (the test split, once after training, with the
    #: selected adapter and its saved state) or ``"input"`` (labelled examples given to ``finetune evaluate
    #: --input``). Only ``"eval"`` may tune; the others score with what :attr:`state` holds.
    evaluating: str = "eval"

    #: JSON-serialisable facts needed to rebuild the model for inference (label names, target scaling...).
    #: Fill it in :meth:`prepare_data`; the core saves it beside the adapter (``finetune_task.json``) and
    #: restores it before :meth:`load_model` when a run is loaded for prediction. Read it in
    #: :meth:`load_model`, :meth:`compute_metrics` and :meth:`predict`, never the training data. It is saved
    #: with every new best adapter, so what :meth:`compute_metrics` tunes on the eval split (a threshold) goes
    #: with those weights; after training (test split, :meth:`finalize_run`, the card) the core puts the
    #: selected adapter's saved state back here.
    state: dict[str, Any]

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.state = {}

    # -- data ----------------------------------------------------------
    def prepare_data(self) -> DataSplits:
        """Read and validate the recipe's data and return the train and eval examples.

        Raise :class:`finetune.DataError` naming the recipe key, the file and the row for bad input (it
        runs before the run folder exists, so nothing is lost). Split off eval data with
        :func:`finetune.split_frame` when ``data.eval`` is not given. Fill :attr:`state` here."""
        raise NotImplementedError

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled examples from ``path``, in the form ``data.train`` takes (a table file, or a folder for
        image and audio tasks) and in the form :meth:`build_dataset` understands, checked against
        :attr:`state` (already filled): e.g. a label never seen in training is a :class:`finetune.DataError`
        naming ``key``. ``key`` is what the path came from (``"data.test"``, or ``"--input"`` for
        ``finetune evaluate RUN --input FILE``, which scores a trained run on any labelled file). Call it
        from :meth:`prepare_data` for ``data.test``. Default: not implemented (``finetune evaluate`` then
        says the task cannot read labelled files)."""
        raise NotImplementedError

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        """Turn examples (``splits.train`` or ``splits.eval``) into a map-style dataset: ``len(ds)`` and
        ``ds[i]`` -> one example's features (a dict), which :meth:`collate_fn` batches. A list works.
        ``training`` (passed by name) says which split (e.g. augment only the training one)."""
        raise NotImplementedError

    def collate_fn(self, processor: Any):
        """Return a function ``items -> batch``: a list of dataset items to a dict of tensors. Every tensor's
        first dimension is the batch (the core counts examples with it), and ``labels`` is the name
        ``model(**batch).loss`` expects when the default :meth:`training_loss` is used."""
        raise NotImplementedError

    def example_lengths(self, dataset: Any) -> list[int] | None:
        """The length of each example of a dataset built by :meth:`build_dataset` (tokens, audio samples,
        ...), in dataset order, or ``None`` (the default) when batches should not be grouped by length.
        Implement it when the collator pads batches to their longest example: ``train.group_by_length``
        then cuts the padding (and the time spent on it), and evaluation runs longest first."""
        return None

    def train_batches(self, dataset: Any, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The training batches of one epoch, as lists of dataset indices.

        Default: a permutation seeded by ``(seed, epoch)`` cut into batches of ``batch_size``
        (:func:`finetune.epoch_batches`); with ``train.group_by_length`` (the default) and
        :meth:`example_lengths` implemented, examples of similar length are batched together
        (:func:`finetune.length_grouped_batches`). Override to batch differently. The result must depend
        only on the arguments (exact resume replays it) and hold ``ceil(len(dataset) / batch_size)``
        batches (the loop plans its steps from that count). ``batch_size`` is the global batch (per
        process x processes); the core deals each batch out to the processes."""
        if self.recipe.train.group_by_length:
            lengths = self.example_lengths(dataset)
            if lengths is not None:
                return length_grouped_batches(list(lengths), batch_size, seed, epoch)
        return epoch_batches(len(dataset), batch_size, seed, epoch)

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: ResolvedBackbone) -> tuple[Any, Any]:
        """Return ``(model, processor)`` built from ``backbone.path`` (a local folder; pass
        ``local_files_only=True`` and ``trust_remote_code=backbone.trust_remote_code`` to
        ``from_pretrained``). ``model`` is a ``torch.nn.Module`` with the task's head (new heads
        initialised); ``processor`` (tokenizer, image or feature processor, or None) is saved with the
        adapter when it has ``save_pretrained``. :attr:`state` is filled before this is called, also at
        prediction time."""
        raise NotImplementedError

    def lora_targets(self, model: Any) -> list[str] | str:
        """Default LoRA target modules for this model (``[peft] target_modules = "auto"``): module names
        (matched as name suffixes, e.g. ``["query", "value"]``) or one regex string over full names.
        :func:`finetune.attention_projections` gives the usual attention projections of most models."""
        raise NotImplementedError

    def modules_to_save(self, model: Any) -> list[str]:
        """Modules trained in full and saved with the adapter (the task head), by name. Default: none.
        With ``peft.method = "none"`` these are the only trained modules."""
        return []

    def peft_task_type(self) -> str | None:
        """PEFT ``TaskType`` name (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``, ``"TOKEN_CLS"``) or None (default).
        It decides the ``PeftModel`` subclass that wraps the model and what ``adapter_config.json`` says."""
        return None

    def train_mode(self, model: Any) -> None:
        """Put the model in training mode (default ``model.train()``). Override to keep e.g. BatchNorm
        layers in eval mode, whose running statistics a LoRA adapter does not save."""
        model.train()

    # -- training and evaluation ---------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        """The scalar loss tensor of one training batch (default: ``model(**batch).loss``). It must come
        from the model's forward pass (the core calls ``backward`` on it)."""
        return model(**batch).loss

    def training_logs(self) -> dict[str, float]:
        """Numbers the task measured while training since the last call (e.g. GRPO's mean reward and KL per
        step), as ``{name: float}``: at every logging step (``train.log_every_steps``) the core adds them to the
        log line, logs.jsonl, the ``[track]`` trackers (``train/<name>``) and the callbacks' ``on_log``; with several
        processes each one's values are averaged. Average what :meth:`training_loss` recorded since the last
        call and start afresh. Names must not be the core's own (``loss``, ``lr``, ``samples_per_s``).
        Default: none."""
        return {}

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """One eval batch (eval mode, under ``torch.no_grad()``) -> a dict with any of:

        * ``"loss"``: a scalar tensor, averaged over the eval set as ``eval_loss``;
        * ``"predictions"`` and ``"references"`` (both or neither), each either a tensor whose first
          dimension is the batch (``[batch, ...]``), or a list with one item per example.

        Tensors may differ in their other dimensions from batch to batch and between processes (per-token
        tags, generated ids): the core pads them with :attr:`eval_pad_value` (-100) to the widest and
        concatenates, so :meth:`compute_metrics` gets one numpy array ``[examples, ...]``. Lists (any
        picklable item: spans, strings, arrays of their own length) are concatenated into one list. Both
        are gathered across processes, each example once. The default returns ``model(**batch).loss``."""
        outputs = model(**batch)
        return {"loss": outputs.loss}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        """Metrics from every eval example's ``predictions`` and ``references`` (see
        :meth:`evaluation_step` for their form; the two are in the same order, which need not be the
        dataset's). Scalar values (Python ``int``/``float``) are logged, shown and may select the best
        checkpoint; nested values (e.g. a per-class report) go to metrics.json (``best_details``) only. The
        run report (report.html) shows two kinds when present: a per-class table from ``per_class`` (or
        ``per_label``, ``per_type``: ``{label: {name: number}}``; ``per_class_iou``: ``{label: number}``), and
        ``confusion_matrix`` (a list of rows of counts: row = reference, column = prediction, the labels in
        ``per_class``'s order) as a matrix.
        With several processes it runs on each, with the same gathered data (they all need the selection
        metric): write files in :meth:`after_evaluate`, which runs on the main process only. Default: none."""
        return {}

    def finalize_eval(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Adjust the metrics of one evaluation (they include ``eval_loss``), e.g. add perplexity; return them."""
        return metrics

    def after_evaluate(self, model: Any, processor: Any, run_path: Path, step: int,
                       metrics: dict[str, Any]) -> None:
        """Called on the main process after each evaluation, also the one before training (``step`` 0):
        write artifacts (e.g. sample generations) under ``run_path``. Must not change the model."""

    def finalize_run(self, run_path: Path, metrics: dict[str, Any]) -> None:
        """Called once on the main process when training finished, before metrics.json and the model card
        are written. ``metrics`` is what metrics.json will hold (``best``, ``last``, ``before``,
        ``baseline``, ``best_details``, ``train``, ``data``...): add entries to it (e.g. data counts) and
        the core writes them to metrics.json and passes them to the card; do not write metrics.json
        yourself. Write other final artifacts (e.g. a confusion-matrix image) under ``run_path``."""

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        """Optional simple non-neural baseline on the same split (e.g. TF-IDF + logistic regression, the
        majority class): ``{"name": "...", <metric>: value, ...}`` stored as ``baseline.*`` in
        metrics.json and shown beside the fine-tuned numbers. Default: None."""
        return None

    # -- the run report (report.html) -----------------------------------
    def data_summary(self, splits: DataSplits) -> dict[str, Any]:
        """What the run report's data section shows beyond what the core knows (rows per split, and example
        lengths from :meth:`example_lengths`), computed from ``splits`` (as :meth:`prepare_data` returned
        them; ``splits.test`` may be None) once, on the main process, at the end of training. Return a dict
        with any of:

        * ``"label_counts"``: ``{split: {label: count}}`` for ``"train"``, ``"eval"`` and ``"test"`` (classes
          per split: the report shows them side by side);
        * ``"facts"``: ``{name: value}``, short facts shown as a list (``"mean words per text": 14.2``).

        Values must be JSON-serialisable (saved in the run folder's ``report_data.json``, from which
        ``finetune report`` rebuilds the page without loading a model). Keep it cheap. Default: ``{}``."""
        return {}

    def report_samples(self, model: Any, processor: Any, examples: Any, run_path: Path,
                       limit: int) -> list[dict[str, Any]]:
        """A few eval examples and what the trained model makes of them, for the run report (at most
        ``limit``; take the first ones of ``examples``, the eval split as :meth:`prepare_data` returned it).
        Called once on the main process after :meth:`finalize_run`, with the selected adapter's weights and
        :attr:`state`, the model in eval mode, under ``torch.no_grad()``. Samples already in the run folder
        (written by :meth:`after_evaluate`) may be read from ``run_path`` instead of predicting again. One dict
        per example:

        * ``"input"``: what the model saw, as text (a sentence, an image's file name, a prompt);
        * ``"prediction"``: what it answered, as text;
        * ``"reference"`` (optional): the right answer, as text;
        * ``"correct"`` (optional): True / False; False rows are highlighted as errors;
        * ``"score"`` (optional): a number (the prediction's probability, say);
        * ``"before"`` (optional): the untouched model's answer (generation tasks);
        * ``"image"`` (optional): a small picture of the input as a ``data:image/png;base64,...`` (or jpeg) URI,
          at most 200,000 characters (a 96-pixel thumbnail is about 10,000).

        Default: ``[]`` (the report's samples section then says that the task gives none). In multi-process
        runs with FSDP or DeepSpeed it is not called (the weights are sharded)."""
        return []

    def sweep_space(self) -> dict[str, Any] | None:
        """The search space ``finetune sweep`` uses when the recipe's ``[sweep.params]`` and ``--param`` name
        none: dotted recipe keys mapped to a range ``{"low": ..., "high": ..., "log": bool}`` (ints for an int
        key) or a list of choices, in ``[sweep.params]``'s form, usually around ``self.recipe``'s values.
        Every key is validated like a recipe key before the first trial. Default: None, then the core's space:
        ``train.learning_rate`` from a quarter to 4x the recipe's (log scale), ``peft.r`` in 4, 8, 16 (with
        ``peft.method = "lora"``), ``train.epochs`` from one less to one more than the recipe's, and
        ``train.warmup_ratio`` from 0 to 0.2."""
        return None

    def speed_notes(self) -> list[str]:
        """Task speed options in effect that change results (shown by ``finetune validate`` and recorded
        in run.json), one sentence each. Default: none."""
        return []

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        """Predict for raw records (dicts with :meth:`predict_input_columns`), under ``torch.no_grad()``,
        the model in eval mode. Return one dict per record, in order: the record's fields, unchanged (the
        user's data: a gold ``label`` column stays as it was), plus the prediction's fields, named
        ``pred_<name>`` (``pred_label``, ``pred_score``, ``pred_text``...) or ``prob_<class>`` for a class
        probability, as :attr:`prediction_fields` lists them; lists and dicts are written as JSON. The core
        checks every row: an input field changed or left out (except encoded bytes, which no output file
        holds) or an added field named otherwise is an error naming the plugin. An input file whose columns
        already use those prefixes is refused before :meth:`predict` runs.

        ``batch_size`` and ``stream`` are passed by name; ``stream`` is True when results go to a terminal (a
        generation task may print tokens as they come). Prediction settings come from ``self.recipe``
        (which ``finetune predict --set`` can override)."""
        raise NotImplementedError

    def generate_text(self, model: Any, processor: Any, prompt: str | list[dict[str, str]], *,
                      max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                      on_text: Callable[[str], bool]) -> dict[str, Any]:
        """One text generation for ``finetune serve``'s OpenAI-compatible endpoints (``/v1/completions``
        passes a prompt string, ``/v1/chat/completions`` a list of ``{"role", "content"}`` messages), called
        in the server's one worker thread under ``torch.inference_mode()``, the model in eval mode. Render
        the prompt as :meth:`predict` renders a record's (the run's chat template), generate (KV-cached) and
        call ``on_text(piece)`` with each new piece of decoded text as it is produced, in order (the pieces
        joined are the whole answer, without the end token); stop generating as soon as ``on_text`` returns
        True (the server found a stop string, or the client left). ``None`` options mean the recipe's
        (``temperature = 0``: greedy). Return ``{"finish_reason": "stop" | "length", "prompt_tokens": int,
        "completion_tokens": int}``. Default: not implemented -- then those endpoints answer 404 for the run
        and only ``POST /predict`` serves it."""
        raise NotImplementedError

    def draw_predictions(self, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
        """Pictures of predictions, for ``finetune predict ... --draw DIR``: boxes drawn on each image, a mask
        and its overlay. ``rows`` are exactly what :meth:`predict` returned (the input fields and the
        ``pred_*`` fields), after they were written out; ``folder`` exists (the core creates it) and may
        already hold files. Write there and return the paths written (each must exist); name the files after
        their inputs so that a user finds each picture (e.g. ``<image stem>.png``), and never overwrite one
        picture with another of the same run. Default: not implemented -- then ``--draw`` is refused before
        anything is predicted, naming the tasks that draw."""
        raise NotImplementedError

    def predict_input_columns(self) -> list[str]:
        """Fields a prediction input must have; the first one receives ``--text`` values and stdin lines.
        Default: none (then only ``--input`` works).

        What :meth:`predict` then receives in that field: from ``--text`` and stdin always a string (split
        it yourself if the task reads a list of words); from a .jsonl input the JSON value as written (a
        list stays a list); from a .csv/.tsv/.parquet input the cell as the table holds it (a list written
        to a CSV as JSON text stays text)."""
        return []

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        """Records from ``finetune predict --input PATH``. Default: a table file (.csv/.tsv/.jsonl/.parquet)
        with :meth:`predict_input_columns`. Override for e.g. a folder of images."""
        df = load_table(path, key="--input")
        missing = [c for c in self.predict_input_columns() if c not in df.columns]
        if missing:
            raise missing_input_column(path, missing[0], [str(c) for c in df.columns], self.recipe.data)
        return df.to_dict(orient="records")

    # -- export --------------------------------------------------------
    def export_graph(self, model: Any, processor: Any, batch: dict[str, Any]) -> ExportGraph:
        """For ``finetune export --format onnx``: the model as an :class:`ExportGraph` (a module taking
        positional tensors, returning the logits), with example inputs picked from ``batch`` (what
        :meth:`collate_fn` made of a few eval examples). Called twice: with the trained model (adapter
        attached: the reference logits) and with the merged model (traced by ``torch.onnx.export``, then
        run by onnxruntime on the same inputs and compared). Build the module from ``model`` only (no
        task-side speed code that a plain runtime would not have) and keep it in eval mode."""
        raise NotImplementedError

    def export_file(self, fmt: str, model: Any, processor: Any, folder: Path,
                    options: dict[str, Any]) -> dict[str, Any]:
        """For ``finetune export --format FMT`` with a format other than onnx: write the merged ``model``
        (adapter folded in, eval mode) into ``folder`` (it exists, empty) and check what was written; return
        a JSON-serialisable report for ``export.json``: ``"files"`` (names written), ``"checks"`` (what was
        verified, with numbers such as the largest logit difference) and ``"usage"`` (how to run it, for the
        card). ``options`` holds ``"quantize"`` (the ``--quantize`` value or None) and ``"batch"`` (what
        :meth:`collate_fn` made of a few eval examples, to compare outputs on; None when the run's data
        cannot be read). Raise :class:`finetune.ExportError` naming the problem when a check fails, and
        :class:`finetune.RecipeError` for an option the format does not take. Default: ``"safetensors"`` for a
        model with ``save_pretrained`` (transformers): model and processor saved, to load with
        ``from_pretrained``."""
        if fmt != "safetensors" or not hasattr(model, "save_pretrained"):
            raise NotImplementedError
        model.save_pretrained(folder, safe_serialization=True)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(folder)
        arch = (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__])[0]
        return {"files": sorted(p.name for p in Path(folder).iterdir()), "checks": {},
                "usage": (f"import transformers\n\nmodel = transformers.{arch}.from_pretrained('.').eval()  "
                          "# this folder\n")}

    def usage_snippet(self, base: str) -> str | None:
        """Python code for the model card's "Usage" section that loads what is pushed with plain
        ``peft``/``transformers``/``timm`` and runs one prediction. ``base`` is the base model to load:
        its Hub id when known (e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``), else its local path;
        the adapter folder is ``'adapter'`` (the Hub repo's root once pushed). Use :attr:`state` for facts
        such as label names. Default: None (the card shows a generic ``PeftModel.from_pretrained`` line)."""
        return None


def input_column_key(data: Any, column: str) -> str | None:
    """The recipe key that names an input column (``"data.text_column"`` when ``data.text_column`` is
    ``column``), or None when no ``[data]`` key does."""
    keys = sorted((name for name, value in data if value == column), key=lambda name: not name.endswith("_column"))
    return f"data.{keys[0]}" if keys else None


def missing_input_column(path: str | Path, column: str, found: list[str], data: Any) -> DataError:
    """The error for a ``finetune predict --input`` file without the input column ``column``: the columns it has,
    and the two fixes (rename the column, or ``--set`` the ``[data]`` key that names it to the file's column)."""
    key = input_column_key(data, column)
    close = difflib.get_close_matches(column, found, n=1, cutoff=0.6)
    listed = ", ".join(map(repr, found)) or "none"
    fix = "Rename that column in the file"
    if key:
        guess = close[0] if close else (found[0] if len(found) == 1 else "<column>")
        fix += f", or say which column holds it: `finetune predict RUN --set {key}={guess}`"
    return DataError(f"--input: {path} has no column {column!r}{did_you_mean(column, found)} (columns found: "
                     f"{listed}); this run reads its input from {column!r}{f' ({key})' if key else ''}. {fix}.")
