"""``[track]``: experiment trackers (TensorBoard, MLflow, Weights & Biases) through Accelerate's trackers.

The loop starts them once the run's position is known (:meth:`Trackers.start`, after a resume), logs every
training log (``train/*``), every evaluation from step 0 (``eval/*``), the test split (``test/*``) and the
best evaluation (``best/*``), and closes them with the run's outcome (:meth:`Trackers.finish`). Each tracker
receives the resolved recipe as parameters under dotted keys (``train.learning_rate``) and is tagged with
the task, backbone and run folder. Accelerate logs from the main process only; the other processes of a
multi-process run hold no tracker.

A resumed run continues the same tracker run: ``tracking.json`` in the run folder keeps the MLflow run id
(and store) and the W&B run id; TensorBoard writes into the same folder with ``purge_step`` set, so steps
logged after the checkpoint and before the kill are hidden. What each tool does with steps it sees twice is
in docs/tracking.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.engine.run_folder import flatten, write_json_atomic
from finetune.errors import RecipeError

if TYPE_CHECKING:
    from finetune.contract.recipe import Recipe, TrackSection

#: ``backend -> ((module, pip package), ...)`` each tracker needs.
PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "tensorboard": (("tensorboard", "tensorboard"),),
    "mlflow": (("mlflow", "mlflow-skinny"),),
    "wandb": (("wandb", "wandb"),),
}
#: MLflow's SQLite store (the default) needs these besides mlflow-skinny.
SQLITE_PACKAGES = (("sqlalchemy", "sqlalchemy"), ("alembic", "alembic"))
STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"


def check_trackers(track: TrackSection) -> None:
    """Every tracker ``[track]`` names is installed; else a RecipeError with the pip command (checked before
    a run folder exists, by ``finetune validate`` and ``finetune run``)."""
    for name in track.backends:
        needed = PACKAGES[name]
        if name == "mlflow" and (track.mlflow_tracking_uri is None or track.mlflow_tracking_uri.startswith("sqlite")):
            needed += SQLITE_PACKAGES
        missing = [package for module, package in needed if importlib.util.find_spec(module) is None]
        if missing:
            raise RecipeError(f"track.backends: {name!r} needs {', '.join(missing)}, which "
                              f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'finetune[track]' "
                              f"(or pip install {' '.join(missing)}), or remove {name!r} from [track] backends.")


def mlflow_uri(recipe: Recipe, run_path: Path) -> str:
    """The recipe's ``track.mlflow_tracking_uri``, else ``mlflow.db`` (SQLite) beside the run folder."""
    return recipe.track.mlflow_tracking_uri or f"sqlite:///{Path(run_path).resolve().parent / 'mlflow.db'}"


def tracker_params(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as flat parameters: ``{"train.learning_rate": 0.0005, ...}``; lists and tables as
    JSON text (TensorBoard's hparams take numbers, booleans and strings only)."""
    return {key: json.dumps(value) if isinstance(value, (list, dict)) else value
            for key, value in flatten(recipe.to_dict()).items()}


class Trackers:
    """The run's trackers. Without ``[track] backends`` every method does nothing."""

    def __init__(self, accelerator: Any, recipe: Recipe, run_path: Path, say: Callable[[str], None] = print) -> None:
        self.accelerator, self.recipe, self.run_path, self.say = accelerator, recipe, Path(run_path), say
        self.names = list(recipe.track.backends)
        self.started = False

    @property
    def state_file(self) -> Path:
        return self.run_path / STATE_FILE

    def start(self, resumed_step: int | None, metric: str) -> None:
        """Start every tracker (``resumed_step``: the checkpoint's step when the run resumes, else None;
        ``metric``: the selection metric, which TensorBoard's hyperparameter table shows beside the recipe)."""
        if not self.names:
            return
        self.started = True
        if not self.accelerator.is_main_process:
            return  # Accelerate keeps trackers on the main process only
        track = self.recipe.track
        saved = self._saved() if resumed_step is not None else {}
        run_name = track.run_name or self.run_path.name
        tags = {"finetune.task": self.recipe.task.name, "finetune.backbone": self.recipe.model.backbone,
                "finetune.run_dir": str(self.run_path.resolve()), **track.tags}
        kwargs: dict[str, dict[str, Any]] = {}
        state: dict[str, Any] = {}
        if "tensorboard" in self.names:
            logdir = self.run_path / TENSORBOARD_DIR
            if resumed_step is not None:  # TensorBoard hides the steps logged after the checkpoint
                kwargs["tensorboard"] = {"purge_step": resumed_step + 1}
            elif logdir.exists():  # an attempt that left no checkpoint: its steps are hidden
                kwargs["tensorboard"] = {"purge_step": 0}
            state["tensorboard"] = {"logdir": str(logdir / track.project)}
        if "mlflow" in self.names:
            import logging

            import mlflow

            for noisy in ("alembic", "mlflow.store.db.utils"):  # the SQLite store's schema set-up, every new file
                logging.getLogger(noisy).setLevel(logging.WARNING)
            uri = mlflow_uri(self.recipe, self.run_path)
            mlflow.set_tracking_uri(uri)
            before = saved.get("mlflow") or {}
            run_id = before.get("run_id") if before.get("tracking_uri") == uri else None
            if before and run_id is None:
                self.say(f"track: mlflow_tracking_uri changed ({before.get('tracking_uri')} -> {uri}); the resumed "
                         "run starts a new MLflow run there.")
            kwargs["mlflow"] = {"run_name": run_name, "tags": tags, "run_id": run_id}
        if "wandb" in self.names:
            before = saved.get("wandb") or {}
            run_id = before.get("id") or secrets.token_hex(4)
            mode = os.environ.get("WANDB_MODE") or track.wandb_mode  # W&B's own variable wins (e.g. disabled)
            kwargs["wandb"] = {"name": run_name, "id": run_id, "resume": "allow", "dir": str(self.run_path),
                               "mode": mode, "tags": [wandb_tag(k, v) for k, v in tags.items()
                                                      if k != "finetune.run_dir"]}
            state["wandb"] = {"id": run_id, "project": track.project, "mode": mode,
                              "dir": str(self.run_path / "wandb")}
        self.run_path.mkdir(parents=True, exist_ok=True)
        try:
            self.accelerator.init_trackers(track.project, init_kwargs=kwargs)
        except Exception as exc:  # e.g. W&B online without a login, an MLflow server that is down
            why = str(exc).rstrip(".")
            raise RecipeError(f"track.backends: starting the trackers ({', '.join(self.names)}) failed: "
                              f"{type(exc).__name__}: {why}. Fix the tracker's set-up (for W&B: `wandb login`, or "
                              "[track] wandb_mode = \"offline\"; for MLflow: the server in "
                              "track.mlflow_tracking_uri), or remove it from [track] backends; then resume the "
                              "run with --resume.") from exc
        params = tracker_params(self.recipe)
        for name in self.names:
            tracker = self.accelerator.get_tracker(name)
            if name == "mlflow":
                run = tracker.tracker
                state["mlflow"] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                   "tracking_uri": mlflow_uri(self.recipe, self.run_path)}
                self._mlflow_params(run, params)
            elif name == "tensorboard":
                self._tensorboard_params(tracker.writer, params, metric)
            else:
                tracker.store_init_configuration(params)
        write_json_atomic(self.state_file, state)

    def _saved(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _mlflow_params(self, run: Any, params: dict[str, Any]) -> None:
        """MLflow parameters cannot change once logged: a resumed run logs the new ones, and a key changed on
        resume (``train.epochs``, say) as the tag ``changed_on_resume.<key>``."""
        import mlflow

        logged = run.data.params  # empty for a new run
        fresh = {k: v for k, v in params.items() if k not in logged}
        for start in range(0, len(fresh), 100):  # MLflow's batch limit
            mlflow.log_params(dict(list(fresh.items())[start:start + 100]))
        changed = {f"changed_on_resume.{k}": f"{logged[k]} -> {v}" for k, v in params.items()
                   if k in logged and logged[k] != str(v)}
        if changed:
            mlflow.set_tags(changed)

    @staticmethod
    def _tensorboard_params(writer: Any, params: dict[str, Any], metric: str) -> None:
        """The recipe in the HParams dashboard, written into the run's own event file (Accelerate's
        ``store_init_configuration`` would add two time-stamped folders per start)."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, {f"eval/{metric}": None, f"best/{metric}": None}):
            writer.file_writer.add_summary(summary)
        writer.flush()

    def log(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Log the numbers of ``values`` as ``<prefix>/<key>`` at ``step`` (main process only, by Accelerate)."""
        if self.started:
            numbers = {f"{prefix}/{k}": v for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                self.accelerator.log(numbers, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        """Close every tracker; ``status``: FINISHED, KILLED (interrupted, resumable) or FAILED."""
        if not self.started:
            return
        self.started = False
        for tracker in list(self.accelerator.trackers):
            try:
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status=status)
                elif tracker.name == "wandb":
                    if getattr(tracker, "run", None) is not None:  # None: it failed to start
                        tracker.run.finish(exit_code=0 if status == "FINISHED" else 1)
                else:
                    tracker.finish()
            except Exception as exc:  # closing a tracker must not hide the run's own outcome
                self.say(f"track: closing {tracker.name} failed: {type(exc).__name__}: {exc}")
        self.accelerator.trackers = []  # end_training() has nothing left to close


#: W&B refuses a tag longer than this (and with it the whole run).
WANDB_TAG_LIMIT = 64


def wandb_tag(key: str, value: object) -> str:
    """``key:value`` within W&B's tag limit: a local backbone folder by its name, else the end cut off."""
    text = f"{key}:{value}"
    if len(text) > WANDB_TAG_LIMIT and key == "finetune.backbone":
        text = f"{key}:{Path(str(value)).name}"
    return text[:WANDB_TAG_LIMIT]
