"""Reaching the Hugging Face Hub (or any Hub-compatible server, ``HF_ENDPOINT``) for backbones and data sets.

Online, a model or data set that no plugin serves and no cache holds is downloaded: one metadata
request says which commit a revision is and which files it holds; only the files a run needs are
fetched (safetensors weights, configs, tokenizer and processor files; modelling code only with
``trust_remote_code``; pickled weights only when the recipe allows them), into the standard Hugging Face
cache, resumably, with a progress bar. Offline (``HF_HUB_OFFLINE=1``) or when the server cannot be
reached, it fails within seconds: every request has a time limit and nothing is retried for minutes.
``HF_TOKEN`` / a stored login, ``HF_HOME`` and ``HF_HUB_CACHE`` are honoured by huggingface_hub itself;
the token is never printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: File name endings that hold pickled weights (loading one can run code; refused unless allowed).
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Other weight formats a run does not load: never downloaded.
OTHER_WEIGHTS = (".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ot", ".tflite", ".mlmodel", ".keras")
#: Seconds for one metadata request (the revision's commit and file list).
METADATA_TIMEOUT_S = 10.0


def endpoint() -> str | None:
    """The Hub server from ``HF_ENDPOINT`` (None: huggingface.co)."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_url() -> str:
    return (endpoint() or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: use the cache only, never the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def use_request_timeout() -> float:
    """Give every Hub request a time limit (huggingface_hub's client has none by default, so a server
    that stops answering would hang forever). ``FINETUNE_HUB_TIMEOUT`` seconds, default 60; connecting
    gets at most 10 s of it."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    seconds = float(os.environ.get("FINETUNE_HUB_TIMEOUT") or 60)
    timeout = httpx2.Timeout(seconds, connect=min(seconds, 10.0))
    set_client_factory(lambda: httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook]},
                                             follow_redirects=True, timeout=timeout))
    return seconds


def describe_hub_error(exc: Exception, verb: str, repo_id: str, nothing: str = "Nothing was changed") -> str:
    """A one-paragraph message for an HTTP or network failure; never includes the token."""
    where = hub_url()
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    name = type(exc).__name__
    if "RepositoryNotFound" in name or (status == 404 and "Revision" not in name and "Entry" not in name):
        return (f"could not {verb} {repo_id}: {where} has no such repository (HTTP 404), or it is private and no "
                "token with access is set (HF_TOKEN, or `huggingface-cli login`). Check the name.")
    if "RevisionNotFound" in name:
        return f"could not {verb} {repo_id}: {where} has no such revision (branch, tag or commit) of it."
    if "GatedRepo" in name:
        return (f"could not {verb} {repo_id}: it is gated on {where}; accept its conditions on its page, then set "
                "HF_TOKEN to a token of that account.")
    if status in (401, 403):
        hint = ("the server refused the credentials: set HF_TOKEN to a token with access, or run "
                "`huggingface-cli login`" if status == 401 else
                "the token has no permission for this repo (wrong namespace, or a read-only token)")
        return f"could not {verb} {repo_id} at {where}: HTTP {status}: {hint}. {nothing}."
    if status is not None:
        return f"could not {verb} {repo_id} at {where}: the server answered HTTP {status}. {nothing}; try again later."
    if "Offline" in name:
        return f"could not {verb} {repo_id}: HF_HUB_OFFLINE is set, so nothing is downloaded."
    if "Timeout" in name:
        return f"could not {verb} {repo_id}: {where} did not answer in time ({name}). {nothing}; retry."
    if "Connect" in name or "Network" in name or isinstance(exc, OSError):
        return (f"could not {verb} {repo_id}: cannot reach {where} ({name}). Check the network or HF_ENDPOINT. "
                f"{nothing}.")
    return f"could not {verb} {repo_id} at {where}: {name}: {exc}"


@dataclass
class DownloadPlan:
    """What a download of one repo revision will fetch (said before anything is downloaded)."""

    repo_id: str
    repo_type: str  #: "model" or "dataset"
    commit: str  #: the revision's commit hash (what the run folder records)
    files: dict[str, int | None] = field(default_factory=dict)  #: file -> size in bytes (None: unknown)
    revision: str | None = None  #: the branch or tag asked for (None: main), remembered in the cache

    @property
    def total_bytes(self) -> int:
        return sum(size or 0 for size in self.files.values())

    def describe(self) -> str:
        return (f"{self.repo_id} at commit {self.commit[:8]} from {hub_url()}: {len(self.files)} files, "
                f"{_size(self.total_bytes)}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def repo_files(repo_id: str, revision: str | None, repo_type: str = "model") -> tuple[str, dict[str, int | None]]:
    """``(commit, {file: size})`` of a revision, from one metadata request (time-limited)."""
    from huggingface_hub import HfApi

    use_request_timeout()
    api = HfApi(endpoint=endpoint())
    info = (api.model_info(repo_id, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT_S)
            if repo_type == "model" else
            api.dataset_info(repo_id, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT_S))
    files = {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}
    return info.sha, files


def model_files(files: dict[str, int | None], trust_remote_code: bool, allow_pickled: bool,
                repo_id: str) -> tuple[dict[str, int | None], str | None]:
    """The files a run loads from a model repo, and why the repo is refused (None: it is not).

    Files at the repo's root (what ``from_pretrained(folder)`` reads; sub-folders hold other variants
    such as onnx/): safetensors weights when there are any (pickled ones are then skipped), else pickled
    weights only with ``allow_pickled``; configs, tokenizer and processor files, templates and the model
    card; ``*.py`` (modelling code) only with ``trust_remote_code``; other weight formats never."""
    root = [n for n in files if "/" not in n]
    has_safetensors = any(n.endswith(".safetensors") for n in root)
    pickled = [n for n in root if n.endswith(PICKLED)]
    if not has_safetensors and pickled and not allow_pickled:
        return {}, (f"model.backbone: {repo_id} has only pickled weights ({', '.join(pickled[:3])}); loading a "
                    "pickle can run code. Set model.allow_pickled_weights = true to load them anyway (with "
                    "torch.load(weights_only=True)), or choose a repo with safetensors weights.")
    if not has_safetensors and not pickled:
        return {}, (f"model.backbone: {repo_id} holds no weights finetune loads (safetensors, or pickled with "
                    f"model.allow_pickled_weights = true); its files: {', '.join(root[:8]) or 'none'}.")
    chosen = {}
    for name in root:
        if name.endswith(OTHER_WEIGHTS) or (name.endswith(PICKLED) and has_safetensors):
            continue
        if name.endswith(".py") and not trust_remote_code:
            continue
        chosen[name] = files[name]
    return chosen, None


def download(plan: DownloadPlan) -> Path:
    """Fetch the plan's files into the Hugging Face cache (resumable: an interrupted file continues where it
    stopped; a progress bar unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    use_request_timeout()
    was_disabled = are_progress_bars_disabled()
    if was_disabled and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        enable_progress_bars()
    try:
        folder = Path(snapshot_download(plan.repo_id, repo_type=plan.repo_type, revision=plan.commit,
                                        allow_patterns=sorted(plan.files), endpoint=endpoint(),
                                        etag_timeout=METADATA_TIMEOUT_S))
    finally:
        if was_disabled:
            disable_progress_bars()
    # Downloading by commit hash leaves the branch unrecorded: record it as huggingface_hub does
    # (refs/<name> holds the commit), so the next run finds it in the cache without asking the server.
    ref = plan.revision or "main"
    if ref != plan.commit and folder.parent.name == "snapshots":
        refs = folder.parents[1] / "refs" / ref
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(plan.commit)
    return folder


def cached(repo_id: str, revision: str | None, repo_type: str = "model") -> tuple[Path, str] | None:
    """``(folder, commit)`` of a revision already in the Hugging Face cache, without the network.

    Read from the cache's documented layout (``refs/<branch>`` holds a commit, ``snapshots/<commit>/`` its
    files) rather than ``snapshot_download(local_files_only=True)``, which refuses a snapshot that lacks
    files a run deliberately did not fetch (other weight formats)."""

    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if repo_id.count("/") > 1 or not repo_id.strip():
        return None
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    ref = revision or "main"
    if is_commit(ref):
        commit = ref
    else:
        try:
            commit = (storage / "refs" / ref).read_text().strip()
        except OSError:
            return None
    folder = storage / "snapshots" / commit
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    return folder, commit


def cached_model_ids() -> list[str]:
    """The Hub ids of the models in the local Hugging Face cache (its ``models--owner--name`` folders)."""
    from huggingface_hub import constants

    try:
        folders = list(Path(constants.HF_HUB_CACHE).iterdir())
    except OSError:
        return []
    return sorted(f.name[len("models--"):].replace("--", "/") for f in folders
                  if f.name.startswith("models--") and (f / "snapshots").is_dir())


def is_commit(revision: str) -> bool:
    """A full commit hash (immutable), rather than a branch or tag name (which may move)."""
    import re

    return bool(re.fullmatch(r"[0-9a-f]{40}", revision))


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or a bare ``name`` (legacy Hub ids such as ``distilbert-base-uncased``)."""
    import re

    return bool(re.fullmatch(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", name)) and not name.endswith(".")


def custom_code(folder: Path) -> list[str]:
    """The modelling code a model folder's config asks to run (``auto_map`` entries), if any."""
    import json

    config = folder / "config.json"
    if not config.is_file():
        return []
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return []
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not isinstance(auto_map, dict):
        return []
    return sorted({str(v if isinstance(v, str) else v[0]) for v in auto_map.values() if v})


def describe(exc: Exception, repo_id: str, key: str) -> str:
    """``key: could not download ...`` for a failed model or data set download."""
    return f"{key}: {describe_hub_error(exc, 'download', repo_id, nothing='Nothing was downloaded')}"
