"""TOML recipe -> typed, validated :class:`Recipe`.

The core owns the sections ``[task] [model] [data] [peft] [train] [output]
[hub]``. A task plugin extends ``[task]`` and ``[data]`` with its own typed
options by subclassing :class:`TaskOptions` / :class:`DataOptions`; the recipe
is then validated in one pass against the combined schema, so plugin options
get the same errors (key path, bad value, expectation, did-you-mean) as the
core's.

Relative paths in a recipe resolve against the recipe file's folder; the
resolved recipe written to the run folder records them absolute.
"""

from __future__ import annotations

import copy
import tomllib
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from finetune.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from finetune.plugins import PluginRegistry


class _PathMarker:
    """Metadata marking a string field as a filesystem path (resolved against the recipe folder)."""


PathStr = Annotated[str, _PathMarker()]
"""Use as the type of a recipe option that holds a file or folder path."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskOptions(Section):
    """``[task]``: the task name; task plugins subclass this to add options."""

    name: str = Field(description="Task family, e.g. 'text-classification' (see `finetune tasks`).")


class ModelSection(Section):
    backbone: str = Field(description="Hub id, local folder, or a name a plugin resolves (offline zoo).")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code shipped with the backbone.")


class DataOptions(Section):
    """``[data]``: where the examples are; task plugins subclass this to add column names etc."""

    train: PathStr = Field(description="Training file: .csv, .tsv, .jsonl, .json or .parquet.")
    eval: PathStr | None = Field(None, description="Evaluation file; if absent, `split` of train is held out.")
    split: float = Field(0.2, gt=0, lt=1, description="Fraction of train held out for eval when `eval` is absent.")
    group_column: str | None = Field(
        None, description="Keep rows sharing this column's value on the same side of the split (no leakage).")
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet"] = Field(
        "auto", description="File format; 'auto' decides from the file extension.")
    limit: int | None = Field(None, gt=0, description="Use at most this many training rows (quick tries).")


class PeftSection(Section):
    method: Literal["lora", "none", "full"] = Field(
        "lora", description="'lora'; 'none': train only the head (linear probe); 'full': train every parameter.")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field(
        "auto", description="'auto' (the task's defaults), a list of module names, or a regex string.")
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
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear")
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; unset to disable.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="'auto': bf16 on GPUs and CPUs with native bf16 (AMX/AVX512-BF16), else fp32.")
    seed: int = Field(0, description="Seeds model init, shuffling and dropout.")
    eval_every_steps: int = Field(0, ge=0, description="Also evaluate every N optimizer steps (0: per epoch only).")
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
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the 'tensorboard' extra).")


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
    dir: PathStr = Field("", description="Run folder; default runs/<recipe name> beside the recipe.")


class HubSection(Section):
    push: bool = Field(False, description="Push to the Hugging Face Hub when the run finishes.")
    repo_id: str | None = Field(None, description="'user/name' on the Hub.")
    private: bool = Field(False)


CORE_SECTIONS: dict[str, type[Section]] = {
    "task": TaskOptions,
    "model": ModelSection,
    "data": DataOptions,
    "peft": PeftSection,
    "train": TrainSection,
    "distributed": DistributedSection,
    "output": OutputSection,
    "hub": HubSection,
}

#: Sections that may be left out of a recipe entirely.
_OPTIONAL_SECTIONS = {"peft", "train", "distributed", "output", "hub"}


class Recipe(BaseModel):
    """A validated recipe. Sections are typed models; ``task``/``data`` are the task's subclasses."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    task: TaskOptions
    model: ModelSection
    data: DataOptions
    peft: PeftSection = Field(default_factory=PeftSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    output: OutputSection = Field(default_factory=OutputSection)
    hub: HubSection = Field(default_factory=HubSection)

    # where the recipe came from (not part of the TOML)
    _source: Path | None = None

    @property
    def source(self) -> Path | None:
        return self._source

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled, paths absolute), ``None`` values dropped."""
        return _drop_none(self.model_dump(mode="json"))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


# ---------------------------------------------------------------------------
# loading

def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning syntax errors into a RecipeError with line and column."""
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found.")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the path of a .toml recipe file.")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: is {size / 1e6:.1f} MB; a recipe is a few KB of settings (the limit is "
                          f"{MAX_RECIPE_BYTES // 1_000_000} MB). Is this a data file? Put data in a file that "
                          "data.train names.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc}); save the recipe as UTF-8.") from None
    return parse_toml(text, str(path))


#: A recipe is a few KB; anything this large is a mistake (and would take seconds to parse).
MAX_RECIPE_BYTES = 1_000_000
#: Arrays/inline tables nested deeper than this are refused before tomllib recurses into them.
MAX_NESTING = 50


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """tomllib.loads with clear errors: syntax (line and column), absurd nesting (tomllib recurses)."""
    depth = _max_bracket_depth(text)
    if depth > MAX_NESTING:
        raise RecipeError(f"{where}: arrays or inline tables nested {depth} levels deep (the limit is "
                          f"{MAX_NESTING}); a recipe needs at most a list of names. Fix the value.")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11 puts "(at line X, column Y)" in the message only.
        raise RecipeError(f"{where}: malformed TOML: {exc}. Fix the syntax at that line.") from None
    except RecursionError:
        raise RecipeError(f"{where}: values nested too deeply to read; fix the value.") from None


def _max_bracket_depth(text: str) -> int:
    """Deepest [ / { nesting outside strings and comments (a cheap upper bound of TOML value depth;
    table headers such as [a.b] count 1)."""
    depth = deepest = 0
    quote: str | None = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-4"`` -> (["train", "learning_rate"], 0.0001).

    The value parses as a TOML literal (numbers, booleans, quoted strings, arrays),
    falling back to a plain string.
    """
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    key, _, raw_value = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise RecipeError(f"--set {item!r}: the key must be SECTION.KEY, e.g. train.epochs "
                          f"(sections: {', '.join(CORE_SECTIONS)})")
    raw_value = raw_value.strip()
    if _max_bracket_depth(raw_value) > MAX_NESTING:
        raise RecipeError(f"--set {key}: the value is nested more than {MAX_NESTING} levels deep.")
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                registry: PluginRegistry | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    path = Path(path).expanduser().resolve()
    raw = apply_overrides(read_toml(path), overrides or [])
    try:
        recipe = validate_recipe(raw, registry=registry, base_dir=path.parent,
                                 default_output=path.parent / "runs" / path.stem)
    except RecipeError as exc:
        # Name the file, and the --set values, so the user knows where to fix it.
        note = f"\n  (recipe: {path}"
        if overrides:
            note += "; --set " + " --set ".join(overrides)
        raise RecipeError(f"{exc}{note})") from None
    recipe._source = path
    return recipe


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


def validate_recipe(raw: dict[str, Any], registry: PluginRegistry | None = None,
                    base_dir: Path | None = None, default_output: Path | None = None) -> Recipe:
    """Validate a recipe dict; errors name the key path, the value and the fix."""
    if registry is None:
        from finetune.plugins import get_registry

        registry = get_registry()
    unknown = [k for k in raw if k not in CORE_SECTIONS]
    if unknown:
        key = unknown[0]
        raise RecipeError(f"[{key}]: unknown section{did_you_mean(key, CORE_SECTIONS)}. "
                          f"Valid sections: {', '.join(CORE_SECTIONS)}.")
    for section in CORE_SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise RecipeError(f"{section}: expected a [{section}] table, got {type(raw[section]).__name__} "
                              f"{raw[section]!r}")
        if section not in raw and section not in _OPTIONAL_SECTIONS:
            fields = CORE_SECTIONS[section].model_fields
            required = [name for name, info in fields.items() if info.is_required()]
            raise RecipeError(f"[{section}]: required section is missing; add a [{section}] table to the "
                              f"recipe with at least: {', '.join(required)} (see docs/recipes.md).")
    task_name = raw["task"].get("name")
    if task_name is None or task_name == "":
        raise RecipeError("task.name: required key is missing; add e.g. name = \"text-classification\" "
                          "under [task] (run `finetune tasks` for the list).")
    if not isinstance(task_name, str):
        raise RecipeError(f"task.name: invalid value {task_name!r} ({type(task_name).__name__}): expected a "
                          "string such as \"text-classification\" (run `finetune tasks` for the list).")
    task_cls = registry.get_task(task_name)
    model_cls = recipe_model_for(task_cls)
    try:
        recipe = model_cls.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, model_cls)) from None
    if base_dir is not None:
        _resolve_paths(recipe, base_dir)
    if not recipe.output.dir and default_output is not None:
        recipe.output.dir = str(default_output)
    return recipe


def _check_link(key: str, path: Path) -> None:
    """Symbolic links are followed (the resolved recipe records where they point); a link whose target
    is missing is named with its target, not reported as a missing file at a path the user never wrote."""
    import os

    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        if current.is_symlink() and not current.exists():
            raise RecipeError(f"{key}: {current} is a symbolic link to {os.readlink(current)}, which does not "
                              f"exist; fix the link or point {key} at the real file.")
        if not current.exists():
            return


def _is_path_annotation(annotation: Any) -> bool:
    """True for ``PathStr`` also inside ``PathStr | None`` / ``Optional[PathStr]`` / ``list[PathStr]``."""
    if get_origin(annotation) is Annotated:
        return any(isinstance(m, _PathMarker) for m in annotation.__metadata__)
    if get_origin(annotation) in (Union, types.UnionType, list):
        return any(_is_path_annotation(a) for a in get_args(annotation))
    return False


def _is_path_field(info: Any) -> bool:
    return any(isinstance(m, _PathMarker) for m in info.metadata) or _is_path_annotation(info.annotation)


def _resolve_paths(recipe: Recipe, base_dir: Path) -> None:
    def resolve(value: str) -> str:
        return str((base_dir / Path(value).expanduser()).resolve())

    def resolve_section(section: BaseModel, prefix: str) -> None:
        for field_name, info in type(section).model_fields.items():
            value = getattr(section, field_name)
            if isinstance(value, Section):  # a sub-table such as [distributed.deepspeed]
                resolve_section(value, f"{prefix}{field_name}.")
                continue
            if not _is_path_field(info):
                continue
            if isinstance(value, str) and value:
                _check_link(f"{prefix}{field_name}", base_dir / Path(value).expanduser())
                setattr(section, field_name, resolve(value))
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                for v in value:
                    if v:
                        _check_link(f"{prefix}{field_name}", base_dir / Path(v).expanduser())
                setattr(section, field_name, [resolve(v) if v else v for v in value])

    for section_name in CORE_SECTIONS:
        resolve_section(getattr(recipe, section_name), f"{section_name}.")
    # A backbone written as a path ("./x", "../x", "~/x") is always a path relative to the recipe, so a
    # missing folder is reported with its full path; a bare name ("models/x") is a path when that folder
    # exists beside the recipe, else a Hub id or a name a plugin resolves.
    backbone = recipe.model.backbone
    if Path(backbone).is_absolute():
        return
    candidate = base_dir / Path(backbone).expanduser()
    explicit = backbone in (".", "..", "~") or backbone.startswith(("./", "../", "~/"))
    if explicit or candidate.is_dir():
        recipe.model.backbone = str(candidate.resolve())


# ---------------------------------------------------------------------------
# errors

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "list": "an array", "dict": "a table", "literal": "one of the listed values",
}


def format_validation_error(exc: ValidationError, model_cls: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        # pydantic adds union branch names ("str", "list[str]") into loc; keep real keys only.
        loc = _real_key_path(model_cls, loc)
        key = ".".join(loc) or "(recipe)"
        etype = err["type"]
        value = err.get("input")
        if etype == "extra_forbidden":
            parent = _model_at(model_cls, loc[:-1])
            fields = list(parent.model_fields) if parent else []
            hint = did_you_mean(loc[-1], fields)
            lines.append(f"{key}: unknown key{hint}. Valid keys in [{'.'.join(loc[:-1])}]: "
                         f"{', '.join(fields)}.")
        elif etype == "missing":
            parent = _model_at(model_cls, loc[:-1])
            info = parent.model_fields.get(loc[-1]) if parent and loc else None
            what = f" ({info.description})" if info is not None and info.description else ""
            lines.append(f"{key}: required key is missing{what}; add it under [{'.'.join(loc[:-1])}].")
        else:
            msg = err["msg"]
            shown = repr(value)
            if len(shown) > 120:
                shown = shown[:100] + f"... ({len(shown):,} characters)"
            lines.append(f"{key}: invalid value {shown} ({type(value).__name__}): {msg}.")
    # one error per key is enough (unions report each branch)
    seen, unique = set(), []
    for line in lines:
        k = line.split(":", 1)[0]
        if k not in seen:
            seen.add(k)
            unique.append(line)
    if len(unique) > MAX_ERROR_LINES:  # e.g. a table of 100,000 unknown keys: the first few say enough
        unique = unique[:MAX_ERROR_LINES] + [f"... and {len(unique) - MAX_ERROR_LINES:,} more errors like these."]
    return "invalid recipe:\n  " + "\n  ".join(unique)


MAX_ERROR_LINES = 10


def _model_at(model_cls: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: Any = model_cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = info.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _real_key_path(model_cls: type[BaseModel], loc: list[str]) -> list[str]:
    """Keep the recipe keys of a pydantic error location, dropping union-branch names."""
    out: list[str] = []
    current: Any = model_cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            break  # below a leaf value: the rest are pydantic's branch labels
        out.append(part)
        info = current.model_fields.get(part)
        current = info.annotation if info is not None else None
    return out


def describe_fields(section: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) rows for docs and `finetune validate`."""
    from pydantic_core import PydanticUndefined

    rows = []
    for name, info in section.model_fields.items():
        if info.default_factory is not None:
            made = info.default_factory()
            default = "see below" if isinstance(made, BaseModel) else repr(made)
        else:
            default = "required" if info.default is PydanticUndefined else repr(info.default)
        rows.append((name, _type_name(info.annotation), default, info.description or ""))
    return rows


def _type_name(annotation: Any) -> str:
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " / ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is Annotated:
        return _type_name(args[0])
    if annotation is type(None):
        return "unset"
    return getattr(annotation, "__name__", str(annotation))
