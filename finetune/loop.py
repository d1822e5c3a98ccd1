"""The training loop: one readable Accelerate loop.

prepare -> for each epoch: batches -> forward/backward (accumulated) -> clip ->
step -> log -> maybe evaluate / checkpoint -> end of epoch evaluate.

Resume is exact for a deterministic recipe: batches come from a permutation
seeded by (seed, epoch), data loaders have their own generators (so creating
one draws nothing from the global RNG), and a checkpoint holds the trainable
weights, optimizer, scheduler, RNG states and the loop position.

Ctrl-C or SIGTERM asks the loop to stop: it finishes the current optimizer
step, writes a checkpoint and exits; the run is resumable. A second Ctrl-C
stops at once (the last periodic checkpoint remains).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError, RunError, TrainingError

if TYPE_CHECKING:
    from finetune.recipe import Recipe
    from finetune.runs import RunDir
    from finetune.task import Task


@dataclass
class LoopState:
    """Where the loop is. Saved in every checkpoint; callbacks may set ``should_stop``."""

    epoch: int = 0  #: current epoch (0-based)
    batches_done_in_epoch: int = 0  #: micro-batches of this epoch already consumed
    global_step: int = 0  #: optimizer steps taken
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)
    best_eval: dict[str, Any] = field(default_factory=dict)
    train_time_s: float = 0.0
    should_stop: bool = False
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("should_stop")
        return data


class Interrupted(FinetuneError):
    """Training stopped on request (Ctrl-C / SIGTERM) after writing a checkpoint."""


class _StopRequest:
    """SIGINT/SIGTERM -> a flag checked between optimizer steps; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step and writing a checkpoint "
              "(press Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16, else 'no'."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # is_bf16_available() says True on CPUs where bf16 is ~5x slower than fp32: read the flags.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "no"


#: Read the loss on the host after every micro-batch (None: only on CPU, where it costs nothing;
#: on an accelerator every read waits for the device, so losses are read at log, evaluation and
#: checkpoint points instead). Tests set it to exercise both paths.
READ_LOSS_EVERY_STEP: bool | None = None

_LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "rmse", "wer", "cer", "error")


def metric_mode(metric: str, setting: str, lower_is_better: tuple[str, ...] = ()) -> str:
    """'max' or 'min' for best-checkpoint selection: the recipe's setting, else the task's
    ``lower_is_better`` names, else by name (losses, perplexity, error rates are minimised)."""
    if setting != "auto":
        return setting
    if metric in lower_is_better or any(word in metric.lower() for word in _LOWER_IS_BETTER):
        return "min"
    return "max"


# ---------------------------------------------------------------------------

_LIBC: list[Any] = []


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``); False where unavailable.

    Called before and after each evaluation: training's freed activation buffers would otherwise
    stay under the evaluation's allocations, and the evaluation's larger no-grad batches under the
    training that follows, raising the peak resident memory at every evaluation. Re-faulting those
    pages costs milliseconds per evaluation; non-glibc systems simply skip it (nothing fails)."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None)
        except OSError:
            _LIBC.append(None)
    trim = getattr(_LIBC[0], "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into batches."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group_batches: int | None = None) -> list[list[int]]:
    """The batches of one epoch with examples of similar length together (less padding).

    A permutation seeded by ``(seed, epoch)`` is cut into groups of ``group_batches`` batches;
    each group is sorted by length (longest first) and cut into batches; the batch order is
    then shuffled. Epochs stay random (which examples meet, and in which order batches come),
    the count is ``ceil(n / batch_size)`` like :func:`epoch_batches`, and the result depends
    only on the arguments, so resume replays it exactly. The default group is a quarter of
    the epoch, at most 50 batches: on SMS-like data that keeps padding within 4% of the real
    tokens (against 140% for a plain shuffle), while a small dataset still gets at least four
    independently drawn groups per epoch, so batches do not repeat epoch after epoch.
    """
    import torch

    n = len(lengths)
    if group_batches is None:
        group_batches = min(50, max(1, math.ceil(math.ceil(n / batch_size) / 4)))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    size = batch_size * group_batches
    batches: list[list[int]] = []
    for start in range(0, n, size):
        group = sorted(order[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep random order
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def trainable_state_dict(model: Any) -> dict[str, Any]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def incomplete_tensors(tensors: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What is wrong with ``tensors`` (name -> tensor, or name -> shape) against the expected
    ``name -> shape``: missing names, empty (zero-size) tensors, wrong shapes. Empty when complete.
    Extra names are allowed."""
    problems = []
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"{name}: missing")
            continue
        value = tensors[name]
        got = tuple(value) if isinstance(value, (tuple, list)) else tuple(value.shape)
        if math.prod(got) == 0 and math.prod(shape) != 0:
            problems.append(f"{name}: empty {got}, expected {shape}")
        elif got != shape:
            problems.append(f"{name}: shape {got}, expected {shape}")
    return problems


def check_complete(tensors: dict[str, Any], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse to write a ``what`` (adapter, checkpoint) that lacks trained tensors: the known failure
    of sharded training, where a state dict taken from one shard holds empty or missing tensors."""
    problems = incomplete_tensors(tensors, expected)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RunError(f"the {what} is incomplete: {len(problems)} of {len(expected)} trained tensors are "
                       f"missing or empty ({shown}). It was not written; the previous one is intact. This happens "
                       "when weights are taken from one shard of a sharded (FSDP/DeepSpeed) model; please report "
                       "it with the recipe's [distributed] section.")


def save_rng_state(path: Path) -> None:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, path)


def load_rng_state(path: Path) -> None:
    import numpy as np
    import torch

    state = torch.load(path, weights_only=True)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> LoopState:
    """Restore a checkpoint written by :func:`train`; a damaged file is named in the error.
    ``optimizer=None`` leaves the optimizer as it is."""
    import torch
    from safetensors.torch import load_file

    def fail(name: str, exc: BaseException) -> RunError:
        return RunError(f"checkpoint {ckpt / name} is corrupt or unreadable ({type(exc).__name__}: {exc}). "
                        f"Delete {ckpt} to resume from the previous checkpoint, or pass --overwrite to start over.")

    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
    except Exception as exc:  # noqa: BLE001
        raise fail("trainable.safetensors", exc) from None
    params = dict(model.named_parameters())
    missing = [k for k in params if params[k].requires_grad and k not in weights]
    if missing:
        raise RunError(f"checkpoint {ckpt / 'trainable.safetensors'} does not match the model "
                       f"(missing {missing[:3]}...); delete {ckpt} or pass --overwrite.")
    # A model whose shapes changed since the checkpoint (e.g. the data gained a class, so the head has
    # another size) must fail with a message, not a tensor-size RuntimeError mid-copy.
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(params[k].shape)}" for k, v in weights.items()
             if k in params and tuple(v.shape) != tuple(params[k].shape)]
    if wrong:
        raise RunError(f"checkpoint {ckpt / 'trainable.safetensors'} does not fit the model ({'; '.join(wrong[:3])})"
                       ": the model changed since the checkpoint was written (for a classifier: the number of "
                       "classes in the data). Restore the data to resume, or pass --overwrite to start over.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    for name, obj in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        if obj is None:  # sharded strategies: the optimizer state is not checkpointed (see docs/distributed.md)
            continue
        try:
            obj.load_state_dict(torch.load(ckpt / name, weights_only=True))
        except Exception as exc:  # noqa: BLE001
            raise fail(name, exc) from None
    try:
        data = json.loads((ckpt / "loop_state.json").read_text())
        state = LoopState(**data)
    except Exception as exc:  # noqa: BLE001
        raise fail("loop_state.json", exc) from None
    try:
        load_rng_state(ckpt / "rng.pt")
    except Exception as exc:  # noqa: BLE001
        raise fail("rng.pt", exc) from None
    return state


# ---------------------------------------------------------------------------

@dataclass
class TrainResult:
    state: LoopState
    metric: str
    mode: str
    mixed_precision: str
    steps_total: int
    interrupted: bool = False


SHARDED_STRATEGIES = ("fsdp", "deepspeed")
_WRAP_POLICIES = {"transformer": "transformer_based_wrap", "size": "size_based_wrap", "none": "no_wrap"}


def check_distributed(recipe: Recipe) -> None:
    """What ``[distributed]`` needs from the machine, checked before the run folder exists."""
    import importlib.util

    from finetune.errors import RecipeError

    strategy = recipe.distributed.strategy
    if strategy == "ddp":
        return
    import torch

    if not torch.cuda.is_available():
        raise RecipeError(
            f"distributed.strategy = {strategy!r} needs GPUs. On CPU, Accelerate runs several processes as "
            f"plain data parallel and would silently ignore the {strategy} settings (FSDP and DeepSpeed are "
            "not supported there); use strategy = \"ddp\" (the default) on CPU.")
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise RecipeError("distributed.strategy = \"deepspeed\" needs DeepSpeed, which is not installed: "
                              "pip install deepspeed (or use strategy = \"fsdp\", which needs nothing extra).")
        deepspeed_config(recipe)


def fsdp_plugin_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Arguments of Accelerate's FullyShardedDataParallelPlugin for ``[distributed.fsdp]``.

    The adapter and checkpoints always gather the full trainable weights on the main process
    (FULL_STATE_DICT), so finetune never writes sharded files; ``use_orig_params`` lets frozen and
    LoRA parameters share FSDP units."""
    f = recipe.distributed.fsdp
    kwargs: dict[str, Any] = {
        "sharding_strategy": f.sharding_strategy,
        "auto_wrap_policy": _WRAP_POLICIES[f.auto_wrap_policy],
        "cpu_offload": f.cpu_offload,
        "state_dict_type": "FULL_STATE_DICT",
        "use_orig_params": True,
        "sync_module_states": True,
    }
    if f.auto_wrap_policy == "transformer" and f.transformer_layer_cls:
        kwargs["transformer_cls_names_to_wrap"] = list(f.transformer_layer_cls)
    if f.auto_wrap_policy == "size":
        kwargs["min_num_params"] = f.min_num_params
    return kwargs


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed config for ``[distributed.deepspeed]`` (or its JSON file), with [train] filled in."""
    from finetune.errors import RecipeError

    ds, cfg = recipe.distributed.deepspeed, recipe.train
    if ds.config:
        key = "distributed.deepspeed.config"
        try:
            conf = json.loads(Path(ds.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"{key}: file not found: {ds.config} (relative paths resolve against the "
                              "recipe's folder).") from None
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{key}: cannot read {ds.config} as JSON ({exc}).") from None
        if not isinstance(conf, dict):
            raise RecipeError(f"{key}: {ds.config} holds a JSON {type(conf).__name__}, not an object.")
        for owned in ("optimizer", "scheduler"):
            if owned in conf:
                raise RecipeError(f"{key}: {ds.config} has an {owned!r} section; finetune builds the optimizer "
                                  "and scheduler from [train]: remove it.")
    else:
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if ds.offload_optimizer != "none":
            if ds.zero_stage == 0:
                raise RecipeError("distributed.deepspeed.offload_optimizer needs zero_stage >= 1.")
            zero["offload_optimizer"] = {"device": ds.offload_optimizer}
        if ds.offload_param != "none":
            if ds.zero_stage != 3:
                raise RecipeError("distributed.deepspeed.offload_param needs zero_stage = 3 (only stage 3 "
                                  "shards the parameters).")
            zero["offload_param"] = {"device": ds.offload_param}
        if ds.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        conf = {"zero_optimization": zero}
    for name, value in (("train_micro_batch_size_per_gpu", cfg.batch_size), ("gradient_accumulation_steps", 1),
                        ("gradient_clipping", cfg.max_grad_norm or 0.0)):
        if conf.get(name, "auto") == "auto":
            conf[name] = value
    if conf["gradient_accumulation_steps"] != 1 or cfg.gradient_accumulation_steps != 1:
        raise RecipeError("distributed.strategy = \"deepspeed\" works with train.gradient_accumulation_steps = 1 "
                          "(DeepSpeed counts accumulation itself); raise train.batch_size or use ddp/fsdp.")
    if conf["train_micro_batch_size_per_gpu"] != cfg.batch_size:
        raise RecipeError(f"distributed.deepspeed.config: train_micro_batch_size_per_gpu = "
                          f"{conf['train_micro_batch_size_per_gpu']} differs from train.batch_size = "
                          f"{cfg.batch_size}; set it to \"auto\".")
    zero = conf.get("zero_optimization") or {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise RecipeError("distributed.deepspeed.config: ZeRO stage 3 needs "
                          "zero_optimization.stage3_gather_16bit_weights_on_model_save = true, or the adapter "
                          "cannot be gathered from the shards when it is saved.")
    return conf


def make_accelerator(recipe: Recipe, run_path: Path) -> Any:
    """The Accelerator for a run. On CPU it must be ``cpu=True``: otherwise each process of a
    multi-process launch silently trains its own unsynchronised copy. ``[distributed]`` picks the
    strategy: plain data parallel (DDP), FSDP or DeepSpeed (both GPU only)."""
    import torch
    from accelerate import Accelerator

    check_distributed(recipe)
    cfg = recipe.train
    log_with = "tensorboard" if cfg.tensorboard else None  # availability checked before the run folder exists
    kwargs: dict[str, Any] = {}
    if recipe.distributed.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(recipe))
    elif recipe.distributed.strategy == "deepspeed":
        from accelerate import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(recipe))
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
                       cpu=not torch.cuda.is_available(), log_with=log_with,
                       project_dir=str(run_path / "tensorboard") if log_with else None, **kwargs)


def train(*, task: Task, recipe: Recipe, run: RunDir, model: Any, processor: Any, train_ds: Any, eval_ds: Any,
          collate: Any, resume_from: Path | None, callbacks: list[Any], save_adapter: Any,
          console: Any, accelerator: Any = None) -> TrainResult:
    """Train ``model`` (already wrapped by PEFT) and keep ``run`` up to date (main process writes)."""
    import torch
    from accelerate.utils import send_to_device
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    cfg = recipe.train
    if accelerator is None:
        accelerator = make_accelerator(recipe, run.path)
    mixed = accelerator.mixed_precision
    log_with = "tensorboard" if cfg.tensorboard else None
    if log_with:
        accelerator.init_trackers("finetune")

    metric = cfg.metric or task.default_metric
    mode = metric_mode(metric, cfg.metric_mode, tuple(getattr(task, "lower_is_better", ()) or ()))
    accum = cfg.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index

    # Optimizer: no weight decay on biases and norms.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    # Batches are planned globally (batch_size x processes) and each global batch is dealt out to the
    # processes, so a run's batches depend on the global batch only: N processes train like one with
    # an N-times larger batch, and a resume may change the process count. A last global batch with
    # fewer examples than processes is dropped (some process would get none).
    global_batch = cfg.batch_size * world
    n_batches = math.ceil(len(train_ds) / global_batch)
    remainder = len(train_ds) % global_batch
    batches_per_rank = n_batches - (1 if world > 1 and 0 < remainder < world else 0)
    steps_per_epoch = math.ceil(batches_per_rank / accum)
    steps_total = steps_per_epoch * cfg.epochs
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps_total),
                              num_training_steps=steps_total)
    # What Accelerate actually does: FSDP only with several processes, DeepSpeed even with one.
    sharded = str(accelerator.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED")
    trainable_shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    state = LoopState()
    if resume_from is not None and sharded:
        # Full weights go into the model before it is sharded; the optimizer state is not checkpointed.
        state = load_checkpoint(resume_from, model, None, scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Evaluation sees examples longest first when the task reports lengths: batches of similar length
    # waste little on padding, and metrics do not depend on the order (predictions and references
    # travel together).
    eval_lengths = task.example_lengths(eval_ds) if cfg.group_by_length else None
    eval_source = eval_ds
    if eval_lengths is not None:
        from torch.utils.data import Subset

        eval_source = Subset(eval_ds, sorted(range(len(eval_ds)), key=lambda i: -eval_lengths[i]))
    eval_loader = accelerator.prepare(DataLoader(
        eval_source, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, shuffle=False, collate_fn=collate,
        num_workers=cfg.num_workers))

    if resume_from is not None:
        if not sharded:
            state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        run.truncate_metrics_log(state.global_step)
        console.print(f"Resuming from {resume_from.name}: epoch {state.epoch + 1}, step {state.global_step}"
                      f"/{steps_total}.")

    def evaluate() -> dict[str, Any]:
        import numpy as np

        model.eval()
        release_freed_memory()  # training's freed activation buffers: evaluation's batches start from a trim heap
        losses, preds, refs = [], [], []
        with torch.no_grad():
            for batch in eval_loader:
                with accelerator.autocast():
                    out = task.evaluation_step(model, batch)
                n = next(iter(batch.values())).shape[0]
                if out.get("loss") is not None:
                    losses.append(accelerator.gather_for_metrics(out["loss"].detach().float().repeat(n)))
                if out.get("predictions") is not None:
                    preds.append(accelerator.gather_for_metrics(out["predictions"]).cpu().numpy())
                    refs.append(accelerator.gather_for_metrics(out["references"]).cpu().numpy())
        release_freed_memory()
        task.train_mode(model)
        result: dict[str, Any] = {}
        if losses:
            result["eval_loss"] = float(torch.cat(losses).mean())
        if preds:
            result.update(task.compute_metrics(np.concatenate(preds), np.concatenate(refs)))
        return task.finalize_eval(result)

    def full_state_dict() -> dict[str, Any] | None:
        """Under FSDP/DeepSpeed: every process must call this (it gathers the shards); the main
        process gets the whole state dict, the others None. Otherwise None (nothing to gather)."""
        if not sharded:
            return None
        gathered = accelerator.get_state_dict(model)
        return gathered if accelerator.is_main_process else None

    def write_checkpoint() -> None:
        full = full_state_dict()
        if not accelerator.is_main_process:
            return
        from safetensors.torch import save_file

        unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if full is not None:
            weights = {k: v.detach().cpu().contiguous() for k, v in full.items() if k in trainable_shapes}
        else:
            weights = trainable_state_dict(unwrapped)
        check_complete(weights, trainable_shapes, f"checkpoint at step {state.global_step}")

        def writer(tmp: Path) -> None:
            save_file(weights, str(tmp / "trainable.safetensors"))
            if not sharded:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            save_rng_state(tmp / "rng.pt")
            (tmp / "loop_state.json").write_text(json.dumps(state.to_json(), indent=2))

        path = run.write_checkpoint(state.global_step, writer, keep=cfg.keep_checkpoints)
        for cb in callbacks:
            _call(cb, "on_checkpoint", run=run, state=state, path=path)

    def after_eval(metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if metric not in scalars:
            raise FinetuneError(f"train.metric: {metric!r} is not computed by task {task.name!r}; "
                                f"available: {', '.join(sorted(scalars))}.")
        # after an epoch boundary state.epoch already counts the finished epoch
        epoch = state.epoch if state.batches_done_in_epoch == 0 else state.epoch + 1
        record = {"kind": "eval", "step": state.global_step, "epoch": epoch, **scalars}
        if accelerator.is_main_process:
            run.log_metrics(record)
        if log_with:
            accelerator.log({f"eval/{k}": v for k, v in scalars.items()}, step=state.global_step)
        state.last_eval = {"step": state.global_step, "epoch": epoch, **metrics}
        value = scalars[metric]
        better = state.best_metric is None or (value > state.best_metric if mode == "max" else
                                               value < state.best_metric)
        if better:
            state.best_metric, state.best_step = value, state.global_step
            state.best_eval = dict(state.last_eval)
            state.evals_without_improvement = 0
            full = full_state_dict()  # a collective under FSDP/DeepSpeed: every process takes part
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
                if full is None:
                    save_adapter(unwrapped)
                else:
                    save_adapter(unwrapped, state_dict=full)
        else:
            state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                state.should_stop = state.stopped_early = True
                console.print(f"Early stopping: {metric} has not improved for "
                              f"{state.evals_without_improvement} evaluations.")
        if accelerator.is_main_process:
            task.after_evaluate(accelerator.unwrap_model(model), processor, run.path, state.global_step, metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in scalars.items())
        console.print(f"eval @ step {state.global_step} (epoch {epoch}): {shown}"
                      + ("  [best]" if better else ""))
        for cb in callbacks:
            _call(cb, "on_evaluate", run=run, state=state, metrics=metrics)

    host_checks = accelerator.device.type == "cpu" if READ_LOSS_EVERY_STEP is None else READ_LOSS_EVERY_STEP

    def check_finite(losses: Any, first_step: int) -> None:
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = first_step + int(bad[0])
            raise TrainingError(
                f"loss became {float(losses[int(bad[0])])} at step {step} (epoch {state.epoch + 1}). "
                "Lower train.learning_rate, set train.mixed_precision = \"no\", or check the data "
                f"for extreme values. The last checkpoint in {run.checkpoints_dir} is intact.")

    for cb in callbacks:
        _call(cb, "on_train_start", run=run, state=state)
    progress = console.progress(total=steps_total, completed=state.global_step)
    task.train_mode(model)
    interrupted = False
    with _StopRequest() as stop, progress:
        window_t, window_samples = state.train_time_s, 0  # a log window's training time (no evaluation)
        window_losses: list[Any] = []  # loss tensors not yet read on the host
        window_values: list[float] = []  # losses of this log window, read
        while state.epoch < cfg.epochs and not state.should_stop:
            batches = task.train_batches(train_ds, global_batch, cfg.seed, state.epoch)
            if len(batches) != n_batches:
                raise FinetuneError(f"task {task.name!r}: train_batches returned {len(batches)} batches for "
                                    f"{len(train_ds)} examples; expected {n_batches} (ceil(examples / batch_size)).")
            if world > 1:  # interleaved: with length-grouped batches every process gets similar lengths
                batches = [b[rank::world] for b in batches[:batches_per_rank]]
            remaining = batches[state.batches_done_in_epoch:]
            # training time counts from here: loading and collating batches included, evaluation and
            # checkpoints not (so samples/s compares with a Trainer's train() time)
            mark = time.perf_counter()
            loader = DataLoader(train_ds, batch_sampler=remaining, collate_fn=collate, num_workers=cfg.num_workers,
                                generator=torch.Generator().manual_seed(cfg.seed + state.epoch))
            group: list[Any] = []
            for batch in loader:
                group.append(send_to_device(batch, accelerator.device))
                last_of_epoch = state.batches_done_in_epoch + len(group) == len(batches)
                if len(group) < accum and not last_of_epoch:
                    continue
                # one optimizer step over the accumulated micro-batches
                step_loss = None
                for j, micro in enumerate(group):
                    sync = j == len(group) - 1
                    ctx = accelerator.no_sync(model) if not sync else _nullcontext()
                    with ctx, accelerator.autocast():
                        loss = task.training_loss(model, micro)
                    if host_checks:  # on CPU reading the loss costs nothing: stop before a bad backward
                        check_finite(loss.detach().float().reshape(1), state.global_step + 1)
                    accelerator.backward(loss / len(group))
                    part = loss.detach().float() / len(group)
                    step_loss = part if step_loss is None else step_loss + part
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n_samples = sum(next(iter(m.values())).shape[0] for m in group) * world
                state.batches_done_in_epoch += len(group)
                state.global_step += 1
                state.samples_seen += n_samples
                group = []
                window_samples += n_samples
                window_losses.append(step_loss)
                log_now = state.global_step % cfg.log_every_steps == 0 or state.global_step == steps_total
                epoch_done = state.batches_done_in_epoch == len(batches)
                eval_now = epoch_done or bool(cfg.eval_every_steps and state.global_step % cfg.eval_every_steps == 0)
                periodic = bool(cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0)
                if host_checks or log_now or eval_now or periodic or stop.requested or state.should_stop:
                    # The only host sync of a step on an accelerator: losses are read here, at log,
                    # evaluation and checkpoint points, so a bad loss never reaches a checkpoint.
                    losses = torch.stack(window_losses).cpu()
                    check_finite(losses, state.global_step - len(window_losses) + 1)
                    window_values.extend(losses.tolist())
                    window_losses = []
                    progress.update(state.global_step, loss=window_values[-1], epoch=state.epoch + 1)
                else:
                    progress.update(state.global_step, epoch=state.epoch + 1)
                state.train_time_s += time.perf_counter() - mark
                if log_now:
                    elapsed = state.train_time_s - window_t
                    logs = {"loss": sum(window_values) / len(window_values), "lr": scheduler.get_last_lr()[0],
                            "samples_per_s": window_samples / elapsed if elapsed > 0 else 0.0}
                    if accelerator.is_main_process:
                        run.log_metrics({"kind": "train", "step": state.global_step,
                                         "epoch": state.epoch + 1, **logs})
                    if log_with:
                        accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.global_step)
                    progress.log_line(state.global_step, logs, state.epoch + 1)
                    for cb in callbacks:
                        _call(cb, "on_log", run=run, state=state, logs=logs)
                    window_t, window_samples, window_values = state.train_time_s, 0, []
                if eval_now and not epoch_done:
                    after_eval(evaluate())
                if epoch_done:
                    state.epoch += 1
                    state.batches_done_in_epoch = 0
                    after_eval(evaluate())
                    write_checkpoint()
                if world > 1:  # every process must stop at the same step, or the next collective hangs
                    flags = torch.tensor([[float(stop.requested is not None), float(state.should_stop)]])
                    flags = accelerator.gather(flags).max(dim=0).values
                    if flags[0] and stop.requested is None:
                        stop.requested = "peer"
                    state.should_stop = bool(flags[1])
                if not epoch_done and (periodic or stop.requested or state.should_stop):
                    write_checkpoint()
                mark = time.perf_counter()
                if stop.requested:
                    interrupted = True
                    break
                if state.should_stop:
                    break
            if interrupted:
                break
    if not interrupted and state.last_eval.get("step") != state.global_step:
        after_eval(evaluate())  # a callback stopped training between evaluations
        write_checkpoint()
    for cb in callbacks:
        _call(cb, "on_train_end", run=run, state=state, metrics=state.last_eval)
    if log_with:
        accelerator.end_training()
    return TrainResult(state=state, metric=metric, mode=mode, mixed_precision=mixed, steps_total=steps_total,
                       interrupted=interrupted)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _call(callback: Any, method: str, **kwargs: Any) -> None:
    fn = getattr(callback, method, None)
    if fn is None:
        return
    try:
        fn(**kwargs)
    except FinetuneError:
        raise
    except Exception as exc:
        from finetune.errors import PluginError

        owner = getattr(callback, "finetune_owner", f"callback {type(callback).__name__}")
        raise PluginError(f"{owner} raised in {method}: {type(exc).__name__}: {exc}; the run is resumable "
                          "(finetune run RECIPE --resume) once that is fixed") from exc
