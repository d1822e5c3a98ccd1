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

    from finetune import RecipeError, RunDir, merge_run

    if out.exists() and not overwrite:
        raise RecipeError(f"merge: {out} already exists; choose another folder or pass --overwrite.")
    backbone = RunDir(run_dir).info().get("backbone", {}) if (run_dir / "run.json").is_file() else {}
    # the merge itself is the core's (the same as finetune export's): prompt / prefix tuning and a lossy base
    # refused, a run trained on a quantized base (QLoRA) merged into the full-precision base
    result = merge_run(run_dir, "merge", trust_remote_code=trust_remote_code,
                       allow_quantized_base=allow_quantized_base, base_note=_dequantized_base(backbone),
                       require_adapter=True, keep_trained=False)
    problem = result.quantized_base
    if problem:
        click.echo(f"warning: {problem} Merging anyway (--allow-quantized-base).", err=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.merged.save_pretrained(tmp)
    if result.processor is not None:
        result.processor.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        f"# Merged model\n\nBase `{backbone.get('upstream_id') or backbone.get('name')}` "
        f"({backbone.get('source', 'unknown source')}) with the {result.method} adapter of the finetune run "
        f"`{result.run.path.name}` merged in (merge_and_unload).\n" + "".join(f"\n{n}\n" for n in result.notes))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    click.echo(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")


def _dequantized_base(backbone: dict) -> str | None:
    """Why the run's base weights came from a quantised file (recorded at conversion), or None."""
    from finetune_generation.zoo import quantization_note

    note = quantization_note(backbone["path"]) if backbone.get("path") else None
    if note:
        return (f"the base weights were dequantised from a quantised file ({note}); the merged model inherits "
                "that loss versus the original weights.")
    return None
