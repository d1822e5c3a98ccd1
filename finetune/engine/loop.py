"""The training loop: one Accelerate loop whose steps read top to bottom (:meth:`TrainingLoop.run`).

    set up (optimizer and schedule, batch plan, accelerator.prepare, resume, the [track] trackers)
    evaluate the untouched model (step 0, "before")
    for each epoch: the task's batches -> groups of micro-batches ->
        one optimizer step (forward/backward per micro-batch, clip, step) ->
        log -> evaluate and keep the best adapter -> checkpoint
    a final evaluation if training stopped between evaluations
    the test split, if any: the selected adapter loaded back and scored once (never used to select)

Resume is exact for a deterministic recipe: batches come from a permutation seeded by (seed, epoch),
training loaders have their own generators (so creating one draws nothing from the global RNG, which
dropout uses), an evaluation leaves the random states as it found them (so evaluating never changes
what training does), and a checkpoint holds the trainable weights, optimizer, scheduler, RNG states and
the loop position (``finetune.engine.checkpoint``).

Ctrl-C or SIGTERM asks the loop to stop (``finetune.engine.stop``): it finishes the current optimizer
step, writes a checkpoint and returns ``interrupted``; the run is resumable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.contract.callbacks import LoopState
from finetune.engine.checkpoint import (
    check_complete,
    load_checkpoint,
    save_rng_state,
    trainable_state_dict,
    trained_buffer_names,
)
from finetune.engine.distributed import make_accelerator
from finetune.engine.evaluation import evaluate, evaluation_loader
from finetune.engine.schedule import make_scheduler
from finetune.engine.stop import StopRequest
from finetune.engine.tracking import Trackers
from finetune.errors import FinetuneError, TrainingError

if TYPE_CHECKING:
    from finetune.contract.recipe import Recipe
    from finetune.engine.guard import GuardedCallback, GuardedTask
    from finetune.engine.run_folder import RunDir

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


@dataclass
class TrainResult:
    state: LoopState
    metric: str
    mode: str
    mixed_precision: str
    steps_total: int
    interrupted: bool = False
    #: the test split's metrics with the selected adapter (``{}`` without a test split)
    test_eval: dict[str, Any] | None = None


@dataclass
class BatchPlan:
    """How an epoch's examples become optimizer steps.

    Batches are planned globally (batch_size x processes) and each global batch is dealt out to the
    processes, so a run's batches depend on the global batch only: N processes train like one with an
    N-times larger batch, and a resume may change the process count. A last global batch with fewer
    examples than processes is dropped (some process would get none)."""

    global_batch: int
    batches: int  #: global batches per epoch: ceil(examples / global_batch)
    batches_per_rank: int  #: micro-batches each process trains per epoch
    steps_per_epoch: int  #: optimizer steps per epoch (micro-batches / gradient accumulation)
    steps_total: int

    @classmethod
    def for_run(cls, examples: int, batch_size: int, processes: int, accumulation: int, epochs: int) -> BatchPlan:
        global_batch = batch_size * processes
        batches = math.ceil(examples / global_batch)
        remainder = examples % global_batch
        per_rank = batches - (1 if processes > 1 and 0 < remainder < processes else 0)
        steps_per_epoch = math.ceil(per_rank / accumulation)
        return cls(global_batch, batches, per_rank, steps_per_epoch, steps_per_epoch * epochs)


def train(*, task: GuardedTask, recipe: Recipe, run: RunDir, model: Any, processor: Any, train_ds: Any, eval_ds: Any,
          collate: Any, resume_from: Path | None, callbacks: list[GuardedCallback], save_adapter: Any,
          console: Any, accelerator: Any = None, test_ds: Any = None, load_best: Any = None) -> TrainResult:
    """Train ``model`` (already wrapped by PEFT) and keep ``run`` up to date (the main process writes).

    ``save_adapter(unwrapped_model, state_dict=None)`` writes the best adapter; ``collate`` is the
    task's collator. With ``test_ds``, ``load_best(unwrapped_model)`` puts the saved best adapter's weights
    back into the model after training, and the test split is scored once. Returns where training ended;
    raises on a non-finite loss or a plugin error."""
    loop = TrainingLoop(task=task, recipe=recipe, run=run, model=model, processor=processor, train_ds=train_ds,
                        eval_ds=eval_ds, collate=collate, callbacks=callbacks, save_adapter=save_adapter,
                        console=console, accelerator=accelerator or make_accelerator(recipe, run.path),
                        test_ds=test_ds, load_best=load_best)
    return loop.run(resume_from)


class TrainingLoop:
    """One training run's objects and its steps. :meth:`run` is the loop; every other method is one step."""

    def __init__(self, *, task: GuardedTask, recipe: Recipe, run: RunDir, model: Any, processor: Any,
                 train_ds: Any, eval_ds: Any, collate: Any, callbacks: list[GuardedCallback], save_adapter: Any,
                 console: Any, accelerator: Any, test_ds: Any = None, load_best: Any = None) -> None:
        self.task, self.recipe, self.cfg, self.run_dir = task, recipe, recipe.train, run
        self.model, self.processor, self.train_ds, self.eval_ds = model, processor, train_ds, eval_ds
        self.collate, self.callbacks, self.save_adapter, self.console = collate, callbacks, save_adapter, console
        self.accelerator = accelerator
        self.test_ds, self.load_best = test_ds, load_best
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        self.trackers = Trackers(accelerator, recipe, run.path, say=console.print)
        self.metric = self.cfg.metric or task.default_metric
        self.mode = metric_mode(self.metric, self.cfg.metric_mode, tuple(getattr(task, "lower_is_better", ()) or ()))
        self.plan = BatchPlan.for_run(len(train_ds), self.cfg.batch_size, self.world,
                                      self.cfg.gradient_accumulation_steps, self.cfg.epochs)
        # What Accelerate actually does: FSDP only with several processes, DeepSpeed even with one.
        self.sharded = str(accelerator.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED")
        self.trainable_shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        self.trained_buffers = set(trained_buffer_names(model))  # e.g. a training BatchNorm's statistics
        # On CPU reading the loss costs nothing: every step is checked before its backward pass.
        self.host_checks = (accelerator.device.type == "cpu" if READ_LOSS_EVERY_STEP is None
                            else READ_LOSS_EVERY_STEP)
        self.state = LoopState()
        self.interrupted = False

    # -- the loop ------------------------------------------------------
    def run(self, resume_from: Path | None) -> TrainResult:
        self.set_up_optimizer()
        self.prepare(resume_from)
        try:
            self.trackers.start(self.state.global_step if resume_from is not None else None, self.metric)
            result = self.train_and_test()
        except BaseException as exc:
            self.trackers.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if not result.interrupted:
            self.trackers.log("best", self.state.best_eval, self.state.global_step)
        self.trackers.finish("KILLED" if result.interrupted else "FINISHED")
        return result

    def train_and_test(self) -> TrainResult:
        """Step 0, the epochs, a last evaluation if needed, the test split."""
        self.notify("on_train_start")
        if self.cfg.eval_before_training and self.state.global_step == 0 and not self.state.before_eval:
            self.evaluate_before_training()
        self.task.train_mode(self.model)
        self.progress = self.console.progress(total=self.plan.steps_total, completed=self.state.global_step,
                                              samples_seen=self.state.samples_seen,
                                              train_time_s=self.state.train_time_s)
        if self.state.best_metric is not None:  # resumed
            self.progress.set_best(self.metric, self.state.best_metric, self.state.best_step)
        with StopRequest() as self.stop, self.progress:
            self.window = LogWindow(self.state.train_time_s)
            while self.state.epoch < self.cfg.epochs and not self.state.should_stop and not self.interrupted:
                for group in self.epoch_groups():
                    step_loss = self.optimizer_step(group)
                    self.after_step(group, step_loss)
                    if self.interrupted or self.state.should_stop:
                        break
        if not self.interrupted and self.state.last_eval.get("step") != self.state.global_step:
            self.evaluate_and_select()  # a callback stopped training between evaluations
            self.write_checkpoint()
        self.notify("on_train_end", metrics=self.state.last_eval)
        test_eval = self.evaluate_test() if self.test_ds is not None and not self.interrupted else {}
        return TrainResult(state=self.state, metric=self.metric, mode=self.mode,
                           mixed_precision=self.accelerator.mixed_precision, steps_total=self.plan.steps_total,
                           interrupted=self.interrupted, test_eval=test_eval)

    # -- set-up --------------------------------------------------------
    def set_up_optimizer(self) -> None:
        """AdamW (no weight decay on biases and norms) and the learning-rate schedule over the whole run.
        With ``peft.loraplus_lr_ratio`` (LoRA+), PEFT's LoRA+ optimizer: the same AdamW with the B matrices
        (and 1-d parameters) at ``ratio`` times the learning rate; the schedule scales every group alike."""
        import torch

        ratio = self.recipe.peft.loraplus_lr_ratio
        if ratio is not None:
            from peft.optimizers import create_loraplus_optimizer

            self.optimizer = create_loraplus_optimizer(self.model, torch.optim.AdamW, lr=self.cfg.learning_rate,
                                                       loraplus_lr_ratio=ratio,
                                                       loraplus_weight_decay=self.cfg.weight_decay)
        else:
            decay, no_decay = [], []
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
            self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                                {"params": no_decay, "weight_decay": 0.0}],
                                               lr=self.cfg.learning_rate)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.lr_scheduler, self.cfg.warmup_ratio,
                                        self.plan.steps_total)

    def prepare(self, resume_from: Path | None) -> None:
        """``accelerator.prepare`` the model and optimizer, build the eval loader, restore a checkpoint."""
        if resume_from is not None and self.sharded:
            # Full weights go into the model before it is sharded; the optimizer state is not checkpointed.
            self.state = load_checkpoint(resume_from, self.model, None, self.scheduler)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.eval_loader = self.evaluation_loader(self.eval_ds)
        if resume_from is not None:
            if not self.sharded:
                self.state = load_checkpoint(resume_from, self.accelerator.unwrap_model(self.model), self.optimizer,
                                             self.scheduler)
            self.run_dir.truncate_metrics_log(self.state.global_step)
            self.console.print(f"Resuming from {resume_from.name}: epoch {self.state.epoch + 1}, step "
                               f"{self.state.global_step}/{self.plan.steps_total}.")

    def evaluation_loader(self, dataset: Any) -> Any:
        return evaluation_loader(self.task, dataset, self.collate, self.accelerator,
                                 batch_size=self.cfg.eval_batch_size or 2 * self.cfg.batch_size,
                                 num_workers=self.cfg.num_workers, longest_first=self.cfg.group_by_length)

    # -- training ------------------------------------------------------
    def epoch_batches(self) -> list[list[int]]:
        """This process's micro-batches (example indices) of the current epoch, from the task's plan."""
        batches = self.task.train_batches(self.train_ds, self.plan.global_batch, self.cfg.seed, self.state.epoch)
        if len(batches) != self.plan.batches:
            raise self.task.fail("train_batches", f"returned {len(batches)} batches for {len(self.train_ds)} "
                                                  f"examples; expected {self.plan.batches} (ceil(examples / "
                                                  "batch_size))")
        if self.world > 1:  # interleaved: with length-grouped batches every process gets similar lengths
            batches = [b[self.rank::self.world] for b in batches[:self.plan.batches_per_rank]]
        return batches

    def epoch_groups(self):
        """The rest of the current epoch as groups of micro-batches, one group per optimizer step, on the
        device. Training time runs from here: loading and collating batches counts, evaluation does not."""
        import torch
        from accelerate.utils import send_to_device
        from torch.utils.data import DataLoader

        batches = self.epoch_batches()
        self.batches_in_epoch = len(batches)
        self.mark = time.perf_counter()
        loader = DataLoader(self.train_ds, batch_sampler=batches[self.state.batches_done_in_epoch:],
                            collate_fn=self.collate, num_workers=self.cfg.num_workers,
                            generator=torch.Generator().manual_seed(self.cfg.seed + self.state.epoch))
        group: list[Any] = []
        for batch in loader:
            group.append(send_to_device(batch, self.accelerator.device))
            last_of_epoch = self.state.batches_done_in_epoch + len(group) == len(batches)
            if len(group) == self.cfg.gradient_accumulation_steps or last_of_epoch:
                yield group
                group = []

    def optimizer_step(self, group: list[dict[str, Any]]) -> Any:
        """Forward and backward over the group's micro-batches (gradients synchronised on the last), clip,
        step. Returns the step's mean loss as a tensor (read on the host only when needed)."""
        from contextlib import nullcontext

        step_loss = None
        for j, micro in enumerate(group):
            no_sync = self.accelerator.no_sync(self.model) if j < len(group) - 1 else nullcontext()
            with no_sync, self.accelerator.autocast():
                loss = self.task.training_loss(self.model, micro)
            if self.host_checks:  # stop before a bad backward
                self.check_finite(loss.detach().float().reshape(1), self.state.global_step + 1)
            self.accelerator.backward(loss / len(group))
            part = loss.detach().float() / len(group)
            step_loss = part if step_loss is None else step_loss + part
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def after_step(self, group: list[dict[str, Any]], step_loss: Any) -> None:
        """Count the step, then log, evaluate and checkpoint when due; honour stop requests."""
        state, cfg = self.state, self.cfg
        n_samples = sum(next(iter(m.values())).shape[0] for m in group) * self.world
        state.batches_done_in_epoch += len(group)
        state.global_step += 1
        state.samples_seen += n_samples
        self.window.add(step_loss, n_samples)
        log_now = state.global_step % cfg.log_every_steps == 0 or state.global_step == self.plan.steps_total
        epoch_done = state.batches_done_in_epoch == self.batches_in_epoch
        eval_now = epoch_done or bool(cfg.eval_every_steps and state.global_step % cfg.eval_every_steps == 0)
        periodic = bool(cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0)
        if self.host_checks or log_now or eval_now or periodic or self.stop.requested or state.should_stop:
            # The only host sync of a step on an accelerator: losses are read here, at log, evaluation and
            # checkpoint points, so a bad loss never reaches a checkpoint.
            first, losses = self.window.read(state.global_step)
            self.check_finite(losses, first)
            state.train_time_s += time.perf_counter() - self.mark
            # samples/s only here: between sync points an accelerator's queue makes the host's clock run ahead
            self.progress.update(state.global_step, loss=float(losses[-1]), epoch=state.epoch + 1,
                                 samples_seen=state.samples_seen, train_time_s=state.train_time_s)
        else:
            state.train_time_s += time.perf_counter() - self.mark
            self.progress.update(state.global_step, epoch=state.epoch + 1)
        if log_now:
            self.log_training()
        if epoch_done:
            state.epoch += 1
            state.batches_done_in_epoch = 0
        if eval_now:
            self.evaluate_and_select()
        if epoch_done:
            self.write_checkpoint()
        self.agree_on_stopping()
        if not epoch_done and (periodic or self.stop.requested or state.should_stop):
            self.write_checkpoint()
        self.interrupted = self.stop.requested is not None
        self.mark = time.perf_counter()

    def agree_on_stopping(self) -> None:
        """Every process must stop at the same step, or the next collective operation hangs."""
        if self.world == 1:
            return
        import torch

        flags = torch.tensor([[float(self.stop.requested is not None), float(self.state.should_stop)]])
        flags = self.accelerator.gather(flags).max(dim=0).values
        if flags[0] and self.stop.requested is None:
            self.stop.requested = "peer"
        self.state.should_stop = bool(flags[1])

    def check_finite(self, losses: Any, first_step: int) -> None:
        import torch

        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise TrainingError(
                f"loss became {float(losses[int(bad[0])])} at step {first_step + int(bad[0])} (epoch "
                f"{self.state.epoch + 1}). Lower train.learning_rate, set train.mixed_precision = \"no\", or check "
                f"the data for extreme values. The last checkpoint in {self.run_dir.checkpoints_dir} is intact.")

    def log_training(self) -> None:
        logs = self.window.logs(self.state.train_time_s, self.scheduler.get_last_lr()[0])
        logs.update(self.task_logs())
        if self.main:
            self.run_dir.log_metrics({"kind": "train", "step": self.state.global_step, "epoch": self.state.epoch + 1,
                                      **logs})
        self.trackers.log("train", logs, self.state.global_step)
        self.progress.log_line(self.state.global_step, logs, self.state.epoch + 1)
        self.notify("on_log", logs=logs)
        self.window.reset(self.state.train_time_s)

    def task_logs(self) -> dict[str, float]:
        """The task's own training numbers (``Task.training_logs``), averaged over the processes."""
        own = self.task.training_logs()
        if self.world == 1:
            return dict(own)
        from accelerate.utils import gather_object

        every = gather_object([dict(own)])
        keys = sorted({k for d in every for k in d})
        return {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in keys}

    # -- evaluation ----------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        metrics = evaluate(self.task, self.model, self.eval_loader, self.accelerator, "eval")
        self.task.train_mode(self.model)
        return metrics

    def evaluate_before_training(self) -> None:
        """Step 0: the model as loaded (LoRA starts as the identity), for the "before" numbers. Reported,
        never selected as the best checkpoint."""
        metrics = self.evaluate()
        self.selection_value(metrics)  # a metric that will never be there fails now, not after an epoch
        self.state.before_eval = {"step": 0, "epoch": 0, **metrics}
        self.record_evaluation(metrics, epoch=0, note="  [before training]")

    def evaluate_and_select(self) -> None:
        """Evaluate; the best evaluation so far (by ``train.metric``) saves the adapter; early stopping."""
        state, cfg = self.state, self.cfg
        metrics = self.evaluate()
        value = self.selection_value(metrics)
        # after an epoch boundary state.epoch already counts the finished epoch
        epoch = state.epoch if state.batches_done_in_epoch == 0 else state.epoch + 1
        state.last_eval = {"step": state.global_step, "epoch": epoch, **metrics}
        better = state.best_metric is None or (value > state.best_metric if self.mode == "max"
                                               else value < state.best_metric)
        if better:
            state.best_metric, state.best_step = value, state.global_step
            state.best_eval = dict(state.last_eval)
            state.evals_without_improvement = 0
            self.save_best_adapter()
            self.progress.set_best(self.metric, value, state.global_step)
        else:
            state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                state.should_stop = state.stopped_early = True
                self.console.print(f"Early stopping: {self.metric} has not improved for "
                                   f"{state.evals_without_improvement} evaluations.")
        self.record_evaluation(metrics, epoch=epoch, note="  [best]" if better else "")

    def evaluate_test(self) -> dict[str, Any]:
        """The test split, scored once with the selected adapter (read back from the run folder, which every
        process reaches, as for resuming). Logged as ``kind: "test"``; never compared or selected."""
        self.accelerator.wait_for_everyone()  # the main process has written the best adapter
        self.load_best(self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False))
        metrics = evaluate(self.task, self.model, self.evaluation_loader(self.test_ds), self.accelerator, "test")
        step = self.state.best_eval.get("step", self.state.global_step)
        if self.main:
            self.run_dir.log_metrics({"kind": "test", "step": step, **_scalars(metrics)})
        self.trackers.log("test", _scalars(metrics), self.state.global_step)
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in _scalars(metrics).items())
        self.console.print(f"test (adapter of step {step}, scored once): {shown}")
        return {"step": step, **metrics}

    def selection_value(self, metrics: dict[str, Any]) -> float:
        """The value of the metric that selects the best checkpoint; a clear error when it is missing."""
        scalars = _scalars(metrics)
        if self.metric in scalars:
            return scalars[self.metric]
        got = ", ".join(sorted(scalars)) or "nothing"
        if self.cfg.metric:
            raise FinetuneError(f"train.metric: {self.metric!r} is not computed by task {self.task.name!r}; "
                                f"available: {got}.")
        raise self.task.fail("compute_metrics", f"did not return {self.metric!r}, the task's default_metric (it "
                             f"selects the best checkpoint); the evaluation gave: {got}. Check that evaluation_step "
                             "returns 'predictions' and 'references' and compute_metrics returns that metric")

    def record_evaluation(self, metrics: dict[str, Any], epoch: int, note: str) -> None:
        """metrics.jsonl, trackers, the task's artifacts (``after_evaluate``), the console, callbacks."""
        scalars = _scalars(metrics)
        step = self.state.global_step
        if self.main:
            self.run_dir.log_metrics({"kind": "eval", "step": step, "epoch": epoch, **scalars})
        self.trackers.log("eval", scalars, step)
        if self.main:
            self.task.after_evaluate(self.accelerator.unwrap_model(self.model), self.processor, self.run_dir.path,
                                     step, metrics)
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())
        self.console.print(f"eval @ step {step} (epoch {epoch}): {shown}{note}")
        self.notify("on_evaluate", metrics=metrics)

    def save_best_adapter(self) -> None:
        full = self.full_state_dict()  # a collective under FSDP/DeepSpeed: every process takes part
        if self.main:
            unwrapped = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            self.save_adapter(unwrapped) if full is None else self.save_adapter(unwrapped, state_dict=full)

    # -- checkpoints ---------------------------------------------------
    def full_state_dict(self) -> dict[str, Any] | None:
        """Under FSDP/DeepSpeed: every process must call this (it gathers the shards); the main process
        gets the whole state dict, the others None. Otherwise None (nothing to gather)."""
        if not self.sharded:
            return None
        gathered = self.accelerator.get_state_dict(self.model)
        return gathered if self.main else None

    def write_checkpoint(self) -> None:
        full = self.full_state_dict()
        if not self.main:
            return
        import torch
        from safetensors.torch import save_file

        if full is not None:
            weights = {k: v.detach().cpu().contiguous() for k, v in full.items()
                       if k in self.trainable_shapes or k in self.trained_buffers}
        else:
            weights = trainable_state_dict(self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False))
        check_complete(weights, self.trainable_shapes, f"checkpoint at step {self.state.global_step}")

        def writer(tmp: Path) -> None:
            save_file(weights, str(tmp / "trainable.safetensors"))
            if not self.sharded:  # sharded strategies: the optimizer state is not checkpointed
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            save_rng_state(tmp / "rng.pt")
            (tmp / "loop_state.json").write_text(json.dumps(self.state.to_json(), indent=2))

        path = self.run_dir.write_checkpoint(self.state.global_step, writer, keep=self.cfg.keep_checkpoints)
        self.notify("on_checkpoint", path=path)

    # -- callbacks -----------------------------------------------------
    def notify(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            callback.notify(event, run=self.run_dir, state=self.state, **kwargs)


class LogWindow:
    """The steps since the last log line: their losses (read on the host in batches), samples and time."""

    def __init__(self, train_time_s: float) -> None:
        self.reset(train_time_s)

    def reset(self, train_time_s: float) -> None:
        self.start_s, self.samples = train_time_s, 0
        self.pending: list[Any] = []  # loss tensors not yet read on the host
        self.values: list[float] = []  # losses of this window, read

    def add(self, step_loss: Any, samples: int) -> None:
        self.pending.append(step_loss)
        self.samples += samples

    def read(self, global_step: int) -> tuple[int, Any]:
        """The pending losses as one CPU tensor (one host sync), and the step number of the first of them."""
        import torch

        losses = torch.stack(self.pending).cpu()
        self.values.extend(losses.tolist())
        self.pending = []
        return global_step - len(losses) + 1, losses

    def logs(self, train_time_s: float, lr: float) -> dict[str, float]:
        elapsed = train_time_s - self.start_s
        return {"loss": sum(self.values) / len(self.values), "lr": lr,
                "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
