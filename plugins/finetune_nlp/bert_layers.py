"""Faster BERT-style encoder layers for sequence classification.

Two changes, each made on the module instances (an instance-level ``forward``): nothing is
rewritten, so the state dict, the adapter and what is pushed stay as they were, and PEFT's
LoRA layers inside run as they are (projections are looked up on every call, so a merged
or unloaded adapter works too).

**The last layer computes the first token only** (:func:`shorten_last_layer`,
``task.last_layer_cls_only``). A BERT-style sequence classifier reads the last layer's
output at one position: BertPooler, and the RoBERTa, XLM-R and ELECTRA classification
heads, take ``hidden_states[:, 0]`` (the [CLS] / <s> token). Only that layer's attention
keys and values need every token; its query, attention output projection, feed-forward
block and layer norms are needed for the first token only. On all-MiniLM-L6-v2 that is
about 83% of the last layer's work, 14% of a training step's FLOPs. The outputs and
gradients are the same up to float rounding. Whether the head really reads the first token
only is not assumed: the model's logits on a padded probe batch are computed with the full
and with the shortened layer, and they must agree (:data:`CHECK_RTOL`), or the layer is
left as it was.

**Attention that applies the layer's own dropout module** (:func:`explicit_attention`).
PyTorch's scaled-dot-product attention applies its own fused dropout (Mersenne Twister, one
number per attention weight; its CPU math path adds a "safe softmax" and two scaling passes)
and cannot call a dropout module. When the attention's dropout module has been replaced
(``train.fast_dropout`` replaces every ``nn.Dropout`` with one that draws numpy masks on CPU),
these layers compute ``softmax(q k^T * scale + mask)`` while training, apply that module, and
multiply by ``v``: the same function with the replaced module's random numbers. In evaluation,
without dropout, or with PyTorch's own ``nn.Dropout`` they call PyTorch's attention as before.

Both apply to layers laid out like transformers' ``BertLayer`` (``attention.self`` with
``query``/``key``/``value``, ``attention.output``, ``feed_forward_chunk``): BERT, RoBERTa,
XLM-R, ELECTRA, MiniLM and their copies, with absolute positions, no cross-attention, and
the ``sdpa`` or ``eager`` attention implementation.
"""

from __future__ import annotations

import types
from typing import Any

#: relative tolerance of the shortened-vs-full check (float32 rounding of smaller matmuls)
CHECK_RTOL = 1e-4

_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _self_attention(layer: Any, model: Any) -> Any | None:
    """``layer.attention.self`` when ``layer`` has the BERT layout handled here, else None."""
    import torch

    attention = getattr(layer, "attention", None)
    sa = getattr(attention, "self", None)
    config = getattr(sa, "config", None) or getattr(model, "config", None)
    if (sa is None or not all(isinstance(getattr(sa, n, None), torch.nn.Module) for n in ("query", "key", "value"))
            or not isinstance(getattr(sa, "attention_head_size", None), int)
            or not isinstance(getattr(sa, "scaling", None), float)
            or not isinstance(getattr(sa, "dropout", None), torch.nn.Dropout)
            or not isinstance(getattr(attention, "output", None), torch.nn.Module)
            or not callable(getattr(layer, "feed_forward_chunk", None))):
        return None
    if (config is None or getattr(config, "is_decoder", False) or getattr(layer, "add_cross_attention", False)
            or getattr(sa, "is_causal", False)
            or getattr(sa, "position_embedding_type", "absolute") != "absolute"
            or getattr(config, "_attn_implementation", None) not in _ATTENTION_IMPLEMENTATIONS):
        return None
    return sa


def _layers(model: Any) -> list[Any]:
    from finetune import RecipeError, transformer_layers

    try:
        return list(transformer_layers(model)[2])
    except RecipeError:
        return []


def last_layer(model: Any) -> Any | None:
    """The last layer of ``model``'s transformer stack when it has the BERT layout, else None."""
    layers = _layers(model)
    return layers[-1] if layers and _self_attention(layers[-1], model) is not None else None


def _unusual(attention_mask: Any, width: int, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Arguments the fast paths do not handle (cross-attention, a KV cache, attention weights out,
    a mask that is not 4-D key-padding): the original forward runs."""
    encoder_states = args[0] if args else kwargs.get("encoder_hidden_states")
    return (encoder_states is not None or kwargs.get("cache") is not None
            or kwargs.get("past_key_values") is not None or bool(kwargs.get("output_attentions"))
            or (attention_mask is not None and (attention_mask.dim() != 4
                                                or attention_mask.shape[-2] not in (1, width))))


def _explicit_path(sa: Any) -> bool:
    """Whether attention is computed explicitly now: training with dropout, and the layer's dropout module
    is not PyTorch's own (SDPA's fused dropout could not apply it)."""
    import torch

    return sa.training and sa.dropout.p > 0 and type(sa.dropout) is not torch.nn.Dropout


def _attention(sa: Any, query: Any, key: Any, value: Any, mask: Any) -> Any:
    """softmax(query key^T * scale + mask), dropped out when training, times value ([batch, heads, tokens, size])."""
    import torch
    import torch.nn.functional as F

    p = sa.dropout.p if sa.training else 0.0
    if not _explicit_path(sa):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p, scale=sa.scaling)
    scores = torch.matmul(query, key.transpose(-1, -2))
    if mask is None:
        scores = scores * sa.scaling
    else:
        if mask.dtype == torch.bool:  # True = attend (transformers' sdpa masks)
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
                ~mask, torch.finfo(scores.dtype).min)
        scores = torch.add(mask.to(scores.dtype), scores, alpha=sa.scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(sa.dropout(probs), value)


def _heads(x: Any, batch: int, width: int, size: int) -> Any:
    return x.view(batch, width, -1, size).transpose(1, 2)


def _self_attention_forward(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any,
                            **kwargs: Any) -> Any:
    """``BertSelfAttention.forward`` through :func:`_attention` when its dropout module must be applied."""
    batch, width = hidden_states.shape[:2]
    if not _explicit_path(self) or _unusual(attention_mask, width, args, kwargs):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    size = self.attention_head_size
    context = _attention(self, _heads(self.query(hidden_states), batch, width, size),
                         _heads(self.key(hidden_states), batch, width, size),
                         _heads(self.value(hidden_states), batch, width, size), attention_mask)
    return context.transpose(1, 2).reshape(batch, width, -1), None


def _first_token_forward(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``BertLayer.forward`` for the first token only: keys and values from every token."""
    batch, width = hidden_states.shape[:2]
    if width <= 1 or _unusual(attention_mask, width, args, kwargs):
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    sa = self.attention.self
    size = sa.attention_head_size
    first = hidden_states[:, :1]
    if attention_mask is not None and attention_mask.shape[-2] != 1:
        attention_mask = attention_mask[:, :, :1]  # the first query's row (bool or additive mask)
    context = _attention(sa, _heads(sa.query(first), batch, 1, size), _heads(sa.key(hidden_states), batch, width, size),
                         _heads(sa.value(hidden_states), batch, width, size), attention_mask)
    context = context.transpose(1, 2).reshape(batch, 1, -1)
    return self.feed_forward_chunk(self.attention.output(context, first))


def shorten_last_layer(model: Any, run: Any) -> tuple[bool, str]:
    """Give ``model``'s last layer the first-token-only forward when it has the BERT layout and
    ``run()`` (one forward pass returning logits) gives the same logits with it. Returns
    (shortened, why not)."""
    import torch

    layer = last_layer(model)
    if layer is None:
        return False, "the last layer is not laid out like BERT's"
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            reference = run().float()
            layer.forward = types.MethodType(_first_token_forward, layer)
            try:
                shortened = run().float()
            except Exception as exc:  # noqa: BLE001 -- any failure means: keep the full layer
                del layer.forward
                return False, f"the shortened layer failed on a probe batch ({type(exc).__name__}: {exc})"
            scale = reference.abs().max().clamp_min(1e-6)
            if (shortened.shape != reference.shape or not torch.isfinite(shortened).all()
                    or float((shortened - reference).abs().max() / scale) > CHECK_RTOL):
                del layer.forward
                return False, "the head reads more than the first token of the last layer"
    finally:
        for module, mode in training.items():
            module.training = mode
    return True, ""


def is_shortened(model: Any) -> bool:
    layer = last_layer(model)
    forward = layer.__dict__.get("forward") if layer is not None else None
    return getattr(forward, "__func__", None) is _first_token_forward


def explicit_attention(model: Any) -> int:
    """Let every BERT-style layer of ``model`` with attention dropout apply its own dropout module while
    training, when that module is not PyTorch's (see the module's docstring); returns how many layers."""
    count = 0
    for layer in _layers(model):
        sa = _self_attention(layer, model)
        if sa is None or sa.dropout.p == 0:
            continue
        sa.forward = types.MethodType(_self_attention_forward, sa)
        count += 1
    return count
