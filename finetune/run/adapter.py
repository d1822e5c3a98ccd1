"""The adapter folder: writing it (atomically, verified complete), and loading its weights back.

``adapter/`` holds PEFT's ``save_pretrained`` output for an adapter method (LoRA, DoRA, IA3, prompt or prefix
tuning: ``adapter_model.safetensors``), or ``trained.safetensors`` for ``peft.method = "none"/"full"``, plus
the processor and the task's state (``finetune_task.json``). A LoRA initialised with pissa/olora is saved
converted to a plain LoRA of rank 2r that applies to the original base (PEFT's documented conversion).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.contract.recipe import is_adapter_method
from finetune.contract.task import Task
from finetune.engine.checkpoint import check_complete
from finetune.engine.run_folder import RunDir, replace_dir_atomic
from finetune.errors import RunError

TASK_STATE_FILE = "finetune_task.json"
TRAINED_WEIGHTS_FILE = "trained.safetensors"  # peft.method "none"/"full": the weights that changed


def save_trained_weights(model: Any, path: Path, method: str, state_dict: dict[str, Any] | None = None) -> None:
    """Trainable parameters and the trained modules' persistent buffers (for full fine-tuning, every buffer,
    such as BatchNorm statistics).
    ``state_dict``: the full state dict gathered from a sharded model, used instead of the model's own."""
    from safetensors.torch import save_file

    full = state_dict if state_dict is not None else model.state_dict()
    if method == "full":  # every weight and persistent buffer (BatchNorm statistics, ...), a tied one once
        tensors = {n: t.detach().cpu().contiguous() for n, t in untied(full).items()}
    elif state_dict is None:  # and the trained modules' persistent buffers (a training BatchNorm's statistics)
        from finetune.engine.checkpoint import trainable_state_dict

        tensors = trainable_state_dict(model)
    else:
        from finetune.engine.checkpoint import trained_buffer_names

        names = [n for n, p in model.named_parameters() if p.requires_grad] + trained_buffer_names(model)
        names = [n.replace("_fsdp_wrapped_module.", "") for n in names]  # FSDP's wrapper prefixes
        tensors = {n: state_dict[n].detach().cpu().contiguous() for n in names if n in state_dict}
    save_file(tensors, str(path))


def untied(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the second and later names of a tensor it holds twice (a tied weight: a causal LM's
    ``lm_head.weight`` is its ``embed_tokens.weight``): safetensors refuses two names for one tensor, and the
    model ties them again when the first name loads."""
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def load_trained_weights(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RunError(f"{path}: weights do not fit the model (unexpected {result.unexpected_keys[:3]}...).")


ADAPTER_FILE = "adapter_model.safetensors"


def restore_selected_state(run: RunDir, task: Any) -> None:
    """Set ``task.state`` to the state saved with the run's selected adapter (``adapter/finetune_task.json``):
    what a task tunes at each evaluation (thresholds, ...) then goes with the selected weights."""
    saved = run.adapter_dir / TASK_STATE_FILE
    if saved.is_file():
        task.state = json.loads(saved.read_text(encoding="utf-8")).get("state", task.state)


def unconvert_lora(tensors: dict[str, Any]) -> dict[str, Any]:
    """A pissa/olora adapter saved converted (``A' = [A; A0]``, ``B' = [B, -B0]``, PEFT's
    ``subtract_mutated_init``) back to the trained ``A`` and ``B`` that fit the model being trained."""
    out = dict(tensors)
    for name, tensor in tensors.items():
        if "lora_A" in name:
            out[name] = tensor[: tensor.shape[0] // 2]
        elif "lora_B" in name:
            out[name] = tensor[:, : tensor.shape[1] // 2]
    return out


def best_adapter_loader(run: RunDir, method: str, task: Any = None, converted: bool = False):
    """``load(unwrapped_model)``: put the run folder's saved (best) adapter weights back into the model that
    trained them, and the task's state saved with them back into ``task``, e.g. to score the test split with
    the selected adapter after training. ``converted``: the adapter was saved converted from pissa/olora."""

    def load(model: Any) -> None:
        if task is not None:
            restore_selected_state(run, task)
        if not is_adapter_method(method):
            load_trained_weights(model, run.adapter_dir / TRAINED_WEIGHTS_FILE)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        tensors = load_file(str(run.adapter_dir / ADAPTER_FILE))
        result = set_peft_model_state_dict(model, unconvert_lora(tensors) if converted else tensors)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise RunError(f"{run.adapter_dir / ADAPTER_FILE}: weights do not fit the model (unexpected "
                           f"{unexpected[:3]}...).")

    return load


def expected_adapter_tensors(model: Any, method: str, converted: bool = False) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor the saved adapter must hold, taken from the whole (not yet
    sharded) model: PEFT's adapter state dict for an adapter method (``converted``: a pissa/olora LoRA saved
    as a plain LoRA of twice the rank), else what :func:`save_trained_weights` writes."""
    if is_adapter_method(method):
        from peft import get_peft_model_state_dict

        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        if converted:
            for name, shape in shapes.items():
                axis = 0 if "lora_A" in name else 1 if "lora_B" in name else None
                if axis is not None:
                    shapes[name] = (*shape[:axis], 2 * shape[axis], *shape[axis + 1:])
        return shapes
    if method == "full":
        return {n: tuple(t.shape) for n, t in untied(model.state_dict()).items()}
    from finetune.engine.checkpoint import trained_buffer_names

    buffers = dict(model.named_buffers())
    return {**{n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad},
            **{n: tuple(buffers[n].shape) for n in trained_buffer_names(model)}}


def verify_adapter(folder: Path, method: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Reload the weights file just written to ``folder`` and check it against ``expected``
    (every tensor present, non-empty, right shape); a RunError names what is missing."""
    from safetensors import safe_open

    name = ADAPTER_FILE if is_adapter_method(method) else TRAINED_WEIGHTS_FILE
    try:  # shapes from the file's header: nothing but the header is read
        with safe_open(str(folder / name), framework="pt") as fh:
            tensors = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - a missing or truncated file
        raise RunError(f"the adapter was not written completely ({name}: {type(exc).__name__}: {exc}); the "
                       "previous adapter is intact.") from None
    check_complete(tensors, expected, f"adapter ({name})")


def name_base_model(card: Path, upstream_id: str | None) -> None:
    """PEFT's ``README.md`` beside the adapter names the base model by the folder it was loaded from (a path on
    this machine, meaningless elsewhere and refused by the Hub), in ``base_model`` and in a
    ``base_model:adapter:PATH`` tag: name its Hub id instead, as the run's model card does, or no base model
    when it has none."""
    import yaml

    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    end = text.find("\n---", 4) if text.startswith("---\n") else -1
    if end < 0:
        return
    meta = yaml.safe_load(text[4:end]) or {}
    if not isinstance(meta, dict):
        return
    if upstream_id:
        meta["base_model"] = upstream_id
    else:
        meta.pop("base_model", None)
    if isinstance(meta.get("tags"), list):
        tags = [tag for tag in meta["tags"] if not str(tag).startswith("base_model:")]
        relations = [str(tag).split(":")[1] for tag in meta["tags"] if str(tag).startswith("base_model:")]
        meta["tags"] = [*(f"base_model:{relation}:{upstream_id}" for relation in relations if upstream_id), *tags]
    card.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + text[end + 1:], encoding="utf-8")


def save_converted(model: Any, folder: Path, initial_adapter: str, state_dict: dict[str, Any] | None) -> None:
    """Save a pissa/olora LoRA the way PEFT documents it (``path_initial_model_for_weight_conversion``): as a
    plain LoRA of rank 2r for the ORIGINAL base weights. PEFT's conversion keeps only the LoRA tensors, so the
    modules trained in full (the task head) are added back from the model's adapter state dict."""
    import warnings

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    with warnings.catch_warnings():  # PEFT warns that PiSSA/OLoRA change the base: what this conversion undoes
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
        model.save_pretrained(str(folder), state_dict=state_dict,
                              path_initial_model_for_weight_conversion=initial_adapter)
    saved = load_file(str(folder / ADAPTER_FILE))
    adapter = get_peft_model_state_dict(model, state_dict=state_dict)
    others = {k: v.detach().cpu().contiguous() for k, v in adapter.items()
              if "lora_A" not in k and "lora_B" not in k and k not in saved}
    if others:
        save_file({**saved, **others}, str(folder / ADAPTER_FILE), metadata={"format": "pt"})


def adapter_writer(run: RunDir, task: Task, processor: Any, method: str,
                   expected: dict[str, tuple[int, ...]] | None = None, base_model: str | None = None,
                   initial_adapter: str | None = None):
    """``save(unwrapped_model, state_dict=None)``: write the adapter to a temp folder, verify it holds
    every trained tensor (``expected``), then swap it in; on any failure the previous adapter stays.
    ``state_dict`` is the full state dict gathered from a sharded model (FSDP/DeepSpeed). ``base_model``:
    the backbone's Hub id, which PEFT's README.md names instead of the local folder it loaded
    (:func:`name_base_model`). ``initial_adapter``: a pissa/olora LoRA as initialised (the engine's
    ``LoraReport.initial_adapter``): the adapter is saved converted to a plain LoRA for the original base."""
    import shutil

    def save(unwrapped_model: Any, state_dict: dict[str, Any] | None = None) -> None:
        tmp = run.path / f".adapter.tmp-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            if state_dict is not None:  # gathered from a sharded model: every trained tensor must be in it
                trained = [n.replace("_fsdp_wrapped_module.", "") for n, p in unwrapped_model.named_parameters()
                           if p.requires_grad]
                missing = [n for n in trained if n not in state_dict]
                if missing:
                    raise RunError(f"the adapter is incomplete: {len(missing)} of {len(trained)} trained tensors "
                                   f"are missing from the gathered state dict ({', '.join(missing[:5])}). It was "
                                   "not written; the previous one is intact. This happens when weights are taken "
                                   "from one shard of a sharded (FSDP/DeepSpeed) model; please report it with the "
                                   "recipe's [distributed] section.")
            if is_adapter_method(method):
                try:
                    if initial_adapter:
                        save_converted(unwrapped_model, tmp, initial_adapter, state_dict)
                    else:
                        unwrapped_model.save_pretrained(str(tmp), state_dict=state_dict)
                    name_base_model(tmp / "README.md", base_model)
                    if base_model:  # what a pushed adapter's AutoPeftModel... loads, not a path on this machine
                        config = json.loads((tmp / "adapter_config.json").read_text())
                        config["base_model_name_or_path"] = base_model
                        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
                except KeyError as exc:  # PEFT looks up each adapter tensor in the (gathered) state dict
                    raise RunError(f"the adapter is incomplete: {exc} is missing from the model's state dict. "
                                   "It was not written; the previous one is intact. This happens when weights are "
                                   "taken from one shard of a sharded (FSDP/DeepSpeed) model; please report it "
                                   "with the recipe's [distributed] section.") from None
            else:
                save_trained_weights(unwrapped_model, tmp / TRAINED_WEIGHTS_FILE, method, state_dict=state_dict)
            if processor is not None and hasattr(processor, "save_pretrained"):
                processor.save_pretrained(str(tmp))
            (tmp / TASK_STATE_FILE).write_text(json.dumps({"task": task.name, "state": task.state}, indent=2))
            if expected is not None:
                verify_adapter(tmp, method, expected)
            replace_dir_atomic(tmp, run.adapter_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = "the previous adapter is intact; " if run.adapter_dir.exists() else ""
            raise RunError(f"cannot write the adapter to {run.adapter_dir} ({exc.strerror or exc}); {kept}the run "
                           "resumes from its last checkpoint with --resume once the folder is writable and has "
                           "space.") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return save
