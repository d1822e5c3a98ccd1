"""``finetune merge RUN_DIR OUT``: fold a run's adapter (LoRA, DoRA, rsLoRA, IA3) into its base -> a plain
transformers model. Prompt and prefix tuning are refused: their virtual tokens change no weight."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--allow-quantized-base", is_flag=True,
              help="Merge even though the base weights are quantised (or were dequantised from a quantised "
                   "file such as a 4-bit GGUF): the merged model keeps that quality loss.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the run's backbone to run its own modelling code "
              "(a run folder never allows it itself).")
def merge(run_dir: Path, out: Path, allow_quantized_base: bool, overwrite: bool, trust_remote_code: bool) -> None:
    """Merge the best adapter of RUN_DIR into its base model and save a full model in OUT.

    OUT loads with plain transformers (AutoModelForCausalLM.from_pretrained(OUT)); no peft needed."""
    import os
    import shutil

    from finetune import RecipeError, RunDir, load_run

    if out.exists() and not overwrite:
        raise RecipeError(f"merge: {out} already exists; choose another folder or pass --overwrite.")

    def refuse(problem: str) -> None:
        raise RecipeError(f"merge: {problem} Merging into it silently would hide that quality loss. Pass "
                          "--allow-quantized-base to merge anyway (the merged model records where its weights "
                          "came from), or train on an unquantised copy of the base.")

    backbone = RunDir(run_dir).info().get("backbone", {})
    peft = RunDir(run_dir).resolved_recipe().get("peft", {}) if (run_dir / "recipe.toml").is_file() else {}
    method = peft.get("method", "lora")
    if method in ("prompt-tuning", "prefix-tuning"):
        raise RecipeError(f"merge: {run_dir} was trained with peft.method = \"{method}\": its adapter is "
                          f"{peft.get('num_virtual_tokens', 'some')} trained virtual tokens given to the model with "
                          "every input, not a change of the model's weights, so there are no weights to merge it "
                          "into. Use the run as it is (PeftModel.from_pretrained(base, RUN_DIR/adapter), or "
                          "finetune predict), or train with peft.method = \"lora\", \"dora\" or \"ia3\" for a "
                          "mergeable adapter.")
    problem = _dequantized_base(backbone)
    if problem and not allow_quantized_base:
        refuse(problem)  # before loading anything: the run folder says where the base came from
    # A run trained on a quantized base (model.quantize, QLoRA) merges into the full-precision base: merging
    # into the 4-bit / 8-bit weights would round the update away.
    task, model, processor, run = load_run(run_dir, trust_remote_code=trust_remote_code, full_precision=True)
    trained_quantized = RunDir(run_dir).info().get("quantization")
    if not hasattr(model, "merge_and_unload"):
        raise RecipeError(f"merge: {run.path} was not trained with an adapter (peft.method = "
                          f"{task.recipe.peft.method!r}); there is no adapter to merge.")
    problem = _quantized_base(model) or problem
    if problem and not allow_quantized_base:
        refuse(problem)
    if problem:
        click.echo(f"warning: {problem} Merging anyway (--allow-quantized-base).", err=True)
    _take_trained_copies(model)
    merged = model.merge_and_unload()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        f"# Merged model\n\nBase `{backbone.get('upstream_id') or backbone.get('name')}` "
        f"({backbone.get('source', 'unknown source')}) with the {method} adapter of the finetune run "
        f"`{run.path.name}` merged in (merge_and_unload).\n"
        + (f"\nThe adapter was trained on the base quantized ({trained_quantized.get('quantize')}, "
           f"{trained_quantized.get('quant_type', 'LLM.int8')}, bitsandbytes; QLoRA) and is merged here into the "
           "full-precision base weights, not the quantized ones.\n" if trained_quantized else "")
        + (f"\nNote: {problem}\n" if problem else ""))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    click.echo(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")


def _take_trained_copies(model) -> None:
    """Put each module trained in full (PEFT's ``ModulesToSaveWrapper``: the task head, BERT's pooler) back as
    its trained copy, as ``merge_and_unload`` would: PEFT's IA3 unloading fails on a wrapped module that has
    no ``weight`` of its own (e.g. BertPooler), so it is done here, the same way for every method."""
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.modules_to_save[module.active_adapters[0]])


def _quantized_base(model) -> str | None:
    """Why the loaded base model is quantised, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quant = getattr(getattr(base, "config", None), "quantization_config", None)
    if quant is not None or getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        method = getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict)
                                                           else None)
        return (f"the base model is quantised ({method or 'quantised weights'}); merging LoRA into quantised "
                "weights rounds the update away and loses quality.")
    return None


def _dequantized_base(backbone: dict) -> str | None:
    """Why the run's base weights came from a quantised file (recorded at conversion), or None."""
    from finetune_generation.zoo import quantization_note

    note = quantization_note(backbone["path"]) if backbone.get("path") else None
    if note:
        return (f"the base weights were dequantised from a quantised file ({note}); the merged model inherits "
                "that loss versus the original weights.")
    return None
