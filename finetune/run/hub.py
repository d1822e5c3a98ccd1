"""Push a finished run to the Hugging Face Hub (or any Hub-compatible server) and pull it back.

What a repo holds (its root is a loadable adapter folder):

    adapter_config.json + adapter_model.safetensors   (an adapter method; trained.safetensors for none/full)
    tokenizer / processor files                       (what inference needs)
    finetune_task.json                                (task state, e.g. label names)
    recipe.toml                                       (the resolved recipe, local paths reduced to file names)
    metrics.json, curves.png, other run images
    README.md                                         (the run's model card: Hub YAML front matter + body)

The token comes from huggingface_hub's usual places (HF_TOKEN, the stored login) and is
never printed, logged or written. ``HF_ENDPOINT`` points the client at another server.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.engine.hub_access import describe_hub_error, endpoint, use_request_timeout
from finetune.engine.run_folder import RunDir, missing_run_folder
from finetune.errors import FinetuneError
from finetune.run.card import public_recipe

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(FinetuneError):
    """Pushing or pulling failed; nothing was half-written."""


def is_hub_id(value: str) -> bool:
    """Whether a command's argument names a Hub repo rather than a local folder: shaped ``user/name``, and
    neither it nor its first part (``runs`` of ``runs/sent``) is a folder here."""
    return bool(HUB_ID.match(value)) and not Path(value).exists() and not Path(value.split("/")[0]).is_dir()


def find_run(value: str) -> Path:
    """The run folder a command's RUN_DIR argument names: a local folder, or (when it is a Hub id, see
    :func:`is_hub_id`) the repo pulled from the Hub. A local path that does not exist is an error suggesting the
    nearest folders; a Hub id that cannot be pulled is an error saying both that no such folder is here and what
    the Hub answered."""
    if not is_hub_id(value):
        if not Path(value).exists():
            raise missing_run_folder(value)
        return Path(value)
    try:
        return pull(value)
    except HubError as exc:
        raise HubError(f"{value}: no folder of that name here; tried as a Hub repo id: {exc}") from None


# ---------------------------------------------------------------------------
# checks before pushing

def parse_front_matter(card: str) -> dict[str, Any]:
    import yaml

    if not card.startswith("---\n"):
        raise HubError("model card: README.md has no YAML front matter (--- ... ---).")
    end = card.find("\n---", 4)
    if end < 0:
        raise HubError("model card: the YAML front matter is not closed by a '---' line.")
    try:
        data = yaml.safe_load(card[4:end]) or {}
    except yaml.YAMLError as exc:
        raise HubError(f"model card: invalid YAML front matter: {exc}") from None
    if not isinstance(data, dict):
        raise HubError("model card: the front matter must be a YAML mapping.")
    return data


def validate_card(card: str) -> dict[str, Any]:
    """The checks the Hub (and users) need; returns the parsed front matter."""
    meta = parse_front_matter(card)
    problems = []
    if meta.get("library_name") not in ("peft", "transformers", "timm"):
        problems.append("library_name must be peft, transformers or timm")
    base = meta.get("base_model")
    if base is not None and not (isinstance(base, str) and HUB_ID.match(base)):
        problems.append(f"base_model {base!r} is not a Hub model id (a local path would be rejected)")
    for dataset in meta.get("datasets") or []:
        if not (isinstance(dataset, str) and HUB_ID.match(dataset)):
            problems.append(f"datasets entry {dataset!r} is not a Hub dataset id")
    if "finetune" not in (meta.get("tags") or []):
        problems.append("tags must include 'finetune'")
    for index in meta.get("model-index") or []:
        for result in index.get("results", []):
            for metric in result.get("metrics", []):
                value = metric.get("value")
                if not isinstance(value, (int, float)) or value != value:
                    problems.append(f"model-index metric {metric.get('type')!r} has no numeric value")
    if problems:
        raise HubError("model card failed validation: " + "; ".join(problems) + ".")
    return meta


def check_adapter(adapter_dir: Path) -> None:
    """Refuse an adapter that is missing, empty or all zero (e.g. lost after sharded training)."""
    from safetensors.torch import load_file

    files = [p for p in (adapter_dir / "adapter_model.safetensors", adapter_dir / "trained.safetensors") if p.exists()]
    if not files:
        raise HubError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors / trained.safetensors).")
    tensors = load_file(str(files[0]))
    if not tensors or all(t.numel() == 0 for t in tensors.values()):
        raise HubError(f"{files[0]}: the adapter is empty; refusing to push it.")
    if all(not t.abs().sum().item() for t in tensors.values()):
        raise HubError(f"{files[0]}: every tensor of the adapter is zero; refusing to push an untrained adapter.")
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    head = [t for k, t in tensors.items() if "lora_" not in k]
    if lora_b and all(not t.abs().sum().item() for t in lora_b) and not head:
        raise HubError(f"{files[0]}: all LoRA B matrices are zero: the adapter never trained; refusing to push.")


# ---------------------------------------------------------------------------
# staging and pushing

def stage_repo(run: RunDir, folder: Path) -> list[str]:
    """Copy what is pushed into ``folder``; returns the file names."""
    import tomli_w

    for item in run.adapter_dir.iterdir():
        if item.is_file() and item.name != "README.md":  # PEFT's auto card: ours replaces it
            shutil.copy2(item, folder / item.name)
    info = run.info()
    upstream = (info.get("backbone") or {}).get("upstream_id")
    (folder / "recipe.toml").write_text(tomli_w.dumps(public_recipe(run.resolved_recipe(), upstream)))
    for name in ("metrics.json", "README.md"):
        if (run.path / name).exists():
            shutil.copy2(run.path / name, folder / name)
    for image in run.path.glob("*.png"):
        shutil.copy2(image, folder / image.name)
    return sorted(p.name for p in folder.iterdir())


def push_run(run_path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
             create_pr: bool = False, allow_incomplete: bool = False, message: str | None = None) -> dict[str, Any]:
    """Push a run in one commit (or none, when nothing changed). Returns what happened."""
    from huggingface_hub import HfApi

    run = RunDir(run_path)
    if not run.path.exists():
        raise missing_run_folder(run.path)
    if not run.recipe_file.exists():
        raise HubError(f"{run.path}: not a finetune run folder (no recipe.toml).")
    if not HUB_ID.match(repo_id):
        raise HubError(f"--repo-id: {repo_id!r} is not a Hub repo id; use 'user/name'.")
    if not run.is_finished() and not allow_incomplete:
        raise HubError(f"{run.path}: the run did not finish (status {run.status!r}); finish or resume it, or pass "
                       "--allow-incomplete to push its best adapter so far.")
    check_adapter(run.adapter_dir)
    if not run.card_file.exists():
        raise HubError(f"{run.card_file}: no model card; the run must finish to write it "
                       "(or pass --allow-incomplete after a finished evaluation).")
    validate_card(run.card_file.read_text())
    use_request_timeout()
    api = HfApi(endpoint=endpoint())
    with tempfile.TemporaryDirectory(prefix="finetune-push-") as tmp:
        files = stage_repo(run, Path(tmp))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            before = _head(api, repo_id, revision)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                       commit_message=message or f"finetune: push run {run.path.name}")
        except FinetuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - network and HTTP errors become one clear message
            raise HubError(describe_hub_error(exc, "push to", repo_id)) from None
    changed = commit.oid != before
    run.update_info(pushed={"repo_id": repo_id, "revision": revision or "main", "commit": commit.oid,
                            "endpoint": endpoint() or "https://huggingface.co"})
    return {"repo_id": repo_id, "commit": commit.oid, "changed": changed, "files": files,
            "url": commit.commit_url, "pr_url": commit.pr_url}


def _head(api: Any, repo_id: str, revision: str | None) -> str | None:
    try:
        return api.model_info(repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001 - an empty new repo may have no revision yet
        return None


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Download a pushed finetune repo (into the Hugging Face cache); returns its local folder."""
    from huggingface_hub import snapshot_download

    if not HUB_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id ('user/name').")
    use_request_timeout()
    try:
        path = Path(snapshot_download(repo_id, revision=revision, endpoint=endpoint()))
    except Exception as exc:  # noqa: BLE001
        # With nothing cached, snapshot_download reports any failed request (an unreachable server, or its
        # HTTP 404 for a repo it does not have) as LocalEntryNotFoundError; what the Hub answered is the cause.
        if "LocalEntryNotFound" in type(exc).__name__ and exc.__cause__ is not None:
            exc = exc.__cause__
        raise HubError(describe_hub_error(exc, "pull", repo_id)) from None
    if not (path / "recipe.toml").exists() or not (path / "finetune_task.json").exists():
        raise HubError(f"{repo_id} is not a finetune model repo (no recipe.toml / finetune_task.json); load it with "
                       "plain peft/transformers instead.")
    return path
