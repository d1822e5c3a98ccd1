"""Folding a run's adapter into its base weights: the one merge behind ``finetune merge`` (the generation
plugin's command), ``finetune export`` (every format) and the QLoRA path.

:func:`merge_run` loads the run's best adapter on the **full-precision** base (a run trained on a 4-bit /
8-bit base, ``model.quantize``, merges there, never into the quantized weights, which would round the update
away), refuses what cannot or should not be merged (prompt and prefix tuning before anything loads; a base that
is itself quantized unless the caller allows it) and returns the trained model beside the merged one.
:func:`merged_model` is the fold itself: every module PEFT trained in full (``modules_to_save``: the task head,
BERT's pooler) put back as its trained copy, then ``merge_and_unload``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.contract.recipe import PROMPT_METHODS
from finetune.contract.task import Task
from finetune.engine.run_folder import RunDir, missing_run_folder
from finetune.errors import RecipeError


@dataclass
class MergedRun:
    """What :func:`merge_run` returns."""

    #: the run's task, its ``state`` restored (as ``load_run`` returns it)
    task: Task
    #: the model as trained: the adapter attached (a ``PeftModel``), or the trained weights (``peft.method``
    #: none/full); the merged copy never changes it (when ``keep_trained``)
    model: Any
    #: the adapter folded into the base weights: a plain model in eval mode (``model`` itself when there was no
    #: adapter to fold)
    merged: Any
    #: the run's tokenizer / image or audio processor (what ``task.load_model`` returned)
    processor: Any
    #: the run folder
    run: RunDir
    #: the run's ``peft.method``
    method: str
    #: run.json's ``quantization`` record when the adapter was trained on a quantized base (QLoRA), else None;
    #: the merge used the full-precision base either way
    trained_on_quantized_base: dict[str, Any] | None
    #: why the base weights merged into are lossy (quantized, or dequantized from a quantized file), when the
    #: caller allowed it; None otherwise
    quantized_base: str | None
    #: whether an adapter was folded in (False for ``peft.method`` none/full)
    has_adapter: bool

    @property
    def notes(self) -> list[str]:
        """Sentences for the written folder's card: the full-precision merge of a QLoRA adapter, a lossy base."""
        out = []
        quantization = self.trained_on_quantized_base
        if quantization and self.has_adapter:
            out.append(f"The adapter was trained on the base quantized ({quantization.get('quantize')}, "
                       f"{quantization.get('quant_type', 'LLM.int8')}, bitsandbytes; QLoRA) and is merged here "
                       "into the full-precision base weights, not the quantized ones.")
        if self.quantized_base:
            out.append(f"Note: {self.quantized_base}")
        return out


def merge_run(run_path: str | Path, command: str = "merge", *, trust_remote_code: bool = False,
              allow_quantized_base: bool = False, base_note: str | None = None, require_adapter: bool = False,
              keep_trained: bool = True) -> MergedRun:
    """The best adapter of ``run_path`` merged into its full-precision base (see :class:`MergedRun`).

    Refused with a ``RecipeError`` starting with ``"<command>: "``, before any model loads: prompt / prefix
    tuning (trained virtual tokens change no weight), and ``base_note`` (a reason the base weights are lossy that
    the caller knows from the run folder, e.g. dequantized from a 4-bit GGUF file) unless
    ``allow_quantized_base``; after loading: a base that is itself quantized (a GPTQ / bitsandbytes
    checkpoint) unless ``allow_quantized_base``, and, with ``require_adapter``, a run without an adapter
    (``peft.method`` none/full). ``keep_trained=False`` merges the trained model in place (no copy; less memory)
    and ``MergedRun.model`` is then the merged one too."""
    from finetune.run.inference import load_run

    run = RunDir(run_path)
    if not run.path.exists():
        raise missing_run_folder(run.path)
    peft = run.resolved_recipe().get("peft", {}) if run.recipe_file.is_file() else {}
    method = str(peft.get("method", "lora"))
    if method in PROMPT_METHODS:
        raise RecipeError(f"{command}: {run.path} was trained with peft.method = \"{method}\": its adapter is "
                          f"{peft.get('num_virtual_tokens', 'some')} trained virtual tokens given to the model with "
                          "every input, not a change of the model's weights, so there are no weights to merge it "
                          "into and no merged model to write. Use the run as it is (finetune predict / serve, or "
                          "PeftModel.from_pretrained(base, RUN_DIR/adapter)), or train with peft.method = "
                          "\"lora\", \"dora\" or \"ia3\" for a mergeable adapter.")
    if base_note and not allow_quantized_base:
        raise _lossy_base(command, base_note)
    task, model, processor, run = load_run(run.path, trust_remote_code=trust_remote_code, full_precision=True)
    has_adapter = hasattr(model, "merge_and_unload")
    if require_adapter and not has_adapter:
        raise RecipeError(f"{command}: {run.path} was not trained with an adapter (peft.method = "
                          f"{task.recipe.peft.method!r}); there is no adapter to merge.")
    problem = quantized_base(model) or base_note
    if problem and not allow_quantized_base:
        raise _lossy_base(command, problem)
    merged = merged_model(model, copy=keep_trained)
    return MergedRun(task=task, model=model if keep_trained else merged, merged=merged, processor=processor,
                     run=run, method=method, trained_on_quantized_base=run.info().get("quantization"),
                     quantized_base=problem, has_adapter=has_adapter)


def _lossy_base(command: str, problem: str) -> RecipeError:
    return RecipeError(f"{command}: {problem} Merging into it silently would hide that quality loss. Pass "
                       "--allow-quantized-base to merge anyway (the merged model records where its weights came "
                       "from), or train on an unquantised copy of the base.")


def merged_model(model: Any, *, copy: bool = True) -> Any:
    """``model`` with its adapter folded into the base weights: a plain model in eval mode. ``copy`` merges a
    deep copy (the trained model stays as it is, e.g. the reference of export's checks). A model without an
    adapter (``peft.method`` none/full: the trained weights are already in it) is returned as it is.

    The modules PEFT trained in full (``ModulesToSaveWrapper``: the task head, BERT's pooler) are put back as
    their trained copies first, as ``merge_and_unload`` would: PEFT's IA3 unloading fails on a wrapped module
    that has no ``weight`` of its own (BertPooler), so it is done here, the same way for every method."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import warnings

    from peft.utils import ModulesToSaveWrapper

    if copy:
        import copy as copying

        model = copying.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.modules_to_save[module.active_adapters[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about merging; the callers' tests check the result
        return model.merge_and_unload().eval()


def quantized_base(model: Any) -> str | None:
    """Why the loaded base model's weights are quantized (a GPTQ / AWQ / bitsandbytes checkpoint), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quant = getattr(getattr(base, "config", None), "quantization_config", None)
    if quant is not None or getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        method = getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict)
                                                           else None)
        return (f"the base model is quantised ({method or 'quantised weights'}); merging LoRA into quantised "
                "weights rounds the update away and loses quality.")
    return None
