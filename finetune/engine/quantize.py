"""``model.quantize``: the frozen base loaded in 4-bit (NF4/FP4, double quantization) or 8-bit through
bitsandbytes (QLoRA), checked before the model loads; merge and export use the full-precision base.

Where it runs: a CUDA GPU with bitsandbytes. bitsandbytes' CPU backend (>= 0.48) trains a 4-bit base too, but
measured on this project's CPU it saved no memory (peak RSS) and took about 1.8 times as long per step as the
full-precision base (docs/adapters.md), so a CPU run is refused (``CPU_4BIT_USEFUL``); 8-bit on a CPU likewise.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from finetune.errors import RecipeError

#: bitsandbytes releases from here on have a CPU backend for 4-bit weights (measured: 0.50.2).
CPU_4BIT_SINCE = (0, 48)
#: Whether a 4-bit base may train on a CPU. It works (with :func:`keep_training_layout`), but it did not pay:
#: SmolLM2-135M and a 0.46B Llama, NF4 vs fp32, had no lower peak RSS and ~1.8x slower steps (docs/adapters.md).
#: The tests turn it on to run the real path where bitsandbytes is installed.
CPU_4BIT_USEFUL = False
INSTALL = "pip install 'finetune[qlora]' (bitsandbytes)"
WITHOUT = "or set model.quantize = \"none\" (the default) to train on the full-precision base"


def quantized(recipe: Any) -> bool:
    return getattr(recipe.model, "quantize", "none") != "none"


def _bnb_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_quantization(recipe: Any, task: Any, cuda: bool | None = None, bnb: Any = "find") -> None:
    """``model.quantize`` and its options against the task, ``[peft]``, the machine and bitsandbytes, before
    the model loads (so before a run folder exists). ``cuda`` / ``bnb`` (a version tuple or None) stand in for
    the machine in tests."""
    model = recipe.model
    if model.quantize != "4bit":
        for key, default in (("quant_type", "nf4"), ("double_quant", True)):
            if getattr(model, key) != default:
                raise RecipeError(f"model.{key} is an option of model.quantize = \"4bit\"; this recipe's "
                                  f"model.quantize is \"{model.quantize}\". Remove model.{key}, or set "
                                  "model.quantize = \"4bit\".")
    if not quantized(recipe):
        return
    what = f"model.quantize = \"{model.quantize}\""
    if not getattr(task, "quantizable", False):
        from finetune.engine.plugins import get_registry

        able = sorted(name for name, entry in get_registry().tasks.items()
                      if getattr(entry.cls, "quantizable", False))
        raise RecipeError(f"{what}: task {task.name!r} does not load its model quantized. bitsandbytes quantizes "
                          "the nn.Linear layers of transformers models; this task's model is not loaded that way "
                          "(timm and other vision backbones are mostly convolutions). Tasks that take it: "
                          f"{', '.join(able) or 'none installed'}. Set model.quantize = \"none\".")
    method = recipe.peft.method
    if method == "full":
        raise RecipeError(f"{what} freezes the base in quantized weights, which cannot be trained; peft.method = "
                          "\"full\" would train them. Use peft.method = \"lora\" (QLoRA), \"dora\" or \"ia3\", "
                          f"{WITHOUT}.")
    if recipe.peft.init in ("pissa", "olora"):
        raise RecipeError(f"{what}: peft.init = \"{recipe.peft.init}\" rewrites the base weights from their "
                          "decomposition, which quantized weights cannot take. Use peft.init = \"default\", "
                          f"{WITHOUT}.")
    if recipe.distributed.strategy != "ddp":
        raise RecipeError(f"{what}: distributed.strategy = \"{recipe.distributed.strategy}\" is not supported "
                          "with a quantized base here; use strategy = \"ddp\" (each process holds the small "
                          f"quantized base), {WITHOUT}.")
    version = _bnb_version() if bnb == "find" else bnb
    cuda = _cuda() if cuda is None else cuda
    if not cuda and (model.quantize == "8bit" or not CPU_4BIT_USEFUL):
        raise RecipeError(f"{what} needs a CUDA GPU with bitsandbytes, and this machine has none. bitsandbytes' "
                          "CPU backend runs, but measured here it saved no memory and took about twice as long per "
                          "step as the full-precision base (docs/adapters.md). On this CPU set model.quantize = "
                          "\"none\" (LoRA on the full-precision base, which also merges and exports the same way), "
                          "or run the recipe on a CUDA machine.")
    if version is None:
        raise RecipeError(f"{what} loads the base through bitsandbytes, which is not installed: {INSTALL}, "
                          f"{WITHOUT}.")
    if not cuda and version < CPU_4BIT_SINCE:
        have = ".".join(map(str, version))
        raise RecipeError(f"{what} on a CPU needs bitsandbytes >= {'.'.join(map(str, CPU_4BIT_SINCE))} (its "
                          f"CPU backend); {have} is installed. Upgrade with {INSTALL}, use a CUDA GPU, {WITHOUT}.")


def compute_dtype(recipe: Any) -> Any:
    """The dtype the quantized layers compute in: the run's precision (bf16 / fp16), else fp32."""
    import torch

    from finetune.engine.precision import resolve_mixed_precision

    precision = resolve_mixed_precision(recipe.train.mixed_precision)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def quantization_kwargs(recipe: Any) -> dict[str, Any]:
    """Keyword arguments for a transformers ``from_pretrained`` that load the base as ``model.quantize`` says
    (``{}`` for "none"): a ``BitsAndBytesConfig`` (4-bit: ``quant_type``, double quantization, the run's
    precision as compute dtype; or 8-bit) and the device the weights are quantized on (this process's GPU,
    else the CPU). A task that declares ``quantizable`` passes them to its ``from_pretrained``."""
    if not quantized(recipe):
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    model = recipe.model
    if model.quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model.quant_type,
                                    bnb_4bit_use_double_quant=model.double_quant,
                                    bnb_4bit_compute_dtype=compute_dtype(recipe))
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device: Any = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    # The layers bitsandbytes leaves alone (embeddings, norms, the head) stay in fp32 for stable training.
    return {"quantization_config": config, "device_map": {"": device}, "dtype": torch.float32}


def is_quantized_model(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(getattr(base, "config", None), "quantization_config", None) is not None)


def prepare_for_training(model: Any) -> Any:
    """PEFT's preparation of a quantized base for training an adapter (layer norms in fp32, input gradients
    on for the adapters below the first trained layer); gradient checkpointing stays the task's choice."""
    if not is_quantized_model(model):
        return model
    from peft import prepare_model_for_kbit_training

    keep_training_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_training_layout(model: Any) -> int:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights; returns how many layers had it.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2) repacks a ``Linear4bit``'s weights into a CPU inference
    layout at its first forward in eval mode and never packs them back: after the evaluation before training,
    every training step then computed the same loss (the adapter stopped learning; measured on a tiny Llama).
    Training evaluates between steps, so the repacking stays off (evaluation uses the training layout); a run
    loaded for prediction too (the repacking also fails on layers narrower than its 64-weight blocks)."""
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def describe(recipe: Any) -> dict[str, Any] | None:
    """What run.json and the card record: the quantization the base trained in, or None."""
    if not quantized(recipe):
        return None
    model = recipe.model
    out: dict[str, Any] = {"quantize": model.quantize, "library": "bitsandbytes",
                           "bitsandbytes": _version_text()}
    if model.quantize == "4bit":
        out.update(quant_type=model.quant_type, double_quant=model.double_quant,
                   compute_dtype=str(compute_dtype(recipe)).replace("torch.", ""))
    out["merge"] = "finetune merge / export load the full-precision base and merge the adapter there"
    return out


def describe_line(info: dict[str, Any]) -> str:
    """One line for the card from :func:`describe`'s record."""
    if info.get("quantize") == "4bit":
        kind = (f"4-bit {str(info.get('quant_type', 'nf4')).upper()}"
                + (" with double quantization" if info.get("double_quant") else "")
                + f", compute in {info.get('compute_dtype')}")
    else:
        kind = "8-bit (LLM.int8)"
    return (f"- base weights: frozen in {kind} through bitsandbytes {info.get('bitsandbytes')} (QLoRA); the "
            "adapter applies to the full-precision base, which `finetune merge` / `finetune export` load")


def _version_text() -> str | None:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
