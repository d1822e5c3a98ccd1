"""Resumable checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG states and the
loop's position, written into a temporary folder and renamed (``RunDir.write_checkpoint``).

Not ``accelerator.save_state``: it writes the whole frozen backbone each time, is not atomic and
reloads with ``weights_only=False``. Everything here loads with safetensors or
``torch.load(weights_only=True)``. ``loop_state.json`` is written last and marks a complete checkpoint.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from finetune.contract.callbacks import LoopState
from finetune.errors import RunError


def trained_buffer_names(model: Any) -> list[str]:
    """The persistent buffers of every module that owns a trainable parameter: the state training changes
    besides its parameters, such as a BatchNorm's running statistics when it trains (``model.train()``,
    full fine-tuning, BatchNorm layers in ``peft.modules_to_save``). Saved in checkpoints with the trainable
    parameters, so that a resumed run continues from the same statistics."""
    names = []
    for prefix, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        skip = getattr(module, "_non_persistent_buffers_set", set())
        names += [f"{prefix}.{n}" if prefix else n for n, b in module.named_buffers(recurse=False)
                  if b is not None and n not in skip]
    return names


def trainable_state_dict(model: Any) -> dict[str, Any]:
    """Trainable parameters and the trained modules' persistent buffers (:func:`trained_buffer_names`)."""
    out = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    out.update({name: buffers[name].detach().cpu().contiguous() for name in trained_buffer_names(model)})
    return out


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
    known = {**params, **dict(model.named_buffers())}
    unknown = [k for k in weights if k not in known]
    if unknown:
        raise RunError(f"checkpoint {ckpt / 'trainable.safetensors'} does not match the model (it holds "
                       f"{unknown[:3]}..., which the model has not); delete {ckpt} or pass --overwrite.")
    # A model whose shapes changed since the checkpoint (e.g. the data gained a class, so the head has
    # another size) must fail with a message, not a tensor-size RuntimeError mid-copy.
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(known[k].shape)}" for k, v in weights.items()
             if k in known and tuple(v.shape) != tuple(known[k].shape)]
    if wrong:
        raise RunError(f"checkpoint {ckpt / 'trainable.safetensors'} does not fit the model ({'; '.join(wrong[:3])})"
                       ": the model changed since the checkpoint was written (for a classifier: the number of "
                       "classes in the data). Restore the data to resume, or pass --overwrite to start over.")
    with torch.no_grad():
        for name, tensor in weights.items():
            known[name].copy_(tensor)
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
