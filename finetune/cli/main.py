"""The ``finetune`` command line. Thin: parses, calls the core, prints errors without tracebacks.

Heavy libraries (torch, transformers, peft) are imported inside commands only,
so ``finetune --help`` stays fast.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import click

from finetune.engine.console import quiet_libraries
from finetune.errors import FinetuneError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class FinetuneGroup(click.Group):
    """Adds plugin commands lazily and turns FinetuneError into a clean message."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if FinetuneGroup._plugins_loaded:
            return
        FinetuneGroup._plugins_loaded = True
        from finetune.engine.plugins import get_registry

        registry = get_registry()
        try:
            registry.pm.hook.finetune_register_commands(cli=self)
        except Exception as exc:  # noqa: BLE001 - one bad plugin must not break the CLI
            click.echo(f"warning: a plugin failed in finetune_register_commands: {exc}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except FinetuneError as exc:
            from finetune.engine.stop import Interrupted

            if debug:
                raise
            click.echo(f"error: {exc}" if not isinstance(exc, Interrupted) else str(exc), err=True)
            sys.exit(EXIT_INTERRUPTED if isinstance(exc, Interrupted) else EXIT_USER_ERROR)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("\ninterrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=FinetuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="finetune")
def cli(debug: bool) -> None:
    """Fine-tune pretrained models on small datasets with LoRA.

    \b
    finetune run recipe.toml         train (resumes an unfinished run)
    finetune init DATA               write a recipe for a data file or folder
    finetune validate recipe.toml    check a recipe and show one batch
    finetune predict RUN_DIR         predict with a trained run
    finetune evaluate RUN_DIR --input FILE   score a trained run on labelled data
    finetune runs [DIR]              the run folders under DIR (default runs/)
    finetune sweep recipe.toml       hyperparameter search (Optuna)
    finetune report RUN [RUN...]     rebuild a run's report.html, or compare runs
    finetune serve RUN_DIR           answer HTTP + JSON requests with a trained run
    finetune export RUN_DIR --format onnx|gguf|safetensors   a merged, checked model
    finetune tasks / plugins         what is installed
    """


def _set_option(help_text: str = "Override a recipe key, e.g. --set train.learning_rate=1e-4 (repeatable)."):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help_text)


class PredictCommand(click.Command):
    """``finetune predict``, whose help ends with the fields each installed task's predictions add."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        from finetune.engine.plugins import get_registry

        tasks = get_registry().tasks
        with formatter.section("Prediction fields (added to each input record; its own fields stay as they are)"):
            for name in sorted(tasks):
                fields = tasks[name].cls.prediction_fields
                formatter.write_text(f"{name}:")
                with formatter.indentation():
                    if isinstance(fields, dict) and fields:
                        formatter.write_dl([(str(k), str(v)) for k, v in fields.items()])
                    else:
                        formatter.write_text("(not declared by its plugin)")


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option()
@click.option("--resume", is_flag=True, help="Continue the unfinished run in output.dir (error if there is none).")
@click.option("--overwrite", is_flag=True, help="Replace a finished (or different) run in output.dir.")
@click.option("--dry-run", is_flag=True, help="Validate and show one batch; do not train (same as `validate`).")
@click.option("--all", "show_all", is_flag=True,
              help="With --dry-run: show every recipe key, defaults included (as `validate --all`).")
@click.option("-q", "--quiet", is_flag=True, help="Only print errors and the final summary.")
@click.option("--num-processes", type=int, default=1, show_default=True,
              help="Data-parallel processes on this machine (launched through Accelerate).")
@click.option("--num-machines", type=int, default=1, show_default=True, help="Machines taking part.")
@click.option("--machine-rank", type=int, default=0, show_default=True, help="This machine's rank.")
@click.option("--main-process-ip", help="Address of the machine with rank 0 (several machines).")
@click.option("--main-process-port", type=int, help="Port for the processes to meet on.")
def run(recipe: Path, overrides: tuple[str, ...], resume: bool, overwrite: bool, dry_run: bool, show_all: bool,
        quiet: bool, num_processes: int, num_machines: int, machine_rank: int, main_process_ip: str | None,
        main_process_port: int | None) -> None:
    """Train a LoRA adapter as RECIPE says and write the run folder."""
    if show_all and not dry_run:
        raise click.UsageError("--all only changes what --dry-run shows; use `finetune run RECIPE --dry-run --all` "
                               "(or `finetune validate RECIPE --all`).")
    if (num_processes > 1 or num_machines > 1) and "WORLD_SIZE" not in os.environ and not dry_run:
        from finetune.cli.launch import launch
        from finetune.engine.plugins import get_registry
        from finetune.engine.recipe_file import load_recipe

        load_recipe(recipe, list(overrides), get_registry().get_task)  # a recipe error once, before any process

        sys.exit(launch(sys.argv[1:], num_processes=num_processes, num_machines=num_machines,
                        machine_rank=machine_rank, main_process_ip=main_process_ip,
                        main_process_port=main_process_port))
    quiet_libraries()
    from finetune.engine.console import Console

    console = Console(quiet=quiet)
    if dry_run:
        from finetune.run.dry_run import dry_run as do_dry_run

        do_dry_run(recipe, list(overrides), console, everything=show_all)
        return
    from finetune.run.training import run_recipe

    run_recipe(recipe, list(overrides), resume=resume, overwrite=overwrite, console=console)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option()
@click.option("--all", "show_all", is_flag=True,
              help="Show every recipe key, defaults and settings this run does not use included.")
def validate(recipe: Path, overrides: tuple[str, ...], show_all: bool) -> None:
    """Resolve RECIPE, load the backbone and data, and show one collated batch, without training.

    The recipe is shown as the keys you set and the ones that matter for this run; --all shows every key."""
    quiet_libraries()
    from finetune.engine.console import Console
    from finetune.run.dry_run import dry_run

    dry_run(recipe, list(overrides), Console(), everything=show_all)


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--task", "task_name", help="The task to write a recipe for, when the data fits several.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Recipe file to write (default: <DATA name>.toml here); data paths are written relative to it.")
@click.option("--force", is_flag=True, help="Replace the recipe file if it exists.")
@click.option("--backbone", help="Use this backbone instead of the plugin's offline default.")
@click.option("--no-validate", is_flag=True, help="Write the recipe without running `finetune validate` on it.")
def init(data: Path, task_name: str | None, output: Path | None, force: bool, backbone: str | None,
         no_validate: bool) -> None:
    """Look at DATA (a file or folder) and write a commented recipe for it, then validate it.

    Prints what was found and why the task and columns were chosen; refuses ambiguous data, listing the
    candidate tasks (pick one with --task)."""
    from finetune.run.init import init_recipe

    recipe = init_recipe(data, output, task=task_name, force=force, backbone=backbone, echo=click.echo)
    if not no_validate:
        quiet_libraries()
        from finetune.engine.console import Console
        from finetune.run.dry_run import dry_run

        click.echo(f"validating {recipe} (as `finetune validate {recipe}`):")
        try:
            dry_run(recipe, [], Console())
        except FinetuneError as exc:
            raise FinetuneError(f"{exc}\nThe recipe was written to {recipe}: fix it (or the data) and run "
                                f"`finetune validate {recipe}`.") from exc
    click.echo(f"next: finetune run {recipe}")


@cli.command()
def tasks() -> None:
    """List the task names that recipes can use."""
    from finetune.engine.plugins import get_registry

    registry = get_registry()
    if not registry.tasks:
        click.echo("no tasks installed (no task plugin is installed or all failed to load; see `finetune plugins`)")
    width = max((len(n) for n in registry.tasks), default=0)
    for name in sorted(registry.tasks):
        entry = registry.tasks[name]
        click.echo(f"{name:<{width}}  {entry.cls.description}  [{entry.plugin}]")
    for conflict in registry.conflicts:
        click.echo(f"error: {conflict}", err=True)


@cli.command()
def rewards() -> None:
    """List the reward functions recipes can name (task.rewards of the grpo task), and their plugins."""
    from finetune.engine.plugins import get_registry

    found = get_registry().rewards()
    if not found:
        click.echo("no reward functions registered (no installed plugin implements finetune_register_rewards)")
    width = max((len(n) for n in found), default=0)
    for name, reward in found.items():
        click.echo(f"{name:<{width}}  {reward.description}  [{reward.plugin}]")


@cli.command()
def plugins() -> None:
    """List installed plugins: distribution, version, hooks, tasks, and load errors."""
    from finetune.engine.plugins import get_registry

    registry = get_registry()
    for info in registry.plugins:
        status = "FAILED" if info.error else "ok"
        click.echo(f"{info.name} ({info.distribution} {info.version}) [{status}]")
        click.echo(f"  module: {info.module}")
        if info.error:
            click.echo(f"  error:  {info.error}")
            continue
        click.echo(f"  hooks:  {', '.join(info.hooks) or '-'}")
        click.echo(f"  tasks:  {', '.join(info.tasks) or '-'}")
    for conflict in registry.conflicts:
        click.echo(f"error: {conflict}", err=True)


@cli.command(cls=PredictCommand)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path),
              help="A .csv/.tsv/.jsonl/.parquet file with the recipe's input column(s); default: lines on stdin.")
@click.option("--output", "output_path", type=click.Path(path_type=Path),
              help="Write predictions here, in the format its suffix names (.jsonl/.ndjson: JSON lines; .json: one "
                   "JSON array; .csv/.tsv: a table whose list and dict cells are JSON; another suffix needs "
                   "--format); default: stdout.")
@click.option("--format", "output_format", type=click.Choice(["auto", "jsonl", "json", "csv", "tsv"]),
              default="auto", show_default=True,
              help="Output format, whatever the --output suffix (auto: from the suffix; JSON lines on stdout).")
@click.option("--text", "--prompt", "-t", "texts", multiple=True, help="An input given directly (repeatable): a text, "
              "a prompt, a file path.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True,
              help="auto: bf16 on a CPU with AMX when its predictions on the run's eval rows agree with fp32's "
                   "(checked once, kept in the run folder), else fp32; bf16: unchecked; int8: the Linear layers "
                   "quantized to int8 (CPU), under the same check, else fp32 (docs/predict.md).")
@click.option("--no-merge", is_flag=True, help="Keep the adapter apart from the weights (default: LoRA folded into "
              "the weights for the prediction, the same results within float tolerance, faster).")
@click.option("--draw", "draw_dir", type=click.Path(path_type=Path),
              help="Also draw the predictions as pictures in this folder (created if missing), for tasks that "
                   "draw: boxes on each image (object-detection), masks and overlays (semantic-segmentation).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the run's backbone to run its own modelling code "
              "(needed when the run was trained with model.trust_remote_code; a run folder never allows it itself).")
@_set_option("Change a setting of the run's recipe for this prediction, e.g. --set data.text_column=review "
             "(the input column a text task reads) or --set task.max_new_tokens=32 (repeatable).")
def predict(run_dir: Path, input_path: Path | None, output_path: Path | None, output_format: str,
            texts: tuple[str, ...], batch_size: int, precision: str, no_merge: bool, draw_dir: Path | None,
            trust_remote_code: bool, overrides: tuple[str, ...]) -> None:
    """Predict with the best adapter of the run in RUN_DIR (a run folder, or a Hub repo id it was pushed to).

    Inputs come from --text, --input, or lines on stdin. Each output row is the input
    record, unchanged, plus the prediction's fields (listed below for each task).
    --set changes prediction-time settings of the run's recipe (the input column, a
    generation task's sampling options). An --input file is read, predicted and
    written a chunk at a time, so it may be larger than memory; text inputs are
    batched by length (the output keeps the input's order)."""
    quiet_libraries()
    from finetune.engine import threads
    from finetune.run.hub import find_run
    from finetune.run.inference import load_run, prepare_for_inference

    # Before torch loads (OpenMP reads its settings once): as for training, from how busy the machine is.
    chosen_threads = threads.apply(threads.choose())
    from finetune.run.predictions import (
        PredictionWriter,
        Progress,
        check_draw,
        check_output,
        iter_record_chunks,
        stream_predictions,
    )

    output_format = check_output(output_path, output_format)  # before the model loads
    run_dir = find_run(str(run_dir))
    task, model, processor, run = load_run(run_dir, list(overrides), trust_remote_code=trust_remote_code,
                                           announce=lambda line: click.echo(line, err=True))
    check_draw(task, draw_dir)
    chunks = iter_record_chunks(task, input_path, list(texts))
    first = next(chunks, [])  # bad input fails here, before the checks below and before any output is opened
    model, how = prepare_for_inference(task, model, processor, run, precision=precision, batch_size=batch_size,
                                       merge=not no_merge, overrides=list(overrides))
    click.echo(f"predicting: {how}", err=True)
    click.echo(f"torch threads: {chosen_threads.describe()}", err=True)
    drawn: list[Path] = []

    def draw(rows: list[dict]) -> None:
        if draw_dir is not None:
            draw_dir.mkdir(parents=True, exist_ok=True)
            drawn.extend(Path(p) for p in task.draw_predictions(rows, draw_dir))

    stream = output_path is None and sys.stdout.isatty()
    with PredictionWriter(output_path, output_format) as writer:
        stream_predictions(task, model, processor, itertools.chain([first], chunks), writer, batch_size,
                           stream=stream, progress=Progress(sys.stderr), each=draw)
    if draw_dir is not None:
        click.echo(f"drew {len(drawn)} picture(s) in {draw_dir}", err=True)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback makes the model reachable from other machines.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: a free port.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Most records predicted in one forward pass (gathered across concurrent requests).")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0, 1000),
              help="How long a batch may wait for requests already arriving to join it (a request arriving "
                   "alone does not wait).")
@click.option("--max-request-bytes", default=1_000_000, show_default=True, type=click.IntRange(1),
              help="Larger request bodies are refused with 413.")
@click.option("--max-records", default=256, show_default=True, type=click.IntRange(1),
              help="Most records (texts) in one /predict request; more are refused with 413.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="As for finetune predict: auto: bf16 on a CPU with AMX when its predictions on the run's eval "
                   "rows agree with fp32's (the same check, shared through the run folder), else fp32.")
@click.option("--no-merge", is_flag=True, help="Keep the adapter apart from the weights (default: LoRA folded into "
              "the weights, as finetune predict does: the same answers within float tolerance, faster).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the run's backbone to run its own modelling code "
              "(needed when the run was trained with model.trust_remote_code).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request on stderr.")
@_set_option("Change a prediction-time setting of the run's recipe, e.g. --set task.max_new_tokens=64 "
             "(repeatable).")
def serve(run_dir: Path, host: str, port: int, max_batch: int, max_wait_ms: float, max_request_bytes: int,
          max_records: int, precision: str, no_merge: bool, trust_remote_code: bool, verbose: bool,
          overrides: tuple[str, ...]) -> None:
    """Serve the run in RUN_DIR (a run folder, or a Hub repo id) over HTTP + JSON until Ctrl-C.

    \b
    GET  /health, /metadata       status, counters; task, labels, inputs, fields, metrics
    POST /predict                 {"text": ...} | {"texts": [...]} | {"records": [{...}]}
    POST /v1/chat/completions     OpenAI-compatible (causal-lm runs; "stream": true)
    POST /v1/completions          OpenAI-compatible (causal-lm runs)

    The run is loaded as finetune predict loads it (the adapter merged, the same precision), so the
    answers are predict's. Concurrent requests are batched (--max-batch, --max-wait-ms). See docs/serve.md."""
    quiet_libraries()
    from finetune.run.hub import find_run
    from finetune.run.serve import check_address, make_server, open_service, serve_forever

    def cannot_listen(exc: OSError) -> click.ClickException:
        return click.ClickException(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                                    "choose another --port (0 picks a free one).")

    try:
        check_address(host, port)  # before the model loads
    except OSError as exc:
        raise cannot_listen(exc) from None
    run_dir = find_run(str(run_dir))
    service = open_service(run_dir, list(overrides), trust_remote_code=trust_remote_code,
                           announce=lambda line: click.echo(line, err=True), precision=precision,
                           merge=not no_merge, max_batch=max_batch,
                           max_wait_ms=max_wait_ms, max_request_bytes=max_request_bytes, max_records=max_records)
    try:
        server = make_server(service, host, port, verbose=verbose)
    except OSError as exc:
        raise cannot_listen(exc) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}: anyone who can reach this machine can use the model; there is "
                   "no authentication (use 127.0.0.1 behind a proxy for that).", err=True)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    click.echo(f"serving {run_dir} ({service.task.name}) on http://{shown}:{bound_port} (Ctrl-C stops)", err=True)
    serve_forever(server, service, announce=lambda line: click.echo(line, err=True))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help="A labelled file (or folder) in the form the run's data.train takes, e.g. a held-out test set.")
@click.option("--output", "output_path", type=click.Path(path_type=Path),
              help="Also write the result as JSON to this file (metrics, nested details, examples, adapter step).")
@click.option("--batch-size", type=int, help="Evaluation batch size (default: the run's).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the run's backbone to run its own modelling code "
              "(needed when the run was trained with model.trust_remote_code).")
@_set_option("Change a setting of the run's recipe for this evaluation, e.g. --set data.label_column=gold "
             "(repeatable).")
def evaluate(run_dir: Path, input_path: Path, output_path: Path | None, batch_size: int | None,
             trust_remote_code: bool, overrides: tuple[str, ...]) -> None:
    """Score the best adapter of the run in RUN_DIR (a run folder, or a Hub repo id it was pushed to) on a
    labelled file, with the task's own metrics (as at an evaluation during training)."""
    quiet_libraries()
    from finetune.run.evaluate import evaluate_run
    from finetune.run.hub import find_run

    run_dir = find_run(str(run_dir))
    result = evaluate_run(run_dir, input_path, list(overrides), batch_size=batch_size,
                          trust_remote_code=trust_remote_code, announce=lambda line: click.echo(line, err=True))
    step = f" (adapter of step {result['adapter_step']})" if result["adapter_step"] is not None else ""
    click.echo(f"{result['run']}{step} on {result['input']}: {result['examples']} examples")
    for key, value in result["metrics"].items():
        click.echo(f"  {key:<12} {value:.4f}" if isinstance(value, float) else f"  {key:<12} {value}")
    if output_path is not None:
        from finetune.engine.run_folder import write_json_atomic

        write_json_atomic(output_path, result)
        click.echo(f"wrote {output_path}", err=True)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "gguf", "safetensors"]), required=True,
              help="onnx (classification tasks: checked with onnxruntime), gguf (causal-lm: llama.cpp), "
                   "safetensors (the merged model as a transformers/timm folder).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Folder to write (default: RUN_DIR/export/FORMAT).")
@click.option("--quantize", type=click.Choice(["f32", "f16", "q8_0"], case_sensitive=False),
              help="GGUF weight type (default f16; f32 and f16 are checked by reading back and comparing logits).")
@click.option("--tolerance", type=float, default=1e-3, show_default=True,
              help="ONNX: the largest allowed |logit difference| between onnxruntime and PyTorch.")
@click.option("--input", "input_path", type=click.Path(path_type=Path),
              help="A labelled file to check the export on (default: the run's eval data).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--allow-quantized-base", is_flag=True,
              help="Merge even though the base checkpoint's weights are quantised (GPTQ, bitsandbytes): the export "
                   "keeps that quality loss. (A QLoRA run needs no flag: it merges into the full-precision base.)")
@click.option("--trust-remote-code", is_flag=True, help="Allow the run's backbone to run its own modelling code.")
def export(run_dir: Path, fmt: str, out: Path | None, quantize: str | None, tolerance: float,
           input_path: Path | None, overwrite: bool, allow_quantized_base: bool, trust_remote_code: bool) -> None:
    """Export the best adapter of RUN_DIR, merged into its base, as ONNX, GGUF or a safetensors folder.

    The folder gets a README.md (how to run it) and export.json (what was checked; docs/export.md)."""
    quiet_libraries()
    from finetune.run.export import export_run

    report = export_run(run_dir, fmt, out, quantize=quantize.lower() if quantize else None, tolerance=tolerance,
                        input_path=input_path, overwrite=overwrite, trust_remote_code=trust_remote_code,
                        allow_quantized_base=allow_quantized_base, say=lambda line: click.echo(line, err=True))
    click.echo(f"{fmt} export written to {report['folder']} ({', '.join(report['files'])})")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="'user/name' on the Hub (HF_ENDPOINT selects another server).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", "--branch", "revision", help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--allow-incomplete", is_flag=True, help="Push the best adapter of a run that did not finish.")
def push(run_dir: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
         allow_incomplete: bool) -> None:
    """Push a run (adapter, processor, recipe, metrics, curves, model card) to the Hub in one commit."""
    from finetune.run.hub import push_run

    result = push_run(run_dir, repo_id, private=private, revision=revision, create_pr=create_pr,
                      allow_incomplete=allow_incomplete)
    if not result["changed"]:
        click.echo(f"{repo_id} already holds this run (commit {result['commit'][:8]}); nothing to push.")
        return
    click.echo(f"pushed {len(result['files'])} files to {repo_id}: {result['pr_url'] or result['url']}")


@cli.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path), default=Path("runs"))
@click.option("--sort", type=click.Choice(["when", "metric", "name", "task", "duration"]), default="when",
              show_default=True, help="when: newest first; metric: best first (per selection metric); name, task: "
              "alphabetical; duration: longest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON array (every field, for scripts).")
def runs(directory: Path, sort: str, as_json: bool) -> None:
    """List the run folders under DIRECTORY (default: runs/): task, backbone, status, best metric, when, how long.

    \b
    status: finished; running (a process trains in it now); resumable (unfinished,
    with a complete checkpoint: `finetune run RECIPE` continues it); incomplete
    (unfinished, no checkpoint: it starts again). For an unfinished run the best
    metric is the best so far."""
    from finetune.run.listing import list_runs, plain_table, rich_table

    rows = list_runs(directory, sort=sort)
    if as_json:
        import json

        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        if not rows:
            click.echo(f"no run folders under {directory}", err=True)
        return
    if not rows:
        click.echo(f"no run folders under {directory} (a run folder holds recipe.toml and run.json; "
                   "`finetune run RECIPE` writes one to the recipe's output.dir).")
        return
    if sys.stdout.isatty():
        from rich.console import Console as RichConsole

        RichConsole().print(rich_table(rows, f"{len(rows)} run(s) under {directory}"))
    else:
        click.echo(plain_table(rows))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--trials", "-n", type=int, help="Trials that must end (complete, pruned or failed), counting those "
              "of an earlier call on the same folder; default: [sweep] trials (20).")
@click.option("--param", "params", multiple=True, metavar="KEY=LOW..HIGH[,log]|KEY=A|B|C",
              help="Search this recipe key over a range (',log': log scale; ',step=S') or choices; repeatable; wins "
              "over [sweep.params]. E.g. --param train.learning_rate=1e-5..1e-3,log --param peft.r=4|8|16.")
@click.option("--dir", "sweep_dir", type=click.Path(path_type=Path),
              help="Sweep folder (study.db, trial-NNNN/ run folders, sweep.json, trials.csv, best.toml); default: "
              "[sweep] dir, else output.dir + '-sweep'.")
@click.option("--timeout", type=float, help="Start no new trial after this many seconds.")
@_set_option("Override a recipe key for every trial, e.g. --set train.epochs=2 (repeatable).")
@click.option("-v", "--verbose", is_flag=True, help="Show each trial's progress and summary.")
def sweep(recipe: Path, trials: int | None, params: tuple[str, ...], sweep_dir: Path | None, timeout: float | None,
          overrides: tuple[str, ...], verbose: bool) -> None:
    """Search hyperparameters of RECIPE with Optuna (TPE, median pruning); each trial is a run folder.

    Running it again on the same recipe and folder continues the sweep (a trial cut short by a kill
    resumes from its checkpoint) until --trials trials have ended. Writes best.toml, which `finetune
    run` takes as it is (docs/sweep.md)."""
    quiet_libraries()
    from finetune.engine.console import Console
    from finetune.run.sweep import SweepSettings
    from finetune.run.sweep import sweep as run_sweep

    run_sweep(SweepSettings(recipe, list(overrides), trials=trials, params=list(params), sweep_dir=sweep_dir,
                            timeout=timeout, verbose=verbose), Console())


@cli.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit.")
def pull(repo_id: str, revision: str | None) -> None:
    """Download a model pushed by finetune; prints the local folder (usable with `finetune predict`)."""
    from finetune.run.hub import pull as do_pull

    click.echo(str(do_pull(repo_id, revision)))


@cli.command()
@click.argument("run_dirs", metavar="RUN [RUN...]", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_path", type=click.Path(path_type=Path),
              help="Where to write the page (default: RUN/report.html for one run, ./runs-comparison.html for "
              "several).")
def report(run_dirs: tuple[Path, ...], output_path: Path | None) -> None:
    """Rebuild a run's report.html, or compare several runs side by side.

    \b
    One RUN: its report.html (recipe, data, metrics before/after/baseline/test,
    curves, per-class table, sample predictions, speed, memory, provenance),
    from the files in the run folder; no model is loaded. Several: one page with
    their metrics side by side and the recipe keys that differ. Every page is a
    single file that needs no network."""
    from finetune.run.report import write_comparison, write_report

    if len(run_dirs) == 1:
        path = write_report(run_dirs[0], output_path)
    else:
        path = write_comparison(list(run_dirs), output_path or Path("runs-comparison.html"))
    click.echo(f"wrote {path}")


@cli.command(name="new-plugin")
@click.argument("name")
@click.option("--template", type=click.Choice(["classification", "regression", "tagging", "generation"]),
              help="The task's shape: text -> label, text -> number, a tag per word, or prompt -> completion "
                   "(default: what NAME suggests, else classification).")
@click.option("--dir", "parent", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder in which to create finetune-NAME/.")
@click.option("--task", "task_name", help="Task name the plugin registers (default: NAME).")
@click.option("--with-callback", is_flag=True, help="Also register an example callback (observes every run).")
@click.option("--with-command", is_flag=True, help="Also add a `finetune NAME-summary` command to the CLI.")
def new_plugin(name: str, template: str | None, parent: Path, task_name: str | None, with_callback: bool,
               with_command: bool) -> None:
    """Create a pip-installable plugin package finetune-NAME with a task that runs, tests and a README."""
    from finetune.cli.scaffold import choose_template, create_plugin, plugin_names
    from finetune.engine.plugins import get_registry

    task = task_name or plugin_names(name)["task"]
    registry = get_registry()
    if task in registry.tasks:
        raise FinetuneError(f"new-plugin: a task named {task!r} is already installed ({registry.owner_of(task)}); "
                            "two plugins cannot register one name. Choose another NAME, or --task OTHER-NAME.")
    why = "chosen with --template"
    if template is None:
        template, why = choose_template(name)
    root = create_plugin(name, parent, task_name, template=template, with_callback=with_callback,
                         with_command=with_command)
    click.echo(f"created {root} (template: {template}, {why})\n\nnext:\n  pip install -e {root}\n"
               f"  finetune tasks          # lists the new task\n  pytest {root}/tests      # trains a tiny model "
               "end to end")


def main() -> None:
    cli(prog_name="finetune")


if __name__ == "__main__":
    main()
