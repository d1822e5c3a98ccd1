"""One evaluation pass: the task's ``evaluation_step`` on every eval batch, outputs gathered across
batches and processes, then ``compute_metrics`` and ``finalize_eval``.

Outputs may be ragged. ``predictions`` / ``references`` come per batch either as a tensor whose first
dimension is the batch, or as a list with one item per example:

* **tensors** may differ in their other dimensions from batch to batch and process to process (per
  token, per word, generated ids...): they are padded to the widest with ``Task.eval_pad_value``
  (default -100) and concatenated, so ``compute_metrics`` receives one numpy array ``[examples, ...]``;
* **lists** (any picklable item per example: a list of spans, a string, an array of its own length)
  are concatenated, so ``compute_metrics`` receives one list ``[examples]``.

Predictions and references travel together (the same order, whatever it is: eval batches may be
sorted by length). Multi-process evaluation pads across processes before gathering and drops the
examples Accelerate repeats to even out the last batch, so every example counts once.
"""

from __future__ import annotations

from typing import Any

from finetune.engine.guard import GuardedTask
from finetune.engine.memory import release_freed_memory


class GatheredOutputs:
    """One output key (``predictions`` or ``references``) of every eval batch, on the main process."""

    def __init__(self, key: str, task: GuardedTask, pad_value: float) -> None:
        self.key, self.task, self.pad_value = key, task, pad_value
        self.arrays: list[Any] = []  # numpy arrays [batch, ...], widths may differ
        self.items: list[Any] = []  # per-example objects

    def add(self, value: Any, accelerator: Any) -> None:
        if isinstance(value, (list, tuple)):
            if self.arrays:
                raise self._mixed()
            self.items.extend(accelerator.gather_for_metrics(list(value), use_gather_object=True))
            return
        if self.items:
            raise self._mixed()
        value = value.detach()
        for dim in range(1, value.dim()):  # equal widths on every process before the gather
            value = accelerator.pad_across_processes(value, dim=dim, pad_index=self.pad_value)
        self.arrays.append(accelerator.gather_for_metrics(value).cpu().numpy())

    def result(self) -> Any:
        if self.items or not self.arrays:
            return self.items
        import numpy as np

        first = self.arrays[0]
        if any(a.ndim != first.ndim for a in self.arrays):
            dims = sorted({a.ndim for a in self.arrays})
            raise self.task.fail("evaluation_step", f"returned {self.key!r} with {dims} dimensions in different "
                                                    "batches; every batch must have the same number")
        widths = np.max([a.shape[1:] for a in self.arrays], axis=0) if first.ndim > 1 else ()
        out = np.full((sum(len(a) for a in self.arrays), *widths), self.pad_value,
                      dtype=np.result_type(*[a.dtype for a in self.arrays]))
        row = 0
        for a in self.arrays:
            out[(slice(row, row + len(a)), *(slice(0, w) for w in a.shape[1:]))] = a
            row += len(a)
        return out

    def _mixed(self) -> Exception:
        return self.task.fail("evaluation_step", f"returned {self.key!r} as a tensor in some batches and a list in "
                                                 "others; choose one")


def evaluation_loader(task: GuardedTask, dataset: Any, collate: Any, accelerator: Any, *, batch_size: int,
                      num_workers: int = 0, longest_first: bool = True) -> Any:
    """The prepared loader of an evaluation: examples longest first when the task reports lengths (batches
    of similar length waste little on padding; metrics do not depend on the order, since predictions and
    references travel together)."""
    from torch.utils.data import DataLoader, Subset

    lengths = task.example_lengths(dataset) if longest_first else None
    source = dataset if lengths is None else Subset(dataset, sorted(range(len(dataset)), key=lambda i: -lengths[i]))
    return accelerator.prepare(DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                          num_workers=num_workers))


def evaluate(task: GuardedTask, model: Any, loader: Any, accelerator: Any, split: str = "eval") -> dict[str, Any]:
    """Metrics of one pass over ``loader``: ``eval_loss`` (mean over examples) and what the task computes.
    ``split`` (``"eval"``, ``"test"``, ``"input"``) is put in ``task.evaluating`` first (``Task.evaluating``).

    The random number generators are as they were afterwards (creating the loader's iterator draws from
    torch's, and so may a task): evaluating, or how often, never changes what training does."""
    if split not in ("eval", "test", "input"):
        raise ValueError(f"split {split!r}: one of 'eval', 'test', 'input'")
    task.evaluating = split
    with unchanged_random_state():
        return _evaluate(task, model, loader, accelerator)


class unchanged_random_state:  # noqa: N801 - used like contextlib's lower-case context managers
    """Python's, numpy's and torch's (CPU and CUDA) random states are restored on exit."""

    def __enter__(self) -> None:
        import random

        import numpy as np
        import torch

        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                      torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def __exit__(self, *exc: object) -> None:
        import random

        import numpy as np
        import torch

        python, numpy_state, cpu, cuda = self.saved
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _evaluate(task: GuardedTask, model: Any, loader: Any, accelerator: Any) -> dict[str, Any]:
    import torch

    model.eval()
    release_freed_memory()  # training's freed activation buffers: evaluation's batches start from a trim heap
    pad = getattr(task, "eval_pad_value", -100)
    losses: list[Any] = []
    outputs = {key: GatheredOutputs(key, task, pad) for key in ("predictions", "references")}
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                out = task.evaluation_step(model, batch)
            n = next(iter(batch.values())).shape[0]
            if out.get("loss") is not None:
                losses.append(accelerator.gather_for_metrics(out["loss"].detach().float().reshape(1).repeat(n)))
            if out.get("predictions") is not None:
                for key, gathered in outputs.items():
                    gathered.add(out[key], accelerator)
    release_freed_memory()
    result: dict[str, Any] = {}
    if losses:
        result["eval_loss"] = float(torch.cat(losses).mean())
    if outputs["predictions"].arrays or outputs["predictions"].items:
        result.update(task.compute_metrics(outputs["predictions"].result(), outputs["references"].result()))
    return task.finalize_eval(result)
