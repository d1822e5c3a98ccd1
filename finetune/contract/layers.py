"""Finding the layers of a transformers model: the stack of transformer blocks, a recipe's
``peft.layers``, and the attention projections LoRA adapts by default."""

from __future__ import annotations

from typing import Any

from finetune.errors import RecipeError

_LAYER_LISTS = ("layer", "layers", "h", "block", "blocks")  # PEFT's layers_pattern names


def transformer_layers(model: Any) -> tuple[str, str, Any]:
    """``(qualified name, attribute name, ModuleList)`` of the model's stack of transformer layers
    (the longest ModuleList named like PEFT's layer patterns, e.g. ``bert.encoder.layer``)."""
    import torch

    found = [(name, name.rsplit(".", 1)[-1], module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS and len(module)]
    if not found:
        raise RecipeError("peft.layers: this model has no recognisable stack of transformer layers (a ModuleList "
                          f"named one of {', '.join(_LAYER_LISTS)}); remove peft.layers.")
    return max(found, key=lambda f: len(f[2]))


def resolve_layers(model: Any, layers: list[int]) -> tuple[str, list[int]]:
    """``peft.layers`` (negative = from the top) -> (layers_pattern, sorted 0-based indices)."""
    _, pattern, stack = transformer_layers(model)
    n = len(stack)
    bad = [i for i in layers if not -n <= i < n]
    if bad or not layers:
        raise RecipeError(f"peft.layers: {bad or layers} out of range: this model has {n} layers (0..{n - 1}, "
                          f"or -{n}..-1 from the top).")
    return pattern, sorted({i % n for i in layers})


#: Attention projection names by architecture family, tried in order (the first family whose names all
#: occur wins): BERT/RoBERTa/ViT, Llama/Whisper/BART, DistilBERT, DeBERTa, T5, Falcon/BLOOM, GPT-2, MPT.
ATTENTION_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("query_proj", "value_proj"), ("q", "v"),
    ("query_key_value",), ("c_attn",), ("Wqkv",))


#: Module class names that count as linear layers: torch's, GPT-2's Conv1D, bitsandbytes' quantized ones
#: (model.quantize).
LINEAR_TYPES = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")


def attention_projections(model: Any, families: tuple[tuple[str, ...], ...] = ATTENTION_PROJECTIONS) -> list[str]:
    """The attention query/value projection names of ``model`` for ``Task.lora_targets`` (LoRA's usual
    default placement): the first of ``families`` whose names all name linear layers of the model (e.g.
    ``["query", "value"]`` for BERT, ``["q_proj", "v_proj"]`` for Llama). A model with none of them is a
    :class:`RecipeError` on ``peft.target_modules`` that lists the model's linear layers to choose from."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if type(module).__name__ in LINEAR_TYPES}
    for names in families:
        if all(n in leaves for n in names):
            return list(names)
    raise RecipeError("peft.target_modules: this model has none of the usual attention projections ("
                      + ", ".join("/".join(f) for f in families) + "); set peft.target_modules to some of its "
                      f"linear layers: {', '.join(sorted(leaves))}.")
