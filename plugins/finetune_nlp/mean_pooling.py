"""``task.pooling = "mean"``: the classifier reads the mean of the last layer's token vectors instead of
the first token's.

Sentence-transformers encoders such as all-MiniLM-L6-v2 were trained so that the *mean* over tokens is
the sentence's embedding; their [CLS] vector (and BERT's pooler on top of it) was never trained to be
one. With thousands of examples LoRA learns to fill [CLS] anyway; with a handful per class it cannot,
and a classifier on the mean starts from the embedding the backbone was made for (as SetFit does).

How: a forward hook on the last transformer layer replaces its output at position 0 by the mean of
that output over the real tokens (the batch's ``attention_mask``, kept by a pre-hook on the encoder model).
Every head that reads position 0 (BERT's pooler, the RoBERTa/XLM-R/ELECTRA heads, DistilBERT's
pre-classifier) then reads the mean. Nothing in the state dict changes; the hooks are added again
whenever the task loads the model (training, ``load_run``, ``finetune predict``). A model pushed to
the Hub and loaded with plain transformers does not have them (it would read [CLS]), so the model card's
usage snippet adds them in plain torch (``PLAIN_SNIPPET``).
"""

from __future__ import annotations

from typing import Any


def add_mean_pooling(model: Any) -> None:
    """Make ``model``'s head read the masked mean of the last layer's output (see the module docstring)."""
    from finetune import transformer_layers

    _, _, layers = transformer_layers(model)
    state: dict[str, Any] = {"mask": None}

    def keep_mask(module: Any, args: tuple, kwargs: dict) -> None:
        state["mask"] = kwargs.get("attention_mask")

    def mean_into_first(module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        mask = state["mask"]
        if mask is None or mask.shape != hidden.shape[:2]:
            mean = hidden.mean(dim=1)
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        hidden = hidden.clone()
        hidden[:, 0] = mean
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # on the encoder model (``model.bert`` ...): the classification model calls it with attention_mask=...,
    # while PEFT calls the classification model's forward directly, past its hooks
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), model)
    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    layers[-1].register_forward_hook(mean_into_first)


#: What the model card's usage snippet adds after ``base = ...from_pretrained(...)`` for a run trained with
#: ``task.pooling = "mean"``: the same two hooks, written with plain torch, so the adapter loaded with plain
#: transformers + peft predicts what ``finetune predict`` does (tested by running the snippet).
PLAIN_SNIPPET = '''\
# Trained with task.pooling = "mean": the head reads the mean of the last layer over the real tokens,
# not the first token. These two hooks make plain transformers do the same:
import torch
inner, seen = getattr(base, base.base_model_prefix), {}
inner.register_forward_pre_hook(lambda m, a, kw: seen.update(mask=kw.get('attention_mask')), with_kwargs=True)
def mean_into_first(module, args, out):
    h = out[0] if isinstance(out, tuple) else out
    w = (seen['mask'] if seen['mask'] is not None else torch.ones(h.shape[:2])).to(h.dtype).unsqueeze(-1)
    h = h.clone()
    h[:, 0] = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
    return (h, *out[1:]) if isinstance(out, tuple) else h
layers = max((m for m in inner.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
layers[-1].register_forward_hook(mean_into_first)
'''
