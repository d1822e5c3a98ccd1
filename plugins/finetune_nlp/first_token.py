"""The last encoder layer computed for the first token only (``task.last_layer_cls_only``).

A BERT-style sequence classifier reads the last layer's output at one position: BertPooler,
and the RoBERTa, XLM-R and ELECTRA classification heads, take ``hidden_states[:, 0]`` (the
[CLS] / <s> token). Everything else the last layer computes is thrown away. Only that layer's
attention keys and values need every token; its query, attention output projection,
feed-forward block and layer norms are needed for the first token only. On all-MiniLM-L6-v2
that is about 83% of the last layer's work, or a seventh of the encoder's, in the forward
and the backward pass.

:func:`shorten_last_layer` gives the last layer an instance-level ``forward`` that computes
just that: the same outputs and gradients, up to float rounding. Nothing is rewritten: the
state dict, the adapter and what is pushed are unchanged, and PEFT's LoRA layers inside run
as they are (the projections are looked up on every call, so a merged or unloaded adapter
works too). Dropout in that layer draws masks for the first token only, so a run's dropout
masks differ from a run without this (which is why it is listed as a speed setting).

It applies to layers laid out like transformers' ``BertLayer`` (``attention.self`` with
``query``/``key``/``value``, ``attention.output``, ``feed_forward_chunk``): BERT, RoBERTa,
XLM-R, ELECTRA, MiniLM and their copies, with absolute positions, no cross-attention, and the
``sdpa`` or ``eager`` attention implementation. Whether the head really reads the first token
only is not assumed: the model's logits on a padded probe batch are computed with the full
and with the shortened layer, and they must agree (:data:`CHECK_RTOL`), or the layer is left
as it was.
"""

from __future__ import annotations

import types
from typing import Any

#: relative tolerance of the shortened-vs-full check (float32 rounding of smaller matmuls)
CHECK_RTOL = 1e-4

_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def last_layer(model: Any) -> Any | None:
    """The last layer of ``model``'s transformer stack when it has the BERT layout this module
    can shorten, else None."""
    import torch

    from finetune import RecipeError, transformer_layers

    try:
        _, _, stack = transformer_layers(model)
    except RecipeError:
        return None
    layer = stack[-1]
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
    return layer


def _first_token_forward(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``BertLayer.forward`` for the first token only: keys and values from every token."""
    import torch.nn.functional as F

    encoder_states = args[0] if args else kwargs.get("encoder_hidden_states")
    unusual = (encoder_states is not None or kwargs.get("cache") is not None
               or kwargs.get("past_key_values") is not None or kwargs.get("output_attentions"))
    batch, width = hidden_states.shape[:2]
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[-2] in (1, width))
    if unusual or not mask_ok or width <= 1:
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    sa = self.attention.self
    size = sa.attention_head_size
    first = hidden_states[:, :1]
    query = sa.query(first).view(batch, 1, -1, size).transpose(1, 2)
    key = sa.key(hidden_states).view(batch, width, -1, size).transpose(1, 2)
    value = sa.value(hidden_states).view(batch, width, -1, size).transpose(1, 2)
    if attention_mask is not None and attention_mask.shape[-2] != 1:
        attention_mask = attention_mask[:, :, :1]  # the first query's row (bool or additive mask)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=sa.dropout.p if sa.training else 0.0, scale=sa.scaling)
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
