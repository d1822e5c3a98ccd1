"""The run folder: resolved recipe, status, checkpoints (atomic), metrics, curves.

Layout::

    runs/<name>/
      recipe.toml      the fully resolved recipe
      run.json         status (running / interrupted / failed / finished; pruned), provenance, plugins
      adapter/         best adapter (save_pretrained + task head + processor), loadable by peft
      checkpoints/     ckpt-<step>/ for resume; each written to a temp folder then renamed
      metrics.jsonl    one line per logged step / evaluation
      metrics.json     final metrics (written only when the run finishes)
      curves.png       loss and metric curves
      README.md        the model card (written only when the run finishes)
      .lock            while a run trains here: its lock (finetune.engine.run_lock)

A folder is "finished" only when run.json says so; metrics.json and README.md
appear last, so a folder that looks complete is complete.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune.contract.recipe import CORE_SECTIONS, upgrade_legacy_keys
from finetune.engine.run_lock import LOCK_FILE, RunLock, holder_now, in_use_error
from finetune.errors import RunError

RUN_FILE = "run.json"
#: Recipe keys that may change when an unfinished run resumes; any other difference is refused.
#: ``distributed.*`` is not among them: FSDP/DeepSpeed checkpoints hold no optimizer state, so a change of
#: strategy would not continue the same optimisation (the number of processes may change: it is not a key).
SAFE_RESUME_CHANGES = frozenset({
    "train.epochs", "train.early_stopping_patience", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.num_workers", "hub.push", "hub.repo_id", "hub.private",
    # trackers observe the run; the resumed run continues the same tracker runs where it can (engine/tracking.py)
    "track.backends", "track.project", "track.run_name", "track.mlflow_tracking_uri", "track.wandb_mode",
})
CHECKPOINT_PREFIX = "ckpt-"
COMPLETE_MARKER = "loop_state.json"  # written last inside a checkpoint's temp folder


def _safe_change(key: str) -> bool:
    """A recipe key that may change when an unfinished run resumes (``[track] tags`` are a table: any tag)."""
    return key in SAFE_RESUME_CHANGES or key.startswith("track.tags.")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir_atomic(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; the old one (if any) is removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _added_since(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A run folder written by an older finetune lacks the recipe keys and sections added since; read them
    as their defaults (so the run still resumes), but only when the new recipe keeps those defaults. A
    pinned ``model.revision`` where the old recipe had none is the same backbone (the old run read the
    cache's current snapshot), so it does not count as a change either."""
    old = copy.deepcopy(upgrade_legacy_keys(old))
    for name, section in CORE_SECTIONS.items():
        wanted = new.get(name)
        if not isinstance(wanted, dict):
            continue
        if name not in old:
            if all(not info.is_required() for info in section.model_fields.values()) and \
                    wanted == section().to_dict():
                old[name] = wanted
            continue
        had = old[name]
        for key, info in section.model_fields.items():
            if key in had or key not in wanted or info.is_required():
                continue
            default = info.get_default(call_default_factory=True)
            default = default.to_dict() if isinstance(default, BaseModel) else default
            if wanted[key] == default or (name, key) == ("model", "revision"):
                had[key] = wanted[key]
    return old


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(_added_since(old, new)), flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return lines


def missing_run_folder(path: str | Path) -> RunError:
    """The error for a run folder that does not exist: it says so, with the nearest existing folders to what was
    typed (a typo: ``runs/sentt`` for ``runs/sent``), found with difflib at the first part that does not exist."""
    path = Path(path)
    parent, rest = path.parent, [path.name]
    while not parent.is_dir() and parent != parent.parent:
        parent, rest = parent.parent, [parent.name, *rest]
    missing, tail = rest[0], rest[1:]
    try:
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        siblings = []
    nearest = [parent.joinpath(name, *tail) for name in difflib.get_close_matches(missing, siblings, n=3, cutoff=0.6)]
    nearest = [str(p) for p in nearest if p.is_dir()]
    if nearest:
        hint = f" Did you mean {' or '.join(nearest)}?"
    else:
        runs = [name for name in siblings if (parent / name / "recipe.toml").exists()]
        shown = ", ".join(runs[:10]) + (", ..." if len(runs) > 10 else "")
        hint = f" The run folders in {parent}: {shown}." if runs and not tail else ""
    where = f" ({parent / missing} does not exist)" if tail else ""
    return RunError(f"{path}: no such run folder{where}.{hint}")


class RunDir:
    """One run folder on disk (callbacks receive it as ``run``). Plugins read it; the core writes it.

    ``run.path`` is the folder. Its layout: ``recipe.toml`` (the resolved recipe), ``run.json`` (status and
    provenance, :meth:`info`), ``adapter/`` (the best adapter), ``checkpoints/``, ``metrics.jsonl`` (one line
    per logged step and evaluation), and when the run finished ``metrics.json``, ``curves.png``,
    ``README.md`` (the model card), ``report_data.json`` and ``report.html`` (the run report). A plugin may
    write its own artifacts under ``run.path``."""

    #: Members a plugin may use (the rest is the core's bookkeeping): listed in the contract reference.
    PUBLIC = ("recipe_file", "run_file", "adapter_dir", "checkpoints_dir", "metrics_log", "metrics_file",
              "curves_file", "card_file", "info", "status", "is_finished", "resolved_recipe", "read_metrics_log",
              "checkpoints", "latest_checkpoint")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: RunLock | None = None

    # -- well-known paths ---------------------------------------------
    @property
    def recipe_file(self) -> Path:
        """``recipe.toml``: the fully resolved recipe (defaults filled in, paths absolute)."""
        return self.path / "recipe.toml"

    @property
    def run_file(self) -> Path:
        """``run.json``: status, provenance (backbone, plugins, versions, data fingerprints), speed settings."""
        return self.path / RUN_FILE

    @property
    def adapter_dir(self) -> Path:
        """``adapter/``; for a folder pulled from the Hub the adapter files sit at the top level."""
        nested = self.path / "adapter"
        if not nested.exists() and (self.path / "finetune_task.json").exists():
            return self.path
        return nested

    @property
    def checkpoints_dir(self) -> Path:
        """``checkpoints/``: ``ckpt-<step>/`` folders for resume (the last ``train.keep_checkpoints``)."""
        return self.path / "checkpoints"

    @property
    def metrics_log(self) -> Path:
        """``metrics.jsonl``: one JSON line per logged training step (``kind: train``), evaluation (``eval``)
        and the final score of the test split (``test``, at most once)."""
        return self.path / "metrics.jsonl"

    @property
    def metrics_file(self) -> Path:
        """``metrics.json``: the final metrics (``best``, ``last``, ``before``, ``baseline``, ...), written last."""
        return self.path / "metrics.json"

    @property
    def curves_file(self) -> Path:
        """``curves.png``: loss and metric curves, written when the run finishes."""
        return self.path / "curves.png"

    @property
    def card_file(self) -> Path:
        """``README.md``: the model card, written when the run finishes (and pushed to the Hub)."""
        return self.path / "README.md"

    # -- status --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The contents of ``run.json`` (``status``, ``backbone``, ``plugins``, ``data``, ...); ``{}`` before
        the run started."""
        if not self.run_file.exists():
            return {}
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.run_file}: unreadable run status file ({exc}); "
                           "delete the run folder or use --overwrite.") from None

    def update_info(self, **fields: Any) -> None:
        data = self.info()
        data.update(fields)
        write_json_atomic(self.run_file, data)

    @property
    def status(self) -> str | None:
        """``"running"``, ``"interrupted"``, ``"failed"`` or ``"finished"`` (None before the run started);
        ``"pruned"`` for a ``finetune sweep`` trial its pruner stopped (``run.json``'s ``pruned`` says where)."""
        return self.info().get("status")

    def is_finished(self) -> bool:
        """Whether the run finished (then metrics.json and the model card are complete)."""
        return self.status == "finished"

    def resolved_recipe(self) -> dict[str, Any]:
        """``recipe.toml`` as a dict."""
        import tomllib

        try:
            return tomllib.loads(self.recipe_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RunError(f"{self.recipe_file}: cannot read the run's recipe ({exc}).") from None

    # -- creation / reuse ---------------------------------------------
    def decide(self, recipe_dict: dict[str, Any], overwrite: bool, resume: bool, *,
               ignore_locks_since: float | None = None) -> str:
        """What a run with this recipe and these flags may do with the folder: ``"start"`` (absent or empty),
        ``"overwrite"`` or ``"resume"``; a RunError saying why not otherwise. Reads only, so it runs before
        the backbone loads, in every process; :meth:`prepare` decides again under the lock.

        * a file, or a folder another process trains in (:mod:`~finetune.engine.run_lock`): refused;
        * a non-empty folder that is not a run folder: always refused (we never delete what we did not write);
        * empty / absent folder: start (``resume=True`` is an error: nothing to resume);
        * a run, with ``overwrite``: start over; a finished run without it: refused;
        * unfinished run, same recipe (or only :data:`SAFE_RESUME_CHANGES`): resume; different: refused,
          listing the differences.

        ``ignore_locks_since``: a lock taken after this time is left to :meth:`prepare`'s decision (in a
        multi-process run it may be this run's own main process)."""
        if resume and overwrite:
            raise RunError("--resume and --overwrite together: --overwrite starts the run over, --resume continues "
                           "it; pass one of them.")
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"output.dir: {self.path} is a file; choose a folder path for the run.")
        holder = holder_now(self.path, locked_before=ignore_locks_since)
        if holder is not None:
            raise in_use_error(self.path, holder)
        exists = self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir())
        if exists and not self.run_file.exists():
            raise RunError(f"output.dir: {self.path} exists and is not a finetune run folder; "
                           "choose another output.dir (nothing was changed).")
        if not exists:
            if resume:
                raise RunError(f"--resume: there is no run to resume in {self.path}; drop --resume to start one.")
            return "start"
        if overwrite:
            return "overwrite"
        if self.is_finished():
            raise RunError(f"output.dir: {self.path} holds a finished run; pass --overwrite to replace it, "
                           "or choose another output.dir (e.g. --set output.dir=<new folder>; relative to the "
                           "recipe's folder) to keep it.")
        diffs = recipe_differences(self.resolved_recipe(), recipe_dict)
        if diffs and not all(_safe_change(line.split(":", 1)[0]) for line in diffs):
            raise RunError(
                f"output.dir: {self.path} holds an unfinished run with a different recipe, so it cannot be "
                "resumed:\n  " + "\n  ".join(diffs) +
                "\nRestore the old values to resume it, pass --overwrite to start over, or choose another "
                f"output.dir. Keys that may change on resume: {', '.join(sorted(SAFE_RESUME_CHANGES))}.")
        return "resume"

    def lock(self) -> None:
        """Take the folder for this process (creating it) before anything in it changes; a RunError naming
        the other process when one trains in it. Only the main process of a run locks; :meth:`unlock` (or
        the process's end, however it ends) releases it."""
        if self._lock is None:
            self._lock = RunLock(self.path)
        self._lock.acquire()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def prepare(self, recipe_dict: dict[str, Any], recipe_toml: str, overwrite: bool, resume: bool) -> bool:
        """Under the lock (:meth:`lock`): decide again (the folder may have changed since :meth:`decide`),
        then create, wipe or reopen the folder. Returns True when resuming."""
        if self._lock is None or not self._lock.held:
            raise RuntimeError("RunDir.prepare() needs the folder's lock: call lock() first")
        action = self.decide(recipe_dict, overwrite, resume)
        if action == "overwrite":
            self._wipe()
        if action in ("start", "overwrite"):
            self._create(recipe_dict, recipe_toml)
            return False
        diffs = recipe_differences(self.resolved_recipe(), recipe_dict)
        if diffs:  # only safe keys (decide() refused the others), e.g. more epochs: continue under the new recipe
            write_text_atomic(self.recipe_file, recipe_toml)
        self.recover_after_kill()
        self._drop_final_files()
        changes = {"recipe_changes": self.info().get("recipe_changes", []) + diffs} if diffs else {}
        self.update_info(status="running", resumed_at=time.time(), **changes)
        return True

    def recover_after_kill(self) -> None:
        """Undo what a kill in the middle of an atomic replace can leave: the previous adapter moved
        aside (restored), half-written temporary folders and files (removed)."""
        if not self.adapter_dir.exists():
            previous = sorted(self.path.glob(".adapter.old-*"))
            if previous:
                os.replace(previous[-1], self.adapter_dir)
        for stale in list(self.path.glob(".adapter.tmp-*")) + list(self.path.glob(".adapter.old-*")) + \
                list(self.path.glob(".*.tmp-*")):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def _drop_final_files(self) -> None:
        """A kill between writing the final files and marking the run finished (a few milliseconds)
        leaves them behind; a resumed run rewrites them, so never show them mid-training."""
        for stale in (self.metrics_file, self.card_file, self.path / "report.html", self.path / "report_data.json"):
            stale.unlink(missing_ok=True)

    def _create(self, recipe_dict: dict[str, Any], recipe_toml: str) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.recipe_file, recipe_toml)
            write_json_atomic(self.run_file, {"status": "running", "created_at": time.time()})
        except OSError as exc:
            raise RunError(f"output.dir: cannot write the run folder {self.path} ({exc.strerror or exc}); "
                           "choose a writable output.dir with free space.") from None

    def _wipe(self) -> None:
        # Only what a run writes; anything else makes decide() refuse before we get here. The folder moves
        # away whole (a kill mid-wipe leaves no half-deleted run), its lock file with it: lock the new one.
        trash = self.path.with_name(f".{self.path.name}.overwritten-{os.getpid()}")
        os.replace(self.path, trash)
        old_lock, self._lock = self._lock, RunLock(self.path)
        try:
            self._lock.acquire()
        finally:
            if old_lock is not None:
                old_lock.release()
            shutil.rmtree(trash, ignore_errors=True)

    # -- checkpoints ---------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.exists():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX) and (child / COMPLETE_MARKER).exists():
                try:
                    found.append((int(child.name[len(CHECKPOINT_PREFIX):]), child))
                except ValueError:
                    continue
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def write_checkpoint(self, step: int, writer: Callable[[Path], None], keep: int) -> Path:
        """Call ``writer(tmp_dir)``, then rename into ``checkpoints/ckpt-<step>``; keep the last ``keep``."""
        final = self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = self.checkpoints_dir / f".tmp-{CHECKPOINT_PREFIX}{step:08d}-{os.getpid()}"
        try:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            writer(tmp)
            if not (tmp / COMPLETE_MARKER).exists():
                raise RuntimeError(f"checkpoint writer did not write {COMPLETE_MARKER}")
            _fsync_dir(tmp)
            replace_dir_atomic(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_checkpoint()
            raise RunError(f"cannot write checkpoint {final} ({exc.strerror or exc}); "
                           + (f"the previous checkpoint {previous.name} is intact and " if previous else "")
                           + "the run resumes from it with --resume once there is space/permission.") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-keep]:
            # Rename first: a kill in the middle of rmtree must not leave a folder that still holds the
            # completeness marker but not the weights (found by the kill-loop test).
            doomed = self.checkpoints_dir / f".tmp-pruned-{old.name}-{os.getpid()}"
            try:
                os.replace(old, doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
        for stale in self.checkpoints_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    # -- metrics -------------------------------------------------------
    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def read_metrics_log(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``, in order (a line cut by a kill is skipped)."""
        if not self.metrics_log.exists():
            return []
        records = []
        for line in self.metrics_log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
        return records

    def truncate_metrics_log(self, after_step: int) -> None:
        """Drop records logged after ``after_step`` (they are redone when resuming from there)."""
        kept = [r for r in self.read_metrics_log() if r.get("step", 0) <= after_step]
        write_text_atomic(self.metrics_log, "".join(json.dumps(r) + "\n" for r in kept))


def _fsync_dir(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
