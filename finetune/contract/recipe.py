"""The recipe schema: the typed sections of a recipe, and the ``Recipe`` a task receives.

The core owns the sections ``[task] [model] [data] [peft] [train] [distributed] [output]
[hub] [sweep]``. A task plugin extends ``[task]`` and ``[data]`` with its own typed options by
subclassing :class:`TaskOptions` / :class:`DataOptions`; the recipe is validated in one pass
against the combined schema (:func:`recipe_model_for`), so a plugin's options get the same
errors (key path, bad value, did-you-mean) as the core's.

Reading a recipe file (TOML, ``--set`` overrides, relative paths) is the engine's job
(``finetune.engine.recipe_file``); this module only says what a valid recipe is.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from finetune.errors import did_you_mean


class _PathMarker:
    """Metadata marking a string field as a filesystem path (resolved against the recipe folder)."""


#: The type of a recipe option that holds a file or folder path (``train: PathStr = Field(...)``, also
#: ``PathStr | None`` and ``list[PathStr]``): a relative path resolves against the recipe's folder, the
#: resolved recipe records it absolute, and a data file's content is fingerprinted for resume.
PathStr = Annotated[str, _PathMarker()]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        """The section as TOML-ready data (JSON types), unset (``None``) values left out."""
        return drop_none(self.model_dump(mode="json"))


class TaskOptions(Section):
    """``[task]``: the task name; task plugins subclass this to add options."""

    name: str = Field(description="Task family, e.g. 'text-classification' (see `finetune tasks`).")


class ModelSection(Section):
    backbone: str = Field(description="Hub id (downloaded when online, else from the cache), local folder, or a "
                          "name a plugin resolves (the offline zoo).")
    revision: str | None = Field(
        None, description="Hub branch, tag or commit of the backbone. Unset: main as cached (downloaded the first "
        "time); a branch or tag: where it points now on the Hub. The run folder's recipe records the commit hash "
        "it resolved to, so the run is reproducible.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code shipped with the backbone "
                                    "(it runs on this machine).")
    allow_pickled_weights: bool = Field(
        False, description="Allow a Hub backbone whose only weights are pickled (pytorch_model.bin); they load "
        "with torch.load(weights_only=True). Off: such a repo is refused.")
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base quantized through bitsandbytes and train an adapter on it "
        "(QLoRA): '4bit' (quant_type, double quantization, computing in the run's precision) or '8bit' "
        "(LLM.int8); 'none': full precision. Needs a CUDA GPU and bitsandbytes (the 'qlora' extra; refused on a CPU, "
        "where it was measured not to save memory, docs/adapters.md); causal-lm, its preference / GRPO / "
        "reward-model tasks. Merge and export load the full-precision base.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type (model.quantize = '4bit'): 'nf4' (NormalFloat, QLoRA's choice for "
        "normally distributed weights) or 'fp4'.")
    double_quant: bool = Field(
        True, description="Quantize the 4-bit quantization constants too (model.quantize = '4bit'; about 0.4 "
        "bits per weight less).")
    start_from: PathStr | None = Field(
        None, description="Continue from a finished run: its run folder (or its adapter/ folder). Its LoRA adapter "
        "is this run's starting point (e.g. preference tuning or GRPO after supervised fine-tuning); the backbone "
        "and [peft] method, r and target modules must be the ones it was trained with. A reference model (the "
        "base with the adapter disabled) stays the backbone itself.")


class DataOptions(Section):
    """``[data]``: where the examples are; task plugins subclass this to add column names etc.

    The core resolves the paths, fingerprints the files and checks that one of :attr:`source_keys` is set;
    reading the data is the task's job, and so is applying these keys in ``prepare_data``: ``format``
    (``load_table(path, data.format)``), ``dataset`` and its ``dataset_*`` keys
    (``finetune.open_dataset(data, recipe_dir)``), ``eval`` and ``split``
    (``split_frame(df, data.split, seed, group=data.group_column)`` when no eval data is given),
    ``test``, ``test_split`` and ``dataset_test_split`` (the test split, ``DataSplits.test``: read ``test``
    with :meth:`Task.read_examples`; hold out ``test_split`` first, with ``split_frame(df, data.test_split,
    seed, key="data.test_split")``), ``group_column`` and ``limit`` (take at most that many training
    examples, seeded by ``train.seed``). A task that cannot honour one should refuse it with a
    ``RecipeError``; a task that leaves ``DataSplits.test`` empty while a test key is set is refused by
    the core."""

    #: The keys any one of which gives the training data (a recipe must set one); a task with another kind
    #: of source (a built-in data set, say) adds its key.
    source_keys: ClassVar[tuple[str, ...]] = ("train", "dataset")

    # A task whose train/eval take something else (a folder of images, a manifest of clips) redeclares them
    # with its own description: docs/recipes.md shows each task's own.
    train: PathStr | None = Field(None, description="Training data; each task's section says what it takes (for "
                                  "most a table file: .csv, .tsv, .jsonl, .json or .parquet). Or give `dataset`.")
    eval: PathStr | None = Field(None, description="Evaluation data, in the same form as `train`; if absent, "
                                 "`split` of train is held out.")
    test: PathStr | None = Field(
        None, description="Test file, in the form of `train`: never used to select a checkpoint or to stop early; "
        "scored once at the end with the selected adapter and reported as test.* (metrics.json, model card, "
        "summary). Unset (and no `test_split`): no test numbers.")
    test_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of the training data held out as the test split (instead of a "
        "`test` file); taken before `split` holds out the eval data.")
    dataset: str | None = Field(
        None, description="A data set instead of `train`: a Hugging Face Hub name (owner/name; downloaded when "
        "online, else from the cache), a folder written by save_to_disk, or a local .parquet/.arrow/.csv/.jsonl "
        "file or folder of them. Relative paths resolve against the recipe's folder.")
    dataset_config: str | None = Field(None, description="Configuration (subset) of `dataset`, if it has several.")
    dataset_split: str = Field("train", description="Split of `dataset` to train on (ignored for a single saved "
                               "Dataset, which has no splits).")
    dataset_eval_split: str | None = Field(
        None, description="Split of `dataset` to evaluate on (e.g. 'validation'); if unset, `split` of the training "
        "split is held out.")
    dataset_test_split: str | None = Field(
        None, description="Split of `dataset` to report on (e.g. 'test'): scored once at the end with the selected "
        "adapter, never used for selection (see `test`).")
    dataset_revision: str | None = Field(
        None, description="Hub branch, tag or commit of `dataset`; the run folder's recipe records the commit it "
        "resolved to.")
    split: float = Field(0.2, gt=0, lt=1, description="Fraction of train held out for eval when `eval` is absent "
                         "(the held-out part selects the best checkpoint, like `eval`).")
    group_column: str | None = Field(
        None, description="Keep rows sharing this column's value on the same side of the split (no leakage).")
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet"] = Field(
        "auto", description="File format; 'auto' decides from the file extension.")
    limit: int | None = Field(None, gt=0, description="Use at most this many training rows (quick tries).")


#: ``peft.method`` values that train a PEFT adapter (saved as adapter_config.json + adapter_model.safetensors,
#: loaded with ``PeftModel.from_pretrained``); "none" and "full" save the trained weights instead.
ADAPTER_METHODS = ("lora", "dora", "ia3", "prompt-tuning", "prefix-tuning")
#: methods that add virtual tokens before the input instead of changing weights (nothing to merge).
PROMPT_METHODS = ("prompt-tuning", "prefix-tuning")
#: the ``[peft]`` keys each method uses (``modules_to_save``: every method but prompt/prefix tuning).
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "lora": ("r", "alpha", "dropout", "target_modules", "layers", "use_rslora", "init", "loraplus_lr_ratio"),
    "dora": ("r", "alpha", "dropout", "target_modules", "layers", "use_rslora", "init", "loraplus_lr_ratio"),
    "ia3": ("target_modules", "feedforward_modules"),
    "prompt-tuning": ("num_virtual_tokens",),
    "prefix-tuning": ("num_virtual_tokens",),
    "none": (),
    "full": (),
}


def is_adapter_method(method: str) -> bool:
    """Whether ``peft.method`` trains a PEFT adapter (it loads with ``PeftModel.from_pretrained``)."""
    return method in ADAPTER_METHODS


class PeftSection(Section):
    method: Literal["lora", "dora", "ia3", "prompt-tuning", "prefix-tuning", "none", "full"] = Field(
        "lora", description="What trains. 'lora': low-rank updates of the target layers; 'dora': LoRA with a "
        "separate trained magnitude per output (weight-decomposed, DoRA; slower steps); 'ia3': learned scaling "
        "vectors on the target layers' outputs (on the inputs of `feedforward_modules`), far fewer parameters; "
        "'prompt-tuning' / 'prefix-tuning': `num_virtual_tokens` trained embeddings before the input (prompt) or "
        "trained keys and values in every attention layer (prefix), causal-lm only, usually with a higher "
        "learning rate (e.g. 1e-2 / 5e-3); 'none': train only the head (linear probe); 'full': train every "
        "parameter. Every adapter method's adapter/ loads with plain peft (PeftModel.from_pretrained).")
    r: int = Field(8, gt=0, description="LoRA rank (lora, dora).")
    alpha: int = Field(16, gt=0, description="LoRA scaling alpha (lora, dora): updates are scaled by alpha / r "
                       "(alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path (lora, dora).")
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA (lora, dora): scale updates by alpha / sqrt(r) instead of "
        "alpha / r, so higher ranks keep learning as fast.")
    init: Literal["default", "gaussian", "orthogonal", "pissa", "olora"] = Field(
        "default", description="How LoRA's matrices start (lora, dora): 'default': A random, B zero (the model "
        "starts unchanged); 'gaussian': A from a Gaussian scaled by the rank; 'orthogonal': orthogonal A and B; "
        "'pissa': A and B from the top singular vectors of each weight, which is replaced by the residual; "
        "'olora': the same with a QR decomposition. pissa/olora (method 'lora', Linear layers only) change the "
        "base weights during training; the saved adapter is converted to a plain LoRA of rank 2r that applies "
        "to the original base.")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+ (lora, dora): the B matrices learn this many times faster than "
        "train.learning_rate (the paper suggests 16; biases and other 1-d parameters too). Unset: one "
        "learning rate.")
    target_modules: str | list[str] = Field(
        "auto", description="Layers that get the adapter (lora, dora, ia3): 'auto' (the task's defaults; for ia3 "
        "peft's per-architecture attention and feed-forward layers where it knows the model), a list of module "
        "names, or a regex string.")
    feedforward_modules: str | list[str] = Field(
        "auto", description="ia3: which of target_modules are feed-forward layers, whose inputs (not outputs) are "
        "scaled: 'auto' (peft's per-architecture list; none where it has none), a list of module names, or a "
        "regex string.")
    num_virtual_tokens: int = Field(20, gt=0, description="prompt-tuning / prefix-tuning: how many virtual "
                                    "tokens are trained.")
    modules_to_save: str | list[str] = Field(
        "auto", description="Fully trained and saved modules (the task head); 'auto' lets the task decide.")
    layers: list[int] | None = Field(
        None, description="LoRA only in these transformer layers (0-based; negative counts from the top: "
        "[-2, -1] is the top two); unset: every layer. Frozen layers below the lowest one need no backward pass.")


class TrainSection(Section):
    epochs: int = Field(3, gt=0, description="Passes over the training data.")
    batch_size: int = Field(32, gt=0, description="Examples per optimizer micro-batch (per process).")
    eval_batch_size: int | None = Field(None, gt=0, description="Defaults to 2 x batch_size.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps with linear warm-up: W = int(ratio "
                                "x steps); step s (from 0) of the warm-up runs at (s + 1) / (W + 1) of the peak.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="After the warm-up: 'linear' decay towards 0, 'cosine' (half a cosine), 'constant' "
                              "(no warm-up either).")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; unset to disable.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="'auto': bf16 on GPUs and on CPUs with AMX (bf16 matrix units), else fp32 "
        "(AVX512-BF16 alone measured slower than fp32).")
    seed: int = Field(0, description="Seeds model init, shuffling and dropout.")
    eval_every_steps: int = Field(0, ge=0, description="Also evaluate every N optimizer steps (0: per epoch only).")
    eval_before_training: bool = Field(
        True, description="Evaluate the untouched model (step 0) before training: the 'before' numbers in "
        "metrics.json, the model card and the curves. Never selected as the best checkpoint.")
    metric: str | None = Field(None, description="Metric for best-checkpoint selection (task default if unset).")
    metric_mode: Literal["auto", "max", "min"] = Field("auto", description="'auto': min for losses, else max.")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N evals without improvement (0: off).")
    checkpoint_every_steps: int = Field(100, ge=0, description="Resumable checkpoint every N steps (0: per epoch).")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    log_every_steps: int = Field(10, gt=0)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    fast_dropout: bool = Field(
        True, description="On CPU, draw dropout masks with numpy's PCG64 (about half the cost of torch's "
        "per-element generator; same probability, different masks, so results differ). No effect on GPUs.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding, faster) where the task "
        "reports lengths; the batch order stays random. Changes which examples share a batch.")
    threads: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Threads torch computes with on the CPU. 'auto': every usable core (CPU affinity, "
        "cgroup quota), idle or busy (on a busy machine with passive waiting, see wait_policy); "
        "OMP_NUM_THREADS in the environment is used when this is 'auto'. The choice is in run.json (threads).")
    wait_policy: Literal["auto", "default", "active", "passive"] = Field(
        "auto", description="How idle OpenMP threads wait: 'passive' sleeps at once (best on a busy machine), "
        "'active' spins, 'default' is OpenMP's own (spin a while, then sleep; best on an idle machine). "
        "'auto': 'default' when the machine is idle at the start, 'passive' when other processes keep its "
        "cores busy; OMP_WAIT_POLICY in the environment is used when this is 'auto'.")


class FsdpOptions(Section):
    """``[distributed.fsdp]``: Fully Sharded Data Parallel (PyTorch FSDP through Accelerate)."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = Field(
        "FULL_SHARD", description="What is sharded across processes: parameters, gradients and optimizer "
        "state (FULL_SHARD); gradients and optimizer state (SHARD_GRAD_OP); nothing (NO_SHARD); full "
        "sharding within a machine, replicas across machines (HYBRID_SHARD).")
    auto_wrap_policy: Literal["transformer", "size", "none"] = Field(
        "transformer", description="How the model is cut into FSDP units: one per transformer block "
        "('transformer'), by parameter count ('size'), or one unit for the whole model ('none').")
    transformer_layer_cls: list[str] = Field(
        default_factory=list, description="Block class names to wrap with auto_wrap_policy = 'transformer' "
        "(e.g. [\"BertLayer\"]); empty: the model's own _no_split_modules.")
    min_num_params: int = Field(100_000_000, gt=0, description="Parameters per unit with "
                                "auto_wrap_policy = 'size'.")
    cpu_offload: bool = Field(False, description="Keep parameters and gradients in CPU memory between uses "
                              "(slower; fits larger models).")


class DeepSpeedOptions(Section):
    """``[distributed.deepspeed]``: DeepSpeed ZeRO through Accelerate (needs ``pip install deepspeed``)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.")
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="Keep the optimizer state in CPU memory (stage >= 1); NVMe offload: use `config`.")
    offload_param: Literal["none", "cpu"] = Field(
        "none", description="Keep the parameters in CPU memory between uses (stage 3 only).")
    config: PathStr | None = Field(
        None, description="A DeepSpeed JSON config file (relative to the recipe) used instead of the keys "
        "above; 'auto' values are filled from [train].")


class DistributedSection(Section):
    """``[distributed]``: how several processes share the work (``--num-processes``, ``accelerate launch``)."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="'ddp': every process holds the whole model, gradients are averaged (CPU or "
        "GPU); 'fsdp' / 'deepspeed': shard the model and optimizer state across GPUs (GPU only).")
    fsdp: FsdpOptions = Field(default_factory=FsdpOptions, description="Options for strategy = 'fsdp'.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions,
                                        description="Options for strategy = 'deepspeed'.")


class OutputSection(Section):
    dir: PathStr = Field("", description="Run folder. A relative path resolves against the recipe file's folder, "
                         "like every path in a recipe (also when given with --set): recipes/text-quickstart.toml "
                         "with dir = \"../runs/text-quickstart\" writes runs/text-quickstart. "
                         "Default: runs/<recipe name> beside the recipe.")


class HubSection(Section):
    push: bool = Field(False, description="Push to the Hugging Face Hub when the run finishes.")
    repo_id: str | None = Field(None, description="'user/name' on the Hub.")
    private: bool = Field(False)


#: The experiment trackers ``[track] backends`` may name (Accelerate's trackers of the same names).
TRACKERS = ("tensorboard", "mlflow", "wandb")


class TrackSection(Section):
    """``[track]``: log the run to experiment trackers (docs/tracking.md)."""

    backends: list[str] = Field(
        default_factory=list, description="Trackers to log to, several allowed: \"tensorboard\" (event files in "
        "<run>/tensorboard/), \"mlflow\", \"wandb\". Each gets the resolved recipe as parameters (dotted keys) and "
        "every logged metric (train/*, eval/* from step 0, test/*, best/*). Empty: no tracker. Needs "
        "pip install 'finetune[track]'.")
    project: str = Field("finetune", min_length=1, description="MLflow experiment and W&B project name (TensorBoard: "
                         "the folder under <run>/tensorboard/).")
    run_name: str | None = Field(None, description="The tracker run's name; unset: the run folder's name.")
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra tags, e.g. {team = \"nlp\"}: MLflow run tags, W&B tags as "
        "\"key:value\". The task, backbone and run folder are tagged anyway.")
    mlflow_tracking_uri: str | None = Field(
        None, description="Where MLflow writes: a tracking server (http://host:5000) or a database "
        "(sqlite:////absolute/path/mlflow.db). Unset: the SQLite file mlflow.db in the folder that holds the run "
        "folder (runs/mlflow.db for runs/<name>), no server needed.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode: 'offline' writes <run>/wandb/ only (upload later with `wandb sync`); "
        "'online' uploads as it trains (needs `wandb login` or WANDB_API_KEY).")

    @field_validator("backends", mode="before")
    @classmethod
    def _known_backends(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            for name in value:
                if isinstance(name, str) and name not in TRACKERS:
                    raise ValueError(f"unknown tracker {name!r}{did_you_mean(name, TRACKERS)}; "
                                     f"choose from {', '.join(TRACKERS)}")
            value = list(dict.fromkeys(value))  # named twice: logged once
        return value


class SweepRange(Section):
    """One range of a ``[sweep.params]`` entry: ``{low = 1e-5, high = 1e-3, log = true}``."""

    low: int | float = Field(description="Smallest value tried (an int for an int key such as peft.r).")
    high: int | float = Field(description="Largest value tried.")
    log: bool = Field(False, description="Sample on a log scale (learning rates); low must be > 0.")
    step: int | float | None = Field(None, gt=0, description="Only values low + k * step (unset: any value; "
                                     "1 for an int key).")


#: A ``[sweep.params]`` value: a range, or a list of choices.
SweepParam = SweepRange | list[bool | int | float | str]


class SweepSection(Section):
    """``[sweep]``: hyperparameter search with ``finetune sweep RECIPE`` (Optuna). ``finetune run`` ignores it."""

    trials: int = Field(20, gt=0, description="Trials that must end (complete, pruned or failed) before the "
                        "sweep stops; `finetune sweep --trials N` overrides it.")
    dir: PathStr = Field("", description="Sweep folder: the study (study.db), one run folder per trial "
                         "(trial-0000/...), sweep.json, trials.csv and best.toml. Default: output.dir + '-sweep'.")
    direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="'auto': as train.metric_mode / the selection metric says (minimize losses and error "
        "rates, maximize the rest).")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: 'tpe' (Tree-structured Parzen "
                                              "Estimator) or 'random'.")
    seed: int | None = Field(None, description="Sampler seed (default: train.seed), so a sweep is repeatable.")
    pruner: Literal["median", "none"] = Field(
        "median", description="'median': stop a trial whose selection metric at an evaluation is worse than the "
        "median of earlier trials at the same evaluation (its run folder says `pruned`); 'none': never prune.")
    startup_trials: int = Field(2, ge=0, description="Trials that complete before any trial may be pruned.")
    warmup_evals: int = Field(0, ge=0, description="Evaluations of each trial that are never pruned.")
    timeout: float | None = Field(None, gt=0, description="Start no new trial after this many seconds of this "
                                  "`finetune sweep` call (`--timeout`).")
    params: dict[str, SweepParam] = Field(
        default_factory=dict, description="The search space: dotted recipe keys mapped to a range "
        "(`\"train.learning_rate\" = {low = 1e-5, high = 1e-3, log = true}`) or a list of choices "
        "(`\"peft.r\" = [4, 8, 16]`). Empty: the task's default space (learning rate, LoRA rank, epochs, "
        "warm-up). `--param` options override entries.")

    @field_validator("params", mode="before")
    @classmethod
    def _check_params(cls, value: Any) -> Any:
        """Each entry checked on its own, so that an error names the key and says what a range looks like."""
        if not isinstance(value, dict):
            return value
        from pydantic import ValidationError

        out: dict[str, Any] = {}
        for key, spec in value.items():
            if isinstance(spec, dict):
                try:
                    out[key] = SweepRange.model_validate(spec)
                except ValidationError as exc:
                    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                                         for e in exc.errors()[:3])
                    raise ValueError(f'"{key}": {problems}. A range is {{low = ..., high = ..., log = true}}') \
                        from None
            elif isinstance(spec, list) and spec and all(isinstance(v, (bool, int, float, str)) for v in spec):
                out[key] = spec
            else:
                raise ValueError(f'"{key}" = {spec!r}: expected a range {{low = ..., high = ...}} or a non-empty '
                                 "list of choices (numbers, strings or booleans)")
        return out


CORE_SECTIONS: dict[str, type[Section]] = {
    "task": TaskOptions,
    "model": ModelSection,
    "data": DataOptions,
    "peft": PeftSection,
    "train": TrainSection,
    "distributed": DistributedSection,
    "output": OutputSection,
    "hub": HubSection,
    "track": TrackSection,
    "sweep": SweepSection,
}

#: Sections that may be left out of a recipe entirely.
OPTIONAL_SECTIONS = {"peft", "train", "distributed", "output", "hub", "track", "sweep"}


class Recipe(BaseModel):
    """A validated recipe (``task.recipe``): one typed section per table, ``recipe.train.seed``,
    ``recipe.data.train``... The ``task`` and ``data`` sections are the task's own option classes.
    Sections: ``task``, ``model``, ``data``, ``peft``, ``train``, ``distributed``, ``output``, ``hub``,
    ``track``, ``sweep`` (``None`` unless the recipe has one; only ``finetune sweep`` reads it) (every key in
    docs/recipes.md)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    task: TaskOptions
    model: ModelSection
    data: DataOptions
    peft: PeftSection = Field(default_factory=PeftSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    output: OutputSection = Field(default_factory=OutputSection)
    hub: HubSection = Field(default_factory=HubSection)
    track: TrackSection = Field(default_factory=TrackSection)
    sweep: SweepSection | None = None  #: only in a recipe that has a [sweep] section (``finetune sweep``)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return upgrade_legacy_keys(data)

    # where the recipe came from, and which keys it set (not part of the TOML)
    _source: Path | None = None
    _user_keys: frozenset[str] = frozenset()

    @property
    def source(self) -> Path | None:
        """The recipe file this recipe was read from (``None`` for one built in memory)."""
        return self._source

    @source.setter
    def source(self, path: Path | None) -> None:
        self._source = path

    @property
    def user_keys(self) -> frozenset[str]:
        """The dotted keys the recipe file and its ``--set`` overrides gave (``"data.split"``,
        ``"distributed.fsdp.cpu_offload"``); the other keys hold defaults or values the run resolved."""
        return self._user_keys

    @user_keys.setter
    def user_keys(self, keys: frozenset[str]) -> None:
        self._user_keys = frozenset(keys)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled, paths absolute), ``None`` values dropped."""
        return drop_none(self.model_dump(mode="json"))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def upgrade_legacy_keys(raw: Any) -> Any:
    """A recipe (or a run folder's recipe.toml) written before ``[track]`` existed: ``train.tensorboard = true``
    reads as ``[track] backends = ["tensorboard"]``, ``false`` as nothing. Returns a copy; ``raw`` is unchanged."""
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict) or "tensorboard" not in raw["train"]:
        return raw
    if not isinstance(raw["train"]["tensorboard"], bool):
        return raw  # not the old option's value: validation reports the key
    raw = {**raw, "train": dict(raw["train"])}
    if raw["train"].pop("tensorboard"):
        track = dict(raw.get("track") or {}) if isinstance(raw.get("track") or {}, dict) else raw["track"]
        if isinstance(track, dict):
            backends = track.get("backends", [])
            backends = [backends] if isinstance(backends, str) else list(backends)
            track["backends"] = backends + ([] if "tensorboard" in backends else ["tensorboard"])
            raw["track"] = track
    return raw


def drop_none(value: Any) -> Any:
    """``value`` with ``None`` entries of nested dicts left out (TOML has no null)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    return value


def recipe_model_for(task_cls: Any) -> type[Recipe]:
    """The Recipe model whose ``task``/``data`` sections are the task's own option classes."""
    task_options = getattr(task_cls, "task_options", TaskOptions)
    data_options = getattr(task_cls, "data_options", DataOptions)
    return create_model(
        f"Recipe[{getattr(task_cls, 'name', '?')}]",
        __base__=Recipe,
        task=(task_options, ...),
        data=(data_options, ...),
    )


def _is_path_annotation(annotation: Any) -> bool:
    """True for ``PathStr`` also inside ``PathStr | None`` / ``Optional[PathStr]`` / ``list[PathStr]``."""
    if get_origin(annotation) is Annotated:
        return any(isinstance(m, _PathMarker) for m in annotation.__metadata__)
    if get_origin(annotation) in (Union, types.UnionType, list):
        return any(_is_path_annotation(a) for a in get_args(annotation))
    return False


def is_path_field(info: Any) -> bool:
    """Whether a section field (a pydantic ``FieldInfo``) holds a path (typed :data:`PathStr`)."""
    return any(isinstance(m, _PathMarker) for m in info.metadata) or _is_path_annotation(info.annotation)
