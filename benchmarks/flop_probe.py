"""Count the training FLOPs a process actually executed, the same way for `finetune run` and a Trainer script.

``install()`` makes every call of a PEFT model in training mode with gradients on record the shapes
and dtypes of its tensor arguments and its plain ones such as ``use_cache=False`` (a dict update
per step: no measurable cost). ``count()``, after
training, replays one forward + backward per distinct batch shape on the same model object under
``torch.utils.flop_counter.FlopCounterMode`` and multiplies by how often that shape was trained.
Padding is included (it is computed), FLOPs of the optimizer step are not (tiny for LoRA).
``count()`` also reports the process's peak resident memory up to that point (before the replay) and
how long the replay took (``replay_s``: subtract it from the process's wall time).

    python benchmarks/flop_probe.py OUT.json -m finetune.cli run recipe.toml ...   # wraps a module's main
    import flop_probe; flop_probe.install(); ...train...; flop_probe.write(OUT.json)
"""

from __future__ import annotations

import json
import runpy
import sys
from collections import Counter
from typing import Any

_SHAPES: Counter = Counter()
_MODEL: list[Any] = []
_UNCOUNTABLE: list[bool] = []  # a training call whose arguments cannot be replayed: FLOPs unknown


def _spec(value: Any) -> tuple:
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    raise TypeError(f"flop_probe: cannot replay an argument of type {type(value).__name__}")


def install() -> None:
    import torch
    from peft import PeftModel
    from torch import nn

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            try:
                key = (tuple(_spec(a) for a in args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))
            except TypeError:  # e.g. a detector's lists of images and target dicts: not replayable, not counted
                _UNCOUNTABLE.append(True)
            else:
                _SHAPES[key] += 1
                if not _MODEL:
                    _MODEL.append(self)
        return nn.Module.__call__(self, *args, **kwargs)

    PeftModel.__call__ = call


def _replay(name: str, spec: tuple, device: Any) -> Any:
    import torch

    if spec[0] == "value":
        return spec[1]
    shape, dt = spec[1], getattr(torch, spec[2])
    if dt.is_floating_point:
        return torch.zeros(shape, dtype=dt, device=device)
    fill = torch.ones if name.endswith("attention_mask") else torch.zeros
    return fill(shape, dtype=dt, device=device)


def count() -> dict[str, Any]:
    """Training FLOPs (forward + backward) over all recorded steps, and how many steps were recorded."""
    import resource
    import time

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # the process's own peak memory so far: the replay below must not count as training memory
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    if not _MODEL or _UNCOUNTABLE:
        return {"flops": None, "steps": sum(_SHAPES.values()), "shapes": len(_SHAPES), "peak_rss_mib": peak_rss_mib,
                "replay_s": 0.0}
    start = time.perf_counter()
    model = _MODEL[0]
    model.train()
    device = next(model.parameters()).device
    total = 0.0
    for (args, kwargs), n in _SHAPES.items():
        pos = [_replay("", spec, device) for spec in args]
        kw = {name: _replay(name, spec, device) for name, spec in kwargs}
        with FlopCounterMode(display=False) as counter:
            out = torch.nn.Module.__call__(model, *pos, **kw)
            loss = getattr(out, "loss", None)
            if loss is None:
                loss = (out.logits if hasattr(out, "logits") else out).float().sum()
            loss.backward()
        model.zero_grad(set_to_none=True)
        total += counter.get_total_flops() * n
    return {"flops": total, "steps": sum(_SHAPES.values()), "shapes": len(_SHAPES), "peak_rss_mib": peak_rss_mib,
            "replay_s": time.perf_counter() - start}


def write(path: str) -> None:
    with open(path, "w") as fh:
        json.dump(count(), fh)


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    install()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    write(out)


if __name__ == "__main__":
    main()
