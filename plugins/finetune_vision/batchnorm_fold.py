"""Frozen BatchNorm folded into the convolution before it (``task.fold_batchnorm``).

With LoRA or a linear probe, every BatchNorm stays in eval mode with frozen statistics and
affine parameters, so it is a fixed per-channel affine map ``y = k * x + c`` with
``k = gamma / sqrt(var + eps)`` and ``c = beta - mean * k``. When its input is the output of a
frozen convolution, the pair is one convolution with weight ``k * W`` and bias ``k * b + c``: the
BatchNorm's forward and backward passes (about a fifth of a MobileNetV2 training step on CPU)
disappear. A LoRA'd convolution computes ``base(x) + s * B(A(x))``; folded, the per-channel factor
``s * k`` goes into ``B``'s weight on the fly (an ``out x r`` product, no full-size multiply), so
the trained parameters stay exactly PEFT's and the saved adapter is unchanged.

Nothing is rewritten: the two modules get instance-level forwards that compute the folded
function while the BatchNorm is in eval mode and fall back to their own forwards otherwise
(``model.train()`` without the task's ``train_mode``, full fine-tuning); the BatchNorm skips its
own computation only for the very tensor the folded convolution just returned (so a convolution
replaced later, e.g. by ``merge_and_unload``, gets a plain BatchNorm again). The state dict, the
adapter and ``finetune merge`` see the original modules. Pairs are found by running one batch
through the model with hooks (the BatchNorm's input must be the convolution's output tensor),
and the folded model is checked against the unfolded one on that batch before it is kept.
"""

from __future__ import annotations

import weakref
from typing import Any

#: relative tolerance of the folded-vs-unfolded check (float rounding of a reordered product)
CHECK_RTOL = 1e-3


class FrozenBatchNormTask:
    """What every vision task with a BatchNorm backbone does the same way (a mixin before ``Task``): in
    training, a BatchNorm whose parameters are frozen (the backbone's under LoRA or a linear probe) stays in
    eval mode, so its running statistics -- which an adapter does not save -- never change and a reloaded
    adapter reproduces the trained model; trainable ones (full fine-tuning, a decoder's) train as usual.
    With ``task.fold_batchnorm`` (the task's option) the frozen ones are folded into their convolutions."""

    def train_mode(self, model: Any) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm

        model.train()
        if self.recipe.peft.method == "full":
            return
        for module in model.modules():
            if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()

    def speed_notes(self) -> list[str]:
        if not self._folds_batchnorm():
            return []
        return ["task.fold_batchnorm: each frozen batch normalisation is merged into the convolution before it: "
                "faster; results equal within rounding (set it to false to compute them separately)"]

    def _folds_batchnorm(self) -> bool:
        return self.recipe.task.fold_batchnorm and self.recipe.peft.method != "full"


def _fold_parts(conv: Any, bn: Any) -> tuple[Any, tuple | None] | None:
    """(base convolution, LoRA parts or None) when ``bn`` can be folded into ``conv``: a frozen
    BatchNorm2d (or timm's BatchNormAct2d) after a frozen Conv2d, plain or wrapped by PEFT with one plain
    LoRA adapter. LoRA parts: (lora_A, lora_B, lora dropout, scaling, adapter name). None otherwise."""
    import torch.nn as nn
    from timm.layers import BatchNormAct2d

    if (type(bn) not in (nn.BatchNorm2d, BatchNormAct2d) or bn.running_mean is None or bn.running_var is None
            or any(p.requires_grad for p in bn.parameters(recurse=False))):
        return None
    lora = None
    base = getattr(conv, "base_layer", conv)
    if base is not conv:  # a PEFT LoRA layer: one plain adapter, A and B unbiased convolutions
        active = [a for a in conv.active_adapters if a in conv.lora_A.keys()]
        if (len(active) != 1 or conv.merged or conv.disable_adapters or active[0] in getattr(conv, "lora_variant", {})
                or getattr(conv, "use_dora", {}).get(active[0], False)):
            return None
        a, b = conv.lora_A[active[0]], conv.lora_B[active[0]]
        if type(a) is not nn.Conv2d or type(b) is not nn.Conv2d or b.bias is not None:
            return None
        lora = (a, b, conv.lora_dropout[active[0]], float(conv.scaling[active[0]]), active[0])
    if (type(base) is not nn.Conv2d or base.out_channels != bn.num_features
            or any(p.requires_grad for p in base.parameters(recurse=False))):
        return None
    return base, lora


class _Fold:
    """One (convolution, BatchNorm) pair and the folded weight, bias and LoRA factor it caches."""

    def __init__(self, conv: Any, bn: Any, base: Any, lora: tuple | None) -> None:
        self.conv, self.bn, self.base, self.lora = conv, bn, base, lora
        self._out: Any = None  # weak reference to the last folded output
        self._key: tuple | None = None
        self._cache: tuple[Any, Any, Any] | None = None

    def active(self) -> bool:
        return not self.bn.training

    def _lora_as_folded(self) -> bool:
        """The LoRA layer is still in the state it was folded in (not merged, disabled or switched)."""
        conv = self.conv
        return (self.lora is None or (not conv.merged and not conv.disable_adapters
                                      and list(conv.active_adapters) == [self.lora[4]]))

    def folded(self) -> tuple[Any, Any, Any]:
        """(k * W, k * b + c, k) for the current weights, device and dtype (recomputed when they change)."""
        import torch

        base, bn = self.base, self.bn
        tensors = [base.weight, base.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) if t is not None else None for t in tensors)
        if key != self._key:
            with torch.no_grad():
                dtype = torch.promote_types(base.weight.dtype, torch.float32)  # fp32 at least, fp64 kept
                var, mean = bn.running_var.to(dtype), bn.running_mean.to(dtype)
                k = torch.rsqrt(var + bn.eps)
                if bn.weight is not None:
                    k = k * bn.weight.to(dtype)
                shift = -mean * k + (bn.bias.to(dtype) if bn.bias is not None else 0.0)
                if base.bias is not None:
                    shift = shift + base.bias.to(dtype) * k
                weight = (base.weight.to(dtype) * k.view(-1, 1, 1, 1)).to(base.weight.dtype)
                self._cache = (weight, shift.to(base.weight.dtype), k)
            self._key = key
        return self._cache

    def conv_forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active() or args or kwargs or not self._lora_as_folded():
            self._out = None  # its BatchNorm computes as usual
            return type(self.conv).forward(self.conv, x, *args, **kwargs)
        weight, bias, k = self.folded()
        out = self.base._conv_forward(x, weight, bias)
        if self.lora is not None:  # PEFT's LoRA forward, with s * k folded into B
            lora_a, lora_b, dropout, scaling, _ = self.lora
            h = lora_a(dropout(self.conv._cast_input_dtype(x, lora_a.weight.dtype)))
            b_weight = lora_b.weight * (k * scaling).to(lora_b.weight.dtype).view(-1, 1, 1, 1)
            out = (out + lora_b._conv_forward(h, b_weight, None)).to(out.dtype)
        self._out = weakref.ref(out)
        return out

    def bn_forward(self, x: Any) -> Any:
        bn = self.bn
        if not self.active():
            # a training BatchNorm updates its statistics inside the kernel, which does not bump their
            # version counters: forget the folded weights
            self._key = None
            return type(bn).forward(bn, x)
        if self._out is None or self._out() is not x:
            # not the folded convolution's output (it ran unfolded, or was replaced by a merge): plain BN
            return type(bn).forward(bn, x)
        if hasattr(bn, "act"):  # timm's BatchNormAct2d: BatchNorm, then dropout and activation
            return bn.act(bn.drop(x))
        return x

    def install(self) -> None:
        self.conv.forward = self.conv_forward
        self.bn.forward = self.bn_forward

    def remove(self) -> None:
        for module in (self.conv, self.bn):
            module.__dict__.pop("forward", None)


def find_pairs(model: Any, run: Any) -> list[tuple[Any, Any]]:
    """(convolution, BatchNorm) pairs where the BatchNorm's input is the convolution's output, from one
    forward pass ``run()`` with hooks. A PEFT LoRA convolution counts as one convolution."""
    import torch.nn as nn

    outputs: dict[int, tuple[Any, Any]] = {}  # id(output) -> (output, conv); the output kept alive
    pairs: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    hooks = []

    def after_conv(module: Any, args: Any, out: Any) -> None:
        outputs[id(out)] = (out, module)

    def before_bn(module: Any, args: Any) -> None:
        hit = outputs.get(id(args[0])) if args else None
        if hit is not None and hit[0] is args[0] and id(module) not in seen:
            seen.add(id(module))
            pairs.append((hit[1], module))

    lora_bases = {id(m.base_layer) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for module in model.modules():
        if (type(module) is nn.Conv2d and id(module) not in lora_bases) or (
                hasattr(module, "lora_A") and type(getattr(module, "base_layer", None)) is nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_pre_hook(before_bn))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def fold_batchnorm(model: Any, run: Any) -> tuple[int, int]:
    """Fold every frozen BatchNorm of ``model`` into the frozen convolution that feeds it (see the module
    docstring); ``run()`` makes one forward pass and returns its output (a tensor). Returns (pairs folded,
    pairs found). None is folded when the folded model's output on that pass differs from the unfolded
    one beyond float rounding (e.g. a convolution output that is also used elsewhere)."""
    import torch

    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            pairs = find_pairs(model, run)
            folds = [_Fold(c, b, *parts) for c, b in pairs if (parts := _fold_parts(c, b)) is not None]
            if not folds:
                return 0, 0
            reference = run()
            for fold in folds:
                fold.install()
            folded = run()
            scale = reference.abs().max().clamp_min(1e-6)
            if not torch.isfinite(folded).all() or float((folded - reference).abs().max() / scale) > CHECK_RTOL:
                for fold in folds:
                    fold.remove()
                return 0, len(folds)
    finally:
        for module, mode in training.items():
            module.training = mode
    return len(folds), len(folds)
