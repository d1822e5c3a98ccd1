"""Loading a finished (or running) run for inference: the task, the model with its best adapter, the processor."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.contract.recipe import is_adapter_method
from finetune.contract.task import Task
from finetune.engine.backbones import resolve_backbone
from finetune.engine.plugins import get_registry
from finetune.engine.quantize import check_quantization, keep_training_layout
from finetune.engine.recipe_file import apply_overrides, validate_recipe
from finetune.engine.run_folder import RunDir, missing_run_folder
from finetune.errors import FinetuneError, RecipeError, RunError
from finetune.run.adapter import TASK_STATE_FILE, TRAINED_WEIGHTS_FILE, load_trained_weights


def load_run(run_path: str | Path, overrides: list[str] | None = None, *, trust_remote_code: bool = False,
             announce: Callable[[str], None] | None = None,
             full_precision: bool = False) -> tuple[Task, Any, Any, RunDir]:
    """``(task, model, processor, run)`` from a run folder's best adapter, ready for ``task.predict``.

    The task is built from the run's resolved recipe, its ``state`` restored from
    ``adapter/finetune_task.json`` *before* ``load_model`` is called; the model (eval mode) carries the
    adapter (or, for ``peft.method = "none"/"full"``, the trained weights). ``overrides``
    (``SECTION.KEY=VALUE``) change prediction-time settings of the run's recipe. The task is guarded like
    in training: its errors and bad return values name its plugin.

    A run folder may come from elsewhere (``finetune pull``, a copied folder), so its recipe never turns
    on remote code by itself: when the run's backbone needs its own modelling code, the caller's
    ``trust_remote_code=True`` (the user's ``--trust-remote-code``) or the user's own override
    ``model.trust_remote_code=true`` is required. The backbone is the run's pinned revision (downloaded
    when online and not cached); ``announce`` hears about a download first.

    A run trained on a quantized base (``model.quantize``) loads it quantized again, as it trained (bitsandbytes
    is checked first); ``full_precision=True`` loads the full-precision base instead, the one to merge the
    adapter into (merging into 4-bit weights would round the update away)."""
    from peft import PeftModel

    run = RunDir(run_path)
    if not run.path.exists():
        raise missing_run_folder(run.path)
    if not run.recipe_file.exists():
        raise RunError(f"{run.path}: not a finetune run folder (no recipe.toml).")
    if not (run.adapter_dir / TASK_STATE_FILE).exists():
        raise RunError(f"{run.path}: has no trained adapter yet (adapter/ is missing); "
                       "train first, or wait for the first evaluation.")
    registry = get_registry()
    raw = run.resolved_recipe()
    wanted = bool(raw.get("model", {}).get("trust_remote_code"))
    raw.setdefault("model", {})["trust_remote_code"] = False  # the run's own say does not count
    recipe = validate_recipe(apply_overrides(raw, overrides or []), registry.get_task)
    if trust_remote_code:
        recipe.model.trust_remote_code = True
    if wanted and not recipe.model.trust_remote_code:
        raise RecipeError(
            f"{run.path}: this run was trained with model.trust_remote_code = true: its backbone "
            f"{recipe.model.backbone!r} runs its own modelling code on this machine when it loads. A run folder "
            "does not turn that on by itself; if you trust that code, pass --trust-remote-code.")
    if full_precision:
        recipe.model.quantize, recipe.model.quant_type, recipe.model.double_quant = "none", "nf4", True
    task = registry.create_task(recipe)
    check_quantization(recipe, task)
    saved = json.loads((run.adapter_dir / TASK_STATE_FILE).read_text())
    task.state = saved.get("state", {})
    backbone = resolve_backbone(recipe.model.backbone, recipe.model.trust_remote_code, registry=registry,
                                revision=recipe.model.revision, allow_pickled=recipe.model.allow_pickled_weights,
                                announce=announce)
    model, processor = task.load_model(backbone)
    keep_training_layout(model)  # a 4-bit base: bitsandbytes' CPU repacking fails on small layers
    if is_adapter_method(recipe.peft.method):
        model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    else:
        load_trained_weights(model, run.adapter_dir / TRAINED_WEIGHTS_FILE)
    model.eval()
    return task, model, processor, run


# -- faster inference: the adapter merged, bf16 where it agrees with fp32 ---------------------------------------

def merge_for_inference(model: Any) -> str:
    """Fold the adapter into the base weights in place (``PeftModel.merge_adapter``: LoRA's ``W + BA`` computed
    once, so a forward pass has no extra matmuls; the model stays a ``PeftModel``, so a task that asks it for
    its base model still can). Returns what was done, in words. Not merged: no adapter (full or head-only
    training), prompt or prefix tuning (nothing to fold), a quantized base (merging would round the adapter
    into 4/8-bit weights)."""
    if not hasattr(model, "merge_adapter"):
        return "no adapter to merge (the trained weights are the model's)"
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(config, "is_prompt_learning", False):
        return "not merged (prompt or prefix tuning: the adapter is virtual tokens, not a change of weights)"
    base = model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_4bit", False) or \
            getattr(base, "is_loaded_in_8bit", False):
        return "not merged (a quantized base: folding the adapter in would round it to the quantized weights)"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about merging; the result is checked by the tests
        model.merge_adapter()
    return "adapter merged into the weights"


#: bf16 is used for ``--precision auto`` only when, on the run's eval rows, at least this share of the discrete
#: predictions (labels, label sets) equal fp32's ...
MIN_LABEL_AGREEMENT = 0.99
#: ... and no probability / score differs from fp32's by more than this (a value such as ``pred_value`` by more
#: than this share of the range of fp32's values).
MAX_PROB_DIFFERENCE = 0.05
#: ``--precision int8`` needs the same label agreement, and bounds the probabilities more loosely: int8 rounds
#: every activation of a batch to one of 256 levels, which moves a few probabilities by more than bf16 does
#: (measured on SMS texts, MiniLM: mean 0.003 and 99th percentile 0.047 over 1,000 texts, largest 0.14 over 2,000
#: and 0.16 on the run's 256 eval rows; labels 0.999-1.0 the same: benchmarks/README.md).
#: The bound catches a quantization that went wrong, not that rounding.
MAX_INT8_PROB_DIFFERENCE = 0.2
#: What :func:`quantize_int8` does, in the kept check's key.
INT8_METHOD = "quantize_dynamic qint8, per-channel weights, modules_to_save in fp32"
#: Eval rows the check predicts twice (fp32, bf16 or int8).
CHECK_ROWS = 256
#: Prediction fields the check compares; a task with other fields (text, boxes, masks) is predicted in fp32.
CHECKED_FIELDS = ("pred_label", "pred_labels", "pred_score", "pred_value")


@dataclass
class Agreement:
    """bf16's predictions against fp32's on the same rows."""

    rows: int
    label_agreement: float  # share of rows whose discrete fields (pred_label, pred_labels) are equal
    max_prob_difference: float  # largest |bf16 - fp32| of prob_* and pred_score, or of pred_value / its range

    def describe(self) -> str:
        return (f"on {self.rows} eval rows: label agreement {self.label_agreement:.4f}, max probability "
                f"difference {self.max_prob_difference:.4f}")


def compare_predictions(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> Agreement:
    """How far ``other``'s predictions are from ``reference``'s (same records, same order)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("compare_predictions needs the same, non-empty rows on both sides")
    same, diff = 0, 0.0
    values = [(r["pred_value"], o["pred_value"]) for r, o in zip(reference, other) if "pred_value" in r]
    spread = (max(v for v, _ in values) - min(v for v, _ in values)) if values else 0.0
    for ref, got in zip(reference, other):
        same += all(ref.get(k) == got.get(k) for k in ("pred_label", "pred_labels"))
        for key, value in ref.items():
            if key.startswith("prob_") or key == "pred_score":
                diff = max(diff, abs(float(value) - float(got[key])))
            elif key == "pred_value":
                diff = max(diff, abs(float(value) - float(got[key])) / (spread or 1.0))
    return Agreement(len(reference), same / len(reference), diff)


def choose_precision(agreement: Agreement | None, why_not: str = "", low: str = "bf16") -> tuple[str, str]:
    """``(low | "fp32", reason)`` from the check of ``low`` (``bf16`` for ``--precision auto``, ``int8`` for
    ``--precision int8``) against fp32 (None: not checked, for ``why_not``)."""
    if agreement is None:
        return "fp32", f"fp32 ({why_not})"
    bound = MAX_INT8_PROB_DIFFERENCE if low == "int8" else MAX_PROB_DIFFERENCE
    ok = agreement.label_agreement >= MIN_LABEL_AGREEMENT and agreement.max_prob_difference <= bound
    if ok:
        return low, f"{low} (agrees with fp32 {agreement.describe()})"
    return "fp32", (f"fp32: {low} was checked and does not agree well enough with fp32 ({agreement.describe()}; "
                    f"needed: label agreement >= {MIN_LABEL_AGREEMENT}, max probability difference <= "
                    f"{bound}); fell back to fp32")


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Intel AMX): where bf16 inference pays on a CPU."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def quantize_int8(model: Any, inplace: bool = False) -> Any:
    """``model`` with its ``torch.nn.Linear`` layers replaced by dynamically quantized ones
    (``torch.ao.quantization.quantize_dynamic``: int8 weights with a scale per output channel, each batch's
    activations quantized on the fly; fbgemm's int8 kernels, VNNI where the CPU has it). A copy unless
    ``inplace``. Kept in fp32: embeddings, layer norms, and the layers PEFT saves whole (``modules_to_save``:
    the task's head, e.g. ``classifier`` and ``pooler``), which are small and where rounding moves the
    probabilities most (measured: benchmarks/README.md). CPU only."""
    import warnings

    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # a torch without eager-mode quantization
        raise RuntimeError(f"this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic") from exc
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not {"modules_to_save", "original_module"} & set(name.split("."))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao is its successor)
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=inplace)


def inference_precision(task: Task, model: Any, processor: Any, run: RunDir, setting: str,
                        batch_size: int = 64, overrides: list[str] | None = None) -> tuple[Any, str]:
    """The model to predict with and a sentence saying which precision and why. ``setting``: ``fp32`` (as
    trained), ``bf16`` (a bf16 copy, unchecked), ``auto`` (bf16 only on a CPU with AMX, for a task whose
    predictions the check can compare, when bf16's predictions on the run's first :data:`CHECK_ROWS` eval rows
    agree with fp32's (:func:`choose_precision`)), ``int8`` (the Linear layers dynamically quantized to int8
    (:func:`quantize_int8`), on a CPU, under the same check as bf16's; fp32 where it does not agree). A check's
    result is kept in the run folder, ``predict_precision.json``, and reused while the adapter, torch and the
    CPU stay the same."""
    import torch

    if setting == "fp32":
        return model, "fp32"
    if setting == "bf16":
        return model.to(torch.bfloat16), "bf16 (--precision bf16: not checked against fp32)"
    low = "int8" if setting == "int8" else "bf16"
    on_cpu = next(model.parameters()).device.type == "cpu"
    if low == "int8" and not on_cpu:
        return model, "fp32 (--precision int8: dynamic int8 quantization runs on CPUs only)"
    if low == "bf16" and (torch.cuda.is_available() or not on_cpu):
        return model, "fp32 (--precision auto picks bf16 only on CPUs with AMX)"
    if low == "bf16" and not cpu_has_amx():
        return model, "fp32 (this CPU has no AMX: bf16 would be slower)"
    fields = set(getattr(task, "prediction_fields", {}) or {})
    if not fields or any(f not in CHECKED_FIELDS and not f.startswith("prob_") for f in fields):
        return model, f"fp32 (this task's predictions are not compared by the {low} check)"
    if low == "int8":
        try:
            convert = quantize_int8
            convert(torch.nn.Sequential(torch.nn.Linear(2, 2)))  # fails fast where torch cannot quantize
        except Exception as exc:  # noqa: BLE001 - any failure: predict in fp32 and say why
            return model, f"fp32 (int8 is not available here: {type(exc).__name__}: {exc})"
    else:
        import copy

        def convert(m: Any) -> Any:
            return copy.deepcopy(m).to(torch.bfloat16)

    key = {**_check_key(run), "overrides": list(overrides or [])}
    if low == "int8":
        key["method"] = INT8_METHOD  # a result checked with another quantization is not reused
    cached = _read_check(run, low, key)
    converted = None
    if cached is not None:
        agreement = Agreement(**cached)
    else:
        records, why = _eval_records(task)
        if not records:
            return model, f"fp32 ({low} not checked: {why})"
        from finetune.run.predictions import predict_records

        reference = predict_records(task, model, processor, records, batch_size)
        converted = convert(model)
        agreement = compare_predictions(reference, predict_records(task, converted, processor, records, batch_size))
        _write_check(run, low, key, agreement)
    precision, reason = choose_precision(agreement, low=low)
    if precision == "fp32":
        return model, reason
    if low == "int8":
        return (converted if converted is not None else quantize_int8(model, inplace=True)), reason
    del converted
    return model.to(torch.bfloat16), reason


def prepare_for_inference(task: Task, model: Any, processor: Any, run: RunDir, *, precision: str = "auto",
                          batch_size: int = 32, merge: bool = True,
                          overrides: list[str] | None = None) -> tuple[Any, str]:
    """What ``finetune predict`` and ``finetune serve`` both do to a loaded run (:func:`load_run`) before its
    first prediction: the adapter folded into the weights (:func:`merge_for_inference`; ``merge=False`` keeps it
    apart) and the precision chosen (:func:`inference_precision`; the check's result is kept per run folder,
    so predict and serve share it). Returns the model to predict with and one sentence saying what was done."""
    merged = merge_for_inference(model) if merge else "adapter kept apart (--no-merge)"
    model, chosen = inference_precision(task, model, processor, run, precision, batch_size, list(overrides or []))
    return model, f"{merged}; {chosen}"


def _eval_records(task: Task) -> tuple[list[dict[str, Any]], str]:
    saved = task.state
    try:
        examples = task.prepare_data().eval
    except FinetuneError as exc:
        return [], f"the run's eval data cannot be read: {exc}"
    finally:
        task.state = saved
    columns = task.predict_input_columns()
    if examples is None or not hasattr(examples, "to_dict") or any(c not in examples for c in columns):
        return [], "the run has no eval table to check on"
    return examples[columns].head(CHECK_ROWS).to_dict(orient="records"), "the eval split is empty"


CHECK_FILE = "predict_precision.json"


def _check_key(run: RunDir) -> dict[str, Any]:
    import platform

    import torch

    files = sorted(p for p in run.adapter_dir.iterdir() if p.is_file())
    return {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "rows": CHECK_ROWS,
            "adapter": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _read_check(run: RunDir, low: str, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        saved = json.loads((run.path / CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None
    entry = saved.get(low) if isinstance(saved, dict) else None
    return entry.get("agreement") if isinstance(entry, dict) and entry.get("key") == key else None


def _write_check(run: RunDir, low: str, key: dict[str, Any], agreement: Agreement) -> None:
    """Kept per precision checked (``{"bf16": {"key", "agreement"}, "int8": ...}``)."""
    path = run.path / CHECK_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved = {k: v for k, v in saved.items() if k in ("bf16", "int8")} if isinstance(saved, dict) else {}
    saved[low] = {"key": key, "agreement": asdict(agreement)}
    try:  # a read-only run folder (a pulled one, a shared disk) just checks again next time
        path.write_text(json.dumps(saved, indent=1))
    except OSError:
        pass
