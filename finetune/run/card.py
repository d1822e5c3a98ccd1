"""The model card (the run folder's README.md): one function writes it.

The Hub work extends this card rather than writing a second one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.engine.quantize import describe_line

#: the card's first sentence, by peft.method
_WHAT = {"lora": "A LoRA adaptation", "dora": "A DoRA (weight-decomposed LoRA) adaptation",
         "ia3": "An IA3 adaptation (learned scaling vectors)", "prompt-tuning": "A prompt-tuning adaptation",
         "prefix-tuning": "A prefix-tuning adaptation", "none": "A head-only fine-tune (frozen backbone)",
         "full": "A full fine-tune"}
#: the Hub tag of each method
_TAG = {"lora": "lora", "dora": "dora", "ia3": "ia3", "prompt-tuning": "prompt-tuning",
        "prefix-tuning": "prefix-tuning"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_model_card(*, recipe: dict[str, Any], task: Any, backbone: dict[str, Any], metrics: dict[str, Any],
                      lora: dict[str, Any], plugins: list[dict[str, str]], settings: dict[str, Any] | None = None,
                      speed: list[str] | None = None, quantization: dict[str, Any] | None = None) -> str:
    """Markdown with Hub-style YAML front matter, from the run's facts. ``settings``: the recipe keys the
    Training section shows (the ones set and the ones that matter, :mod:`finetune.run.recipe_view`; default:
    the whole recipe); ``speed``: the run's speed settings, one sentence each; ``quantization``: how the frozen
    base was quantized (run.json's record), if it was."""
    import tomli_w
    import yaml

    upstream = backbone.get("upstream_id")
    best = metrics.get("best", {})
    run_name = recipe.get("output", {}).get("dir", "run").rstrip("/").rsplit("/", 1)[-1]
    meta: dict[str, Any] = {}
    if upstream:
        meta["base_model"] = upstream
    meta["library_name"] = task.library_name
    if task.pipeline_tag:
        meta["pipeline_tag"] = task.pipeline_tag
    license_ = base_model_license(backbone.get("path"))
    if license_:
        meta["license"] = license_
    data = recipe.get("data", {})
    hub_dataset = data.get("dataset") if data.get("dataset") and data.get("dataset_revision") else None
    if hub_dataset:  # a Hub data set (its commit pinned): the card links it
        meta["datasets"] = [hub_dataset]
    method = recipe.get("peft", {}).get("method", "lora")
    meta["tags"] = ["finetune", task.name, _TAG.get(method, f"{method}-finetuning")]
    test = metrics.get("test", {})
    reported, split_name = (test, "test") if test else (best, "eval")
    results = [{"type": k, "name": f"{k} ({split_name} split)", "value": float(v)} for k, v in reported.items()
               if k not in ("step", "epoch") and isinstance(v, (int, float)) and v == v]
    if results:
        split_key = "dataset_test_split" if test else "dataset_eval_split"
        if hub_dataset:
            dataset = {"name": hub_dataset, "type": hub_dataset, "revision": data["dataset_revision"],
                       **({"config": data["dataset_config"]} if data.get("dataset_config") else {}),
                       **({"split": data[split_key]} if data.get(split_key) else {})}
        else:
            dataset = {"name": Path(str(data.get("train") or data.get("dataset") or "local data")).stem,
                       "type": "custom", "split": split_name}
        meta["model-index"] = [{"name": run_name, "results": [{
            "task": {"type": task.pipeline_tag or task.name},
            "dataset": dataset,
            "metrics": results}]}]
    front = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    lines = [f"# {run_name}", "",
             f"{_WHAT.get(method, 'A fine-tune')} of `{upstream or backbone.get('name')}` for **{task.name}**, "
             f"trained with {_finetune_link()}.", "",
             *results_section(metrics), "", "![curves](curves.png)", "",
              "## Training", "",
              f"- backbone: `{backbone.get('name')}` ({backbone.get('source')})",
              _trained_line(method, recipe.get("peft", {}), lora),
              *([describe_line(quantization)] if quantization else []),
              f"- trainable parameters: {lora.get('trainable_params'):,} of {lora.get('total_params'):,} "
              f"({100 * lora.get('trainable_params', 0) / max(1, lora.get('total_params', 1)):.2f}%)",
              f"- train examples: {metrics.get('data', {}).get('train_examples')}, eval examples: "
              f"{metrics.get('data', {}).get('eval_examples')}"
              + (f", test examples: {metrics['data']['test_examples']}"
                 if metrics.get("data", {}).get("test_examples") else ""),
              f"- wall time: {_fmt(metrics.get('train', {}).get('wall_time_s'))} s; mixed precision: "
              f"{metrics.get('train', {}).get('mixed_precision')}",
              f"- plugins: {', '.join(p['name'] + ' ' + p['version'] for p in plugins)}",
              *_speed_line(speed),
              "", "Settings (the ones the recipe sets and the ones that matter for this run; the run folder's "
              "recipe.toml has every key):" if settings is not None else "Recipe:", "",
              "```toml", tomli_w.dumps(public_recipe(settings if settings is not None else recipe, upstream)).strip(),
              "```", "",
              "## Usage", "", "```python", *task_usage_snippet(task, upstream or backbone.get("path")), "```", "",
              "## Limitations", "",
              "Trained on a small dataset; check the metrics above on data like yours before relying on it.", ""]
    return "\n".join(front + lines)


def _trained_line(method: str, peft: dict[str, Any], lora: dict[str, Any]) -> str:
    """The card's line saying what trained, by peft.method."""
    if method in ("lora", "dora", "ia3"):
        extras = [f"{k} = {peft[k]}" for k in ("use_rslora", "init", "loraplus_lr_ratio")
                  if method != "ia3" and peft.get(k) not in (None, False, "default")]
        converted = (" (saved converted to a plain LoRA of rank 2r for the original base weights)"
                     if peft.get("init") in ("pissa", "olora") else "")
        return (f"- {method} targets: `{lora.get('target_modules')}`{'; ' + ', '.join(extras) if extras else ''}"
                f"{converted}; trained in full: `{lora.get('modules_to_save')}`")
    if method in ("prompt-tuning", "prefix-tuning"):
        return f"- {method}: {peft.get('num_virtual_tokens')} trained virtual tokens; the model's weights unchanged"
    if method == "full":
        return "- trained: every parameter"
    return f"- trained: `{lora.get('modules_to_save')}`; the backbone frozen"


def public_recipe(recipe: dict[str, Any], upstream: str | None) -> dict[str, Any]:
    """The recipe as the card shows it and the Hub repo holds it: local paths reduced to file names (they mean
    nothing elsewhere), the backbone as its Hub id when known, no token."""
    import copy

    out = copy.deepcopy(recipe)
    for name, section in out.items():
        if not isinstance(section, dict):
            continue
        for key, value in section.items():
            if isinstance(value, str) and os.path.isabs(value) and (name, key) != ("model", "backbone"):
                section[key] = Path(value).name
    # The backbone becomes its Hub id when known; a private local backbone stays as written (only a
    # machine that has it can rebuild the model, and the card says the base is not on the Hub).
    if upstream:
        out.setdefault("model", {})["backbone"] = upstream
    if "output" in out:
        out["output"]["dir"] = "runs/" + Path(recipe.get("output", {}).get("dir", "run")).name
    out.get("hub", {}).pop("token", None)
    return out


def results_section(metrics: dict[str, Any]) -> list[str]:
    """The card's results table, each column saying on which split it was measured and how it was chosen."""
    best, last, before = metrics.get("best", {}), metrics.get("last", {}), metrics.get("before", {})
    test, baseline = metrics.get("test", {}), metrics.get("baseline", {})
    columns = [("before training (eval)", before)] if before else []
    columns += [("selected (eval)", best), ("last (eval)", last)]
    columns += [("test", test)] if test else []
    columns += [("baseline (eval)", baseline)] if baseline else []
    lines = ["## Results", "", "| metric | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key, value in best.items():
        if key in ("step", "epoch") or not isinstance(value, (int, float)):
            continue
        lines.append(f"| {key} | " + " | ".join(_fmt(values.get(key, "")) for _, values in columns) + " |")
    data = metrics.get("data", {})
    mode = "highest" if metrics.get("selection_mode", "max") == "max" else "lowest"
    lines += ["", f"- **eval** ({data.get('eval_examples', '?')} examples) is scored at every evaluation and "
              f"selects the best checkpoint: **selected** is the evaluation with the {mode} "
              f"`{metrics.get('selection_metric')}` (step {best.get('step')}, epoch {best.get('epoch')}), so it is "
              "optimistic; **last** is the last evaluation (step " + f"{last.get('step')})."]
    if before:
        lines.append("- **before training**: the untouched base model (with a new, untrained head where the task "
                     "has one) on the eval split, before the first optimizer step (step 0).")
    if test:
        lines.append(f"- **test** ({data.get('test_examples', '?')} examples) was never used to select the "
                     f"checkpoint or to stop early: it was scored once, after training, with the selected adapter "
                     f"(step {test.get('step')}). Quote this one.")
    else:
        lines.append("- No test split was held out (`data.test` / `data.test_split`), so every number above comes "
                     "from the split that selected the checkpoint.")
    if baseline.get("name"):
        lines.append(f"- **baseline**: {baseline['name']}, fitted on the train split and scored on the eval split.")
    return lines


def _speed_line(speed: list[str] | None) -> list[str]:
    """The speed settings in effect, by name (each note starts with its recipe key), in one line."""
    if not speed:
        return []
    names = ", ".join("`" + note.split(":", 1)[0] + "`" for note in speed)
    return [f"- speed settings: {names} (faster; results may differ slightly from plain training; run.json says "
            "how each works)"]


#: Overrides the project page the card links "finetune" to (an http(s) URL); see :func:`project_url`.
PROJECT_URL_ENV = "FINETUNE_PROJECT_URL"


def _finetune_link() -> str:
    url = project_url()
    return f"[finetune]({url})" if url else "finetune"


def project_url() -> str | None:
    """The page of this project: ``FINETUNE_PROJECT_URL`` when set (it must be a clean http(s) URL: checked
    before training, :func:`check_project_url`), else a Homepage/Repository/Source Project-URL of the
    installed ``finetune`` distribution when it is this project's (it has the ``finetune`` command), else
    None: the card then names finetune without a link. Never a guessed page: pypi.org/project/finetune
    belongs to an unrelated library of the same name."""
    import os

    override = os.environ.get(PROJECT_URL_ENV, "").strip()
    if override:
        return override if _url_problem(override) is None else None
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("finetune")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not any(ep.group == "console_scripts" and ep.value.startswith("finetune.cli") for ep in dist.entry_points):
        return None  # another distribution named finetune
    for entry in dist.metadata.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("homepage", "repository", "source", "source code") \
                and _url_problem(url.strip()) is None:
            return url.strip()
    return None


def check_project_url() -> None:
    """Refuse an unusable ``FINETUNE_PROJECT_URL`` before a run starts rather than drop it from the card."""
    import os

    from finetune.errors import RecipeError

    value = os.environ.get(PROJECT_URL_ENV, "").strip()
    problem = _url_problem(value) if value else None
    if problem:
        raise RecipeError(f"{PROJECT_URL_ENV}: {value!r} {problem}; the model card links 'finetune' to it. Set it to "
                          "this project's page, e.g. https://example.com/you/finetune, or unset it.")


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the card's link to this project, or None: it must be an http(s) URL with a host,
    hold nothing that would break a Markdown link, and not be PyPI's page of the unrelated 'finetune'."""
    from urllib.parse import urlsplit

    if not url.isprintable() or any(c in url for c in ' <>()[]"\'\\`'):
        return "holds spaces, quotes, brackets or control characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host"
    if parts.hostname.endswith("pypi.org") and parts.path.rstrip("/").lower() == "/project/finetune":
        return "is PyPI's page of an unrelated library that is also called finetune"
    return None


def task_usage_snippet(task: Any, base: str) -> list[str]:
    snippet = task.usage_snippet(base)
    if snippet:
        return snippet.splitlines()
    return ["from peft import PeftModel", "# load the base model for this task, then:",
            "model = PeftModel.from_pretrained(base_model, 'adapter')"]


def base_model_license(path: str | None) -> str | None:
    """The license declared in the base model folder's own model card, when there is one."""
    if not path:
        return None
    card = Path(path) / "README.md"
    if not card.exists():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None
