"""``finetune export RUN --format onnx|gguf|safetensors``: a run's merged model in a format that runs elsewhere.

The run's adapter is merged into its full-precision base by :func:`finetune.run.merge.merge_run` (the merge
``finetune merge`` uses too; runs trained with ``peft.method = "none"/"full"`` have nothing to merge) and
written into a folder with a card (README.md: how to run it) and ``export.json`` (what was written and
checked). The folder is built beside OUT and renamed into place only once every check passed, so an export
that failed leaves nothing that looks finished.

* ``onnx``: the core traces the task's :class:`~finetune.contract.task.ExportGraph` with
  ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the dynamo exporter needs
  ``onnxscript``, which is not a dependency, and traced the same graphs no better here), saves the task's
  preprocessing files beside ``model.onnx``, then runs the file with onnxruntime on a few rows of the run's
  eval data (or ``--input``) and compares with the trained model in PyTorch: the largest absolute logit
  difference is printed, written to export.json and must stay within ``--tolerance`` (1e-3 by default),
  once for the whole batch and once for its first row alone (the batch axis is dynamic).
* every other format is written and checked by the task (:meth:`Task.export_file`): the default writes
  ``safetensors`` for transformers models; the generation plugin writes GGUF.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.contract.task import ExportGraph, Task
from finetune.engine.plugins import get_registry
from finetune.engine.run_folder import RunDir, missing_run_folder
from finetune.errors import DataError, ExportError, FinetuneError, RecipeError
from finetune.run.merge import merge_run

FORMATS = ("onnx", "gguf", "safetensors")
#: Default bound on the largest absolute logit difference between onnxruntime and PyTorch (fp32).
ONNX_TOLERANCE = 1e-3
ONNX_OPSET = 17
EXPORT_FILE = "export.json"
CHECK_ROWS = 8


def check_format(task_name: str, fmt: str) -> None:
    """A task that cannot take ``fmt`` is refused (before any model is loaded), naming the formats it can take
    and the installed tasks that take ``fmt``."""
    tasks = get_registry().tasks
    info = tasks.get(task_name)
    formats = tuple(getattr(info.cls, "export_formats", ()) or ()) if info is not None else ()
    if fmt in formats:
        return
    able = sorted(name for name, other in tasks.items() if fmt in (getattr(other.cls, "export_formats", ()) or ()))
    can = f"it exports to {', '.join(formats)}" if formats else "it exports to no format"
    which = f"tasks that export {fmt}: {', '.join(able)}" if able else "no installed task does"
    raise RecipeError(f"export: the task {task_name!r} cannot be exported as {fmt} ({can}); {which}.")


def export_run(run_path: str | Path, fmt: str, out: Path | None = None, *, quantize: str | None = None,
               tolerance: float = ONNX_TOLERANCE, input_path: Path | None = None, overwrite: bool = False,
               trust_remote_code: bool = False, allow_quantized_base: bool = False, rows: int = CHECK_ROWS,
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the best adapter of ``run_path`` merged into its base; return the report written to
    export.json (``folder``, ``format``, ``files``, ``checks``...). A base that is itself quantized is refused
    unless ``allow_quantized_base`` (see :func:`finetune.run.merge.merge_run`)."""
    import torch

    if fmt not in FORMATS:
        raise RecipeError(f"export: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    run = RunDir(run_path)
    if not run.path.exists():
        raise missing_run_folder(run.path)
    out = Path(out) if out is not None else run.path / "export" / fmt
    if out.exists() and not overwrite:
        raise RecipeError(f"export: {out} already exists; choose another folder with -o or pass --overwrite.")
    if quantize is not None and fmt != "gguf":
        raise RecipeError(f"export: --quantize applies to --format gguf only (not {fmt}).")
    if fmt != "onnx" and tolerance != ONNX_TOLERANCE:
        raise RecipeError("export: --tolerance bounds the ONNX check; it does not apply to --format " + fmt + ".")
    if run.recipe_file.exists():
        recipe = run.resolved_recipe()
        check_format(str(recipe.get("task", {}).get("name")), fmt)
    started = time.perf_counter()
    # prompt / prefix tuning refused before loading; a run trained on a quantized base (model.quantize) merges
    # into the full-precision base, never into the 4-bit weights
    merge = merge_run(run.path, "export", trust_remote_code=trust_remote_code,
                      allow_quantized_base=allow_quantized_base)
    task, model, merged, processor, run = merge.task, merge.model, merge.merged, merge.processor, merge.run
    check_format(task.name, fmt)
    batch = example_batch(task, processor, input_path, rows, say)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                report = export_onnx(task, model, merged, processor, batch, tmp, tolerance, say)
            else:
                report = export_other(task, fmt, merged, processor, batch, tmp, quantize)
        info = run.info()
        backbone = info.get("backbone", {})
        report = {"format": fmt, "task": task.name, "run": str(run.path),
                  "backbone": backbone.get("upstream_id") or backbone.get("name"),
                  "backbone_source": backbone.get("source"), "peft_method": task.recipe.peft.method,
                  "merged": merge.has_adapter, "trained_on_quantized_base": merge.trained_on_quantized_base,
                  "quantized_base": merge.quantized_base, "merge_notes": merge.notes,
                  "check_rows": None if batch is None else batch_size(batch),
                  **report, "seconds": round(time.perf_counter() - started, 1)}
        report["files"] = sorted(p.name for p in tmp.iterdir()) + [EXPORT_FILE, "README.md"]
        (tmp / EXPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(export_card(report, task))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["folder"] = str(out)
    return report


def example_batch(task: Any, processor: Any, input_path: Path | None, rows: int,
                  say: Callable[[str], None]) -> dict[str, Any] | None:
    """A collated batch of the first ``rows`` examples: of ``input_path`` (labelled, as ``finetune evaluate
    --input`` reads it), else of the run's eval split (its recipe's data, read again; ``task.state`` stays
    the adapter's); None when that data cannot be read (then the checks that need inputs say so)."""
    if input_path is not None:
        if not Path(input_path).exists():
            raise DataError(f"--input: {input_path} does not exist.")
        examples = task.read_examples(Path(input_path), "--input")
    else:
        saved = task.state
        try:
            examples = task.prepare_data().eval
        except FinetuneError as exc:
            say(f"warning: the run's eval data cannot be read ({exc}); pass --input FILE (labelled, like "
                "`finetune evaluate --input`) to check the export on real inputs.")
            return None
        finally:
            task.state = saved
    dataset = task.build_dataset(examples, processor, training=False)
    n = min(rows, len(dataset))
    if n == 0:
        raise DataError(f"export: {'--input ' + str(input_path) if input_path else 'the eval split'} holds no "
                        "examples to check the export on.")
    return task.collate_fn(processor)([dataset[i] for i in range(n)])


def batch_size(batch: dict[str, Any]) -> int:
    import torch

    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


def export_onnx(task: Any, model: Any, merged: Any, processor: Any, batch: dict[str, Any] | None, folder: Path,
                tolerance: float, say: Callable[[str], None]) -> dict[str, Any]:
    """``model.onnx`` + the preprocessing files in ``folder``, checked with onnxruntime against ``model``."""
    import numpy as np
    import torch

    if batch is None:
        raise DataError("export: an ONNX export is checked against PyTorch on real inputs, and the run's eval "
                        "data cannot be read; pass --input FILE (a labelled file like the run's eval data).")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("export: --format onnx needs the onnx and onnxruntime packages: "
                          "pip install 'finetune[export]' (or pip install onnx onnxruntime).") from None
    reference = _graph(task, model, processor, batch)
    expected = reference.module(*reference.inputs.values()).float().cpu().numpy()
    graph = _graph(task, merged, processor, batch)
    names = list(graph.inputs)
    axes = {name: {0: "batch", **graph.dynamic_axes.get(name, {})} for name in names}
    axes[graph.output_name] = {0: "batch"}
    path = folder / "model.onnx"
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():  # the tracer warns at every Python branch on a shape; the check tells
            warnings.simplefilter("ignore")
            torch.onnx.export(graph.module, tuple(graph.inputs.values()), str(path), input_names=names,
                              output_names=[graph.output_name], dynamic_axes=axes, opset_version=ONNX_OPSET,
                              dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the tracer's failure, named
        raise ExportError(f"export: torch.onnx.export failed for the task {task.name!r}: "
                          f"{type(exc).__name__}: {str(exc)[:400]}") from exc
    export_s = time.perf_counter() - started
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(folder))
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: tensor.cpu().numpy() for name, tensor in graph.inputs.items()}
    got = session.run(None, feeds)[0]
    if got.shape != expected.shape:
        raise ExportError(f"export: onnxruntime returned {graph.output_name} of shape {got.shape}, PyTorch "
                          f"{expected.shape}; the export is wrong.")
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    single = session.run(None, {name: value[:1] for name, value in feeds.items()})[0]
    diff_one = float(np.abs(single.astype(np.float64) - expected[:1]).max())
    rows = len(expected)
    say(f"onnx check: {rows} eval rows, largest |logit difference| onnxruntime vs PyTorch {diff:.2e} "
        f"(batch of {rows}), {diff_one:.2e} (batch of 1); tolerance {tolerance:g}")
    if not (max(diff, diff_one) <= tolerance):  # NaN fails too
        raise ExportError(f"export: the ONNX model's logits differ from PyTorch's by up to {max(diff, diff_one):.3g} "
                          f"on {rows} eval rows, above the tolerance {tolerance:g}; nothing was written. Raise "
                          "--tolerance if that difference is acceptable for this model.")
    torch_s = _seconds(lambda: reference.module(*reference.inputs.values()))
    ort_s = _seconds(lambda: session.run(None, feeds))
    return {"onnx": {"opset": ONNX_OPSET, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                     "inputs": {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                    "dynamic_axes": axes[n]} for n, t in graph.inputs.items()},
                     "output": graph.output_name, "export_seconds": round(export_s, 2)},
            "checks": {"max_abs_logit_diff": diff, "max_abs_logit_diff_batch1": diff_one, "tolerance": tolerance,
                       "rows": rows, "latency_ms": {"pytorch": round(torch_s * 1e3, 2),
                                                    "onnxruntime": round(ort_s * 1e3, 2), "batch": rows}},
            "usage": graph.usage}


def _graph(task: Any, model: Any, processor: Any, batch: dict[str, Any]) -> ExportGraph:
    graph = task.export_graph(model, processor, batch)
    if not isinstance(graph, ExportGraph) or not graph.inputs:
        raise ExportError(f"export: {type(getattr(task, 'task', task)).__name__}.export_graph returned "
                          f"{type(graph).__name__}, not an ExportGraph with inputs (see Task.export_graph).")
    graph.module.eval()
    return graph


def _seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    """The median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def export_other(task: Any, fmt: str, merged: Any, processor: Any, batch: dict[str, Any] | None, folder: Path,
                 quantize: str | None) -> dict[str, Any]:
    try:
        report = task.export_file(fmt, merged, processor, folder, {"quantize": quantize, "batch": batch})
    except NotImplementedError:
        raise ExportError(f"export: the task {task.name!r} lists {fmt} in export_formats but its export_file does "
                          f"not write it (see Task.export_file).") from None
    if not isinstance(report, dict):
        raise ExportError(f"export: {task.name!r}.export_file returned {type(report).__name__}, not a dict.")
    return report


def export_card(report: dict[str, Any], task: Task) -> str:
    """README.md of an exported folder: what it is, what was checked, how to run it."""
    fmt = report["format"]
    checks = report.get("checks") or {}
    lines = [f"# {report['task']} model exported as {fmt}", "",
             f"The finetune run `{Path(report['run']).name}` ({report['task']}, base `{report['backbone']}`"
             + (", LoRA adapter merged into the base weights" if report.get("merged") else "")
             + f") exported with `finetune export RUN --format {fmt}`.", ""]
    if report.get("backbone_source"):
        lines += [f"Base weights: {report['backbone_source']}.", ""]
    for note in report.get("merge_notes") or []:
        lines += [note, ""]
    if checks:
        lines += ["## Checked at export time", ""]
        lines += [f"- {key}: {value}" for key, value in checks.items()]
        lines += ["", f"Everything is recorded in `{EXPORT_FILE}`.", ""]
    lines += ["## Files", "", *[f"- `{name}`" for name in report.get("files", [])], ""]
    usage = report.get("usage")
    if usage:
        lang = "bash" if usage.lstrip().startswith(("#!", "llama", "./", "$")) else "python"
        lines += ["## How to run it", "", f"```{lang}", usage.rstrip(), "```", ""]
    for extra in report.get("usage_more", []) or []:
        lines += ["```bash", extra.rstrip(), "```", ""]
    return "\n".join(lines)
