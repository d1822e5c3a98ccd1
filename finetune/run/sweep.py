"""``finetune sweep RECIPE``: hyperparameter search over any recipe keys, with Optuna.

The search space comes from the recipe's ``[sweep.params]``, ``--param`` options (which win), or, when
neither names a key, the task's default space (``Task.sweep_space``; else the core's: learning rate,
LoRA rank, epochs, warm-up). Every value a trial could get is validated as a recipe key (both ends of a
range, every choice) before the first trial runs.

Each trial is a normal run (:func:`finetune.run.training.run_recipe`) of a recipe written to
``<sweep>/recipes/trial-NNNN.toml`` (the user's keys with absolute paths, the trial's values, no
``[sweep]`` section, ``output.dir`` = ``<sweep>/trial-NNNN``), so every trial folder is a run folder that
``finetune runs`` lists and ``finetune predict`` reads. A callback reports the selection metric at each
evaluation to the study (step = the evaluation's index after training started: 0, 1, ...) and, when the
pruner says so, ends the run early; the run folder's ``run.json`` then says ``status: "pruned"``.

The study lives in ``<sweep>/study.db`` (SQLite). One ``finetune sweep`` process per sweep folder (a lock,
as for run folders), so a trial the study still calls running when a sweep starts was cut short by a kill:
it is resumed from its run folder's checkpoint with the same parameters (or its result read, when the run
had finished), and the sweep goes on until ``trials`` trials have ended (complete, pruned or failed).
At the end (and after every trial) ``sweep.json``, ``trials.csv`` and ``best.toml`` (the best trial's
recipe, runnable with ``finetune run`` as it is, writing to ``<sweep>/best``) are written.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.contract.callbacks import LoopState
from finetune.contract.recipe import Recipe, SweepRange, SweepSection, TrainSection
from finetune.engine.console import Console
from finetune.engine.loop import metric_mode
from finetune.engine.recipe_file import apply_overrides, dotted_keys, read_toml, validate_recipe
from finetune.engine.run_folder import RunDir, write_json_atomic, write_text_atomic
from finetune.engine.run_lock import RunLock
from finetune.engine.stop import Interrupted
from finetune.errors import FinetuneError, RecipeError, RunError

STUDY_FILE = "study.db"
STUDY_NAME = "finetune-sweep"
#: The sweep stops (with the last error) after this many failed trials in a row: something is wrong with
#: every trial, not with one trial's values.
MAX_FAILURES_IN_A_ROW = 3
#: Keys a search space may not name: where trials go, what compares them, the sweep's own settings.
FORBIDDEN_KEYS = ("output.dir", "task.name", "train.metric", "train.metric_mode", "hub.push", "hub.repo_id")
FORBIDDEN_SECTIONS = ("sweep",)


# ---------------------------------------------------------------------------
# the search space

@dataclass
class Param:
    """One searched recipe key: a float or int range, or a list of choices."""

    key: str
    kind: str  #: "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] | None = None

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(_fmt(c) for c in self.choices or [])
        step = f" step {_fmt(self.step)}" if self.step is not None else ""
        return f"{_fmt(self.low)}..{_fmt(self.high)}" + (" (log)" if self.log else "") + step + \
            (" int" if self.kind == "int" else "")

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _literal(text: str) -> Any:
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_param_option(text: str) -> tuple[str, Any]:
    """``--param`` -> (key, spec in ``[sweep.params]`` form): ``KEY=LOW..HIGH[,log][,step=S]`` is a range,
    ``KEY=A|B|C`` a list of choices (a single value fixes the key for every trial). Values parse as TOML
    literals (numbers, booleans), else as strings."""
    example = "e.g. --param train.learning_rate=1e-5..1e-3,log or --param peft.r=4|8|16"
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise RecipeError(f"--param {text!r}: expected KEY=LOW..HIGH[,log] or KEY=A|B|C, {example}.")
    if ".." in value:
        rng, *flags = value.split(",")
        low, _, high = rng.partition("..")
        if not low.strip() or not high.strip():
            raise RecipeError(f"--param {text!r}: a range needs both ends, LOW..HIGH ({example}).")
        spec: dict[str, Any] = {"low": _literal(low), "high": _literal(high)}
        for flag in (f.strip() for f in flags):
            if flag == "log":
                spec["log"] = True
            elif flag.startswith("step="):
                spec["step"] = _literal(flag[len("step="):])
            else:
                raise RecipeError(f"--param {text!r}: unknown flag {flag!r} after the range; use ',log' and/or "
                                  f"',step=S' ({example}).")
        return key, spec
    return key, [_literal(v) for v in value.split("|")]


def check_param_spec(where: str, key: str, spec: Any) -> SweepRange | list[Any]:
    """A spec validated as a ``[sweep.params]`` entry (the recipe schema's types and bounds)."""
    from pydantic import ValidationError

    try:
        return SweepSection.model_validate({"params": {key: spec}}).params[key]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][2:]) or 'value'}: {e['msg']}"
                             for e in exc.errors()[:3])
        raise RecipeError(f"{where}: invalid search space {spec!r} ({problems}). Give a range "
                          "{low = ..., high = ..., log = true} or a list of choices [a, b, c].") from None


def core_default_space(recipe: Recipe) -> dict[str, Any]:
    """The space used when neither the recipe, ``--param`` nor the task names one."""
    lr, epochs = recipe.train.learning_rate, recipe.train.epochs
    space: dict[str, Any] = {"train.learning_rate": {"low": float(f"{lr / 4:.3g}"), "high": float(f"{lr * 4:.3g}"),
                                                     "log": True}}
    if recipe.peft.method == "lora":
        space["peft.r"] = [4, 8, 16]
    space["train.epochs"] = {"low": max(1, epochs - 1), "high": epochs + 1}
    space["train.warmup_ratio"] = {"low": 0.0, "high": 0.2}
    return space


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: {part!r} is a value in the recipe, not a section; name a key such as "
                              "train.learning_rate.")
        node = child
    node[parts[-1]] = value


def get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resolve_space(space: dict[str, tuple[str, Any]], base_raw: dict[str, Any], task_lookup: Any,
                  recipe_dir: Path) -> list[Param]:
    """``{key: (where it was given, spec)}`` -> validated :class:`Param` s. Every value a trial could get
    (both ends of a range, each choice) is put into the recipe and validated, so a wrong key or value fails
    now, naming the key (with did-you-mean), not in the middle of the sweep."""
    params = []
    for key, (where, spec) in space.items():
        if len(key.split(".")) < 2 or not all(key.split(".")):
            raise RecipeError(f"{where}: {key!r} is not a recipe key; name one as SECTION.KEY, e.g. "
                              "train.learning_rate or peft.r.")
        if key in FORBIDDEN_KEYS or key.split(".")[0] in FORBIDDEN_SECTIONS:
            raise RecipeError(f"{where}: {key} cannot be searched (the sweep sets where trials go and compares "
                              "them on one metric); searchable keys are the settings of a run, e.g. "
                              "train.learning_rate.")
        if isinstance(spec, SweepRange):
            if spec.low > spec.high:
                raise RecipeError(f"{where}: low {spec.low} is above high {spec.high}; swap them.")
            if spec.log and spec.low <= 0:
                raise RecipeError(f"{where}: a log range needs low > 0 (got {spec.low}); raise low or drop log.")
            if spec.log and spec.step is not None:
                raise RecipeError(f"{where}: log and step together are not supported; drop one of them.")
            values: list[Any] = [spec.low, spec.high]
        else:
            if not spec:
                raise RecipeError(f"{where}: an empty list of choices; give at least one value.")
            values = list(spec)
        resolved = []
        for value in values:
            raw = copy.deepcopy(base_raw)
            set_dotted(raw, key, value, where)
            try:
                recipe = validate_recipe(raw, task_lookup, base_dir=recipe_dir, default_output=recipe_dir / "x")
            except RecipeError as exc:
                raise RecipeError(f"{where} = {value!r}: {exc}") from None
            resolved.append(get_dotted(recipe.to_dict(), key))
        if isinstance(spec, SweepRange):
            is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in resolved)
            if is_int and spec.step is not None and spec.step != int(spec.step):
                raise RecipeError(f"{where}: {key} takes whole numbers, so step must be one (got {spec.step}).")
            params.append(Param(key, "int" if is_int else "float", low=resolved[0], high=resolved[1], log=spec.log,
                                step=spec.step))
        else:
            params.append(Param(key, "choice", choices=list(spec)))
    return params


# ---------------------------------------------------------------------------
# the pruning callback

class PruneCallback:
    """Reports the selection metric of each evaluation after training started to the Optuna trial and, when
    the pruner says the trial is behind, marks the run folder pruned and ends training
    (``state.should_stop``). The last evaluation of a run is reported but never pruned: the run is done."""

    def __init__(self, trial: Any, metric: str, epochs: int) -> None:
        self.trial, self.metric, self.epochs = trial, metric, epochs
        self.pruned_at: int | None = None

    def on_evaluate(self, *, run: Any, state: LoopState, metrics: dict[str, Any]) -> None:
        if state.global_step == 0 or self.pruned_at is not None:
            return
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        # the evaluation's index (distinct steps: an evaluation repeated after a kill counts once)
        steps = {r.get("step") for r in run.read_metrics_log() if r.get("kind") == "eval"}
        step = sum(1 for s in steps if isinstance(s, int) and 0 < s <= state.global_step) - 1
        with warnings.catch_warnings():  # a resumed trial repeats an evaluation already reported: ignored
            warnings.simplefilter("ignore")
            self.trial.report(float(value), max(step, 0))
        if state.epoch >= self.epochs:  # the final evaluation
            return
        if self.trial.should_prune():
            self.pruned_at = step
            run.update_info(pruned={"evaluation": step, "step": state.global_step, self.metric: value,
                                    "reason": "finetune sweep: the selection metric was behind the median of the "
                                              "earlier trials at this evaluation"})
            state.should_stop = True


# ---------------------------------------------------------------------------
# the sweep

@dataclass
class SweepSettings:
    recipe_path: Path
    overrides: list[str]
    trials: int | None = None
    params: list[str] | None = None
    sweep_dir: Path | None = None
    timeout: float | None = None
    verbose: bool = False


@dataclass
class SweepPlan:
    """What a sweep will do, decided (and every trial's values validated) before anything is written."""

    recipe_path: Path
    recipe: Recipe
    base_raw: dict[str, Any]  #: the recipe file's keys after --set, without [sweep]
    cfg: SweepSection
    n_trials: int
    params: list[Param]
    space_origin: str  #: "recipe", "task 'name'" or "core default"
    metric: str
    direction: str  #: "maximize" or "minimize"
    sweep_dir: Path
    registry: Any


def plan_sweep(settings: SweepSettings) -> SweepPlan:
    """Read and validate the recipe and the search space (each range's ends, each choice) and decide the
    metric, direction and folder. Raises RecipeError / RunError; writes nothing."""
    from finetune.engine.plugins import get_registry

    registry = get_registry()
    recipe_path = Path(settings.recipe_path).expanduser().resolve()
    raw = apply_overrides(read_toml(recipe_path), settings.overrides)
    recipe = _load(raw, registry, recipe_path, settings.overrides)
    cfg = recipe.sweep or SweepSection()
    n_trials = settings.trials if settings.trials is not None else cfg.trials
    if n_trials < 1:
        raise RecipeError(f"--trials {n_trials}: give at least 1.")
    base_raw = {k: v for k, v in raw.items() if k != "sweep"}

    # the search space: [sweep.params], then --param (wins), else the task's default, else the core's
    space: dict[str, tuple[str, Any]] = {k: (f'sweep.params."{k}"', v) for k, v in cfg.params.items()}
    for option in settings.params or []:
        key, spec = parse_param_option(option)
        space[key] = (f"--param {key}", check_param_spec(f"--param {option!r}", key, spec))
    origin = "recipe"
    if not space:
        task = registry.create_task(recipe)
        default = task.sweep_space()
        if default is not None and not isinstance(default, dict):
            raise task.fail("sweep_space", f"returned {type(default).__name__}; expected a dict (key -> range or "
                                           "choices) or None")
        origin = f"task {recipe.task.name!r}" if default else "core default"
        for key, spec in (default or core_default_space(recipe)).items():
            where = f"the {origin} search space, {key!r}"
            space[key] = (where, check_param_spec(where, key, spec))
    params = resolve_space(space, base_raw, registry.get_task, recipe_path.parent)

    task_cls = registry.get_task(recipe.task.name)
    metric = recipe.train.metric or task_cls.default_metric
    mode = metric_mode(metric, recipe.train.metric_mode, tuple(getattr(task_cls, "lower_is_better", ()) or ()))
    direction = cfg.direction if cfg.direction != "auto" else ("maximize" if mode == "max" else "minimize")

    sweep_dir = settings.sweep_dir or (Path(cfg.dir) if cfg.dir else Path(recipe.output.dir + "-sweep"))
    sweep_dir = sweep_dir.expanduser().resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise RunError(f"--dir: {sweep_dir} is a file; choose a folder for the sweep.")
    if (sweep_dir / "run.json").exists():
        raise RunError(f"--dir: {sweep_dir} is a run folder; choose another folder for the sweep (e.g. --dir "
                       f"{sweep_dir}-sweep).")
    if sweep_dir.exists() and any(p.name != ".lock" for p in sweep_dir.iterdir()) and \
            not (sweep_dir / STUDY_FILE).exists():
        raise RunError(f"--dir: {sweep_dir} exists and is not a sweep folder (no {STUDY_FILE}); choose another "
                       "folder (nothing was changed).")
    return SweepPlan(recipe_path, recipe, base_raw, cfg, n_trials, params, origin, metric, direction, sweep_dir,
                     registry)


def sweep(settings: SweepSettings, console: Console | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep; returns what sweep.json holds."""
    import optuna

    console = console or Console()
    plan = plan_sweep(settings)
    cfg, sweep_dir, params, n_trials = plan.cfg, plan.sweep_dir, plan.params, plan.n_trials
    lock = RunLock(sweep_dir)
    lock.acquire()
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        identity = {"recipe": str(plan.recipe_path), "recipe_keys": _flat(plan.base_raw),
                    "space": [p.to_json() for p in params], "metric": plan.metric, "direction": plan.direction}
        seed = cfg.seed if cfg.seed is not None else plan.recipe.train.seed
        sampler = (optuna.samplers.RandomSampler(seed=seed) if cfg.sampler == "random" else
                   optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, n_trials // 2))))
        pruner = (optuna.pruners.NopPruner() if cfg.pruner == "none" else
                  optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_evals))
        study = optuna.create_study(storage=f"sqlite:///{sweep_dir / STUDY_FILE}", study_name=STUDY_NAME,
                                    direction=plan.direction, sampler=sampler, pruner=pruner, load_if_exists=True)
        _check_same_sweep(study, identity, sweep_dir)
        console.print(f"sweep folder: {sweep_dir} ({STUDY_FILE}: the study; trial-NNNN/: one run folder per trial)")
        console.print(f"{plan.direction} {plan.metric} over {n_trials} trials; search space ({plan.space_origin}):")
        for p in params:
            console.print(f"  {p.key}: {p.describe()}")
        runner = _Runner(study, plan, Console(quiet=False) if settings.verbose else Console(enabled=False), console)
        started = time.monotonic()
        stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        for frozen in stale:  # cut short by a kill (the lock says no other sweep runs here): resume them
            console.print(f"trial {frozen.number}: was running when the sweep stopped; resuming it")
            runner.run_trial(optuna.trial.Trial(study, frozen._trial_id), n_trials)
        timeout = settings.timeout or cfg.timeout
        while _ended(study) < n_trials:
            if timeout and time.monotonic() - started > timeout:
                console.summary(f"timeout ({timeout:g} s): no new trial started; {_ended(study)} of {n_trials} "
                                "ended. Run `finetune sweep` again to continue.")
                break
            runner.run_trial(study.ask(), n_trials)
        summary = write_summary(study, plan)
    finally:
        lock.release()
    print_summary(console, summary)
    return summary


def _load(raw: dict[str, Any], registry: Any, recipe_path: Path, overrides: list[str]) -> Recipe:
    try:
        return validate_recipe(raw, registry.get_task, base_dir=recipe_path.parent,
                               default_output=recipe_path.parent / "runs" / recipe_path.stem)
    except RecipeError as exc:
        note = f"\n  (recipe: {recipe_path}" + ("; --set " + " --set ".join(overrides) if overrides else "") + ")"
        raise RecipeError(f"{exc}{note}") from None


def _flat(raw: dict[str, Any]) -> dict[str, Any]:
    return {key: get_dotted(raw, key) for key in dotted_keys(raw)}


def _check_same_sweep(study: Any, identity: dict[str, Any], sweep_dir: Path) -> None:
    """A sweep folder continues only the sweep it holds: same recipe keys, space, metric and direction."""
    old = study.user_attrs.get("sweep")
    if old is None:
        study.set_user_attr("sweep", identity)
        return
    old = json.loads(json.dumps(old))
    new = json.loads(json.dumps(identity))
    diffs = []
    for key in ("metric", "direction", "recipe"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    before, now = old.get("recipe_keys", {}), new["recipe_keys"]
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            diffs.append(f"{key}: {before.get(key, '(unset)')} -> {now.get(key, '(unset)')}")
    if old.get("space") != new["space"]:
        diffs.append("search space: " + "; ".join(_space_line(p) for p in old.get("space", [])) + " -> "
                     + "; ".join(_space_line(p) for p in new["space"]))
    if diffs:
        raise RunError(f"--dir: {sweep_dir} holds a sweep of another recipe or search space, so it cannot be "
                       "continued:\n  " + "\n  ".join(diffs) + "\nRestore them to continue it, or choose another "
                       "folder with --dir (or [sweep] dir).")


def _space_line(p: dict[str, Any]) -> str:
    return Param(**p).key + " " + Param(**p).describe()


def _ended(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))


def _trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def trial_recipe(base_raw: dict[str, Any], values: dict[str, Any], registry: Any, recipe_path: Path,
                 output_dir: Path) -> dict[str, Any]:
    """The user's keys (paths made absolute, as the run resolves them) with ``values`` set and ``output.dir``
    = ``output_dir``: a recipe that runs the same from any folder. Keys the user did not set stay unset."""
    raw = copy.deepcopy(base_raw)
    for key, value in values.items():
        set_dotted(raw, key, value, key)
    set_dotted(raw, "output.dir", str(output_dir), "output.dir")
    resolved = validate_recipe(raw, registry.get_task, base_dir=recipe_path.parent,
                               default_output=output_dir).to_dict()
    out: dict[str, Any] = {}
    for key in dotted_keys(raw):
        value = get_dotted(resolved, key)
        set_dotted(out, key, get_dotted(raw, key) if value is None else value, key)
    return out


class _Runner:
    def __init__(self, study: Any, plan: SweepPlan, trial_console: Console, console: Console) -> None:
        self.study, self.plan, self.params, self.metric = study, plan, plan.params, plan.metric
        self.sweep_dir = plan.sweep_dir
        self.trial_console, self.console = trial_console, console
        self.failures_in_a_row = 0

    def run_trial(self, trial: Any, n_trials: int) -> None:
        import tomli_w
        from optuna.trial import TrialState

        from finetune.run.training import run_recipe

        values = {p.key: p.suggest(trial) for p in self.params}
        name = _trial_name(trial.number)
        run_dir = self.sweep_dir / name
        recipe_file = self.sweep_dir / "recipes" / f"{name}.toml"
        recipe = trial_recipe(self.plan.base_raw, values, self.plan.registry, self.plan.recipe_path, run_dir)
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        text = f"# {name} of the sweep in {self.sweep_dir} (from {self.plan.recipe_path})\n" + tomli_w.dumps(recipe)
        if not recipe_file.exists() or recipe_file.read_text() != text:
            write_text_atomic(recipe_file, text)
        trial.set_user_attr("run_dir", str(run_dir))
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        self.console.print(f"trial {trial.number} ({_ended(self.study) + 1} of {n_trials}): {shown}")
        run = RunDir(run_dir)
        info = run.info() if run.run_file.exists() else {}
        epochs = get_dotted(recipe, "train.epochs") or TrainSection.model_fields["epochs"].default
        callback = PruneCallback(trial, self.metric, int(epochs))
        began = time.time()
        try:
            if info.get("pruned"):  # pruned before the kill; the run ended there
                pass
            elif info.get("status") != "finished":
                run_recipe(recipe_file, [], console=self.trial_console, callbacks=[callback])
        except (Interrupted, KeyboardInterrupt):
            self.console.summary(f"trial {trial.number} interrupted; it is resumed when `finetune sweep` runs again "
                                 "on this recipe and folder.")
            raise
        except Exception as exc:  # noqa: BLE001 - one trial's failure (e.g. a diverging learning rate) is recorded
            message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, FinetuneError) else str(exc)
            trial.set_user_attr("error", message[:2000])
            trial.set_user_attr("duration_s", round(time.time() - began, 1))
            self.study.tell(trial, state=TrialState.FAIL)
            self.failures_in_a_row += 1
            self.console.summary(f"trial {trial.number}: failed: {message.splitlines()[0][:300]}")
            if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise FinetuneError(f"{MAX_FAILURES_IN_A_ROW} trials in a row failed; the last one "
                                    f"({run_dir}): {message}\nFix the recipe or the search space and run "
                                    "`finetune sweep` again (finished trials are kept).") from None
            self.after_trial()
            return
        self.failures_in_a_row = 0
        info = run.info()
        metrics = _read_json(run.metrics_file) or {}
        trial.set_user_attr("duration_s", _duration(info, metrics, began))
        if info.get("pruned"):
            run.update_info(status="pruned")
            self.study.tell(trial, state=TrialState.PRUNED)
            at = info["pruned"]
            self.console.print(f"trial {trial.number}: pruned at evaluation {at.get('evaluation')} "
                               f"({self.metric}={_fmt(at.get(self.metric))})")
        else:
            value = (metrics.get("best") or {}).get(self.metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                trial.set_user_attr("error", f"metrics.json has no finite best {self.metric}")
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, float(value))
                self.console.print(f"trial {trial.number}: {self.metric}={_fmt(value)}")
        self.after_trial()

    def after_trial(self) -> None:
        """The summary files are current after every trial (a killed sweep leaves them readable)."""
        write_summary(self.study, self.plan)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _duration(info: dict[str, Any], metrics: dict[str, Any], began: float) -> float:
    """The trial's run time: creation to end of its run folder (a resumed trial counts both parts and the gap)."""
    end = info.get("finished_at") or time.time()
    start = info.get("created_at") or began
    return round(max(0.0, end - start), 1)


# ---------------------------------------------------------------------------
# the summary

def trial_rows(study: Any, metric: str) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.value is not None else None
        if value is None and t.intermediate_values:  # pruned: the last reported value
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append({"number": t.number, "state": t.state.name.lower(), metric: value, "params": dict(t.params),
                     "duration_s": t.user_attrs.get("duration_s"), "run_dir": t.user_attrs.get("run_dir"),
                     **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
                     "evaluations": {str(k): v for k, v in sorted(t.intermediate_values.items())}})
    return rows


def write_summary(study: Any, plan: SweepPlan) -> dict[str, Any]:
    """sweep.json, trials.csv and best.toml (once a trial completed)."""
    import tomli_w
    from optuna.trial import TrialState

    sweep_dir, metric, direction, params = plan.sweep_dir, plan.metric, plan.direction, plan.params
    recipe_path = plan.recipe_path

    rows = trial_rows(study, metric)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, metric: b.value, "params": dict(b.params), "run_dir": b.user_attrs.get("run_dir"),
                "recipe": str(sweep_dir / "best.toml")}
        recipe = trial_recipe(plan.base_raw, dict(b.params), plan.registry, recipe_path, sweep_dir / "best")
        header = (f"# The best trial of the sweep in {sweep_dir}: trial {b.number}, {metric} = {_fmt(b.value)}\n"
                  f"# (eval split; its run folder: {b.user_attrs.get('run_dir')}). From {recipe_path} with\n"
                  + "".join(f"#   {k} = {_fmt(v)}\n" for k, v in b.params.items())
                  + "# Train it with: finetune run " + str(sweep_dir / "best.toml") + "   (writes output.dir below)\n")
        write_text_atomic(sweep_dir / "best.toml", header + tomli_w.dumps(recipe))
    summary = {"recipe": str(recipe_path), "sweep_dir": str(sweep_dir), "metric": metric, "direction": direction,
               "space": [p.to_json() for p in params],
               "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")},
               "best": best, "trials": rows}
    write_json_atomic(sweep_dir / "sweep.json", summary)
    keys = [p.key for p in params]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", metric, *keys, "duration_s", "run_dir", "error"])
    for r in rows:
        writer.writerow([r["number"], r["state"], "" if r[metric] is None else r[metric],
                         *[r["params"].get(k, "") for k in keys], r["duration_s"] or "", r["run_dir"] or "",
                         r.get("error", "")])
    write_text_atomic(sweep_dir / "trials.csv", out.getvalue())
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The trials as a plain text table: number, params, metric, state, duration."""
    metric = summary["metric"]
    keys = [p["key"] for p in summary["space"]]
    best = (summary.get("best") or {}).get("number")
    header = ["trial", *keys, metric, "state", "took"]
    lines = [header]
    for r in summary["trials"]:
        took = r["duration_s"]
        lines.append([f"{r['number']}{' *' if r['number'] == best else ''}",
                      *[_fmt(r["params"][k]) if k in r["params"] else "-" for k in keys],
                      "-" if r[metric] is None else f"{r[metric]:.4f}", r["state"],
                      "-" if took is None else f"{took:.0f} s"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.summary("")
    console.summary(summary_table(summary))
    counts = summary["counts"]
    console.summary(f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed"
                    + (f", {counts['running']} unfinished" if counts["running"] else "")
                    + f"; {summary['direction']} {summary['metric']} (eval split)")
    best = summary.get("best")
    if best:
        console.summary(f"best: trial {best['number']} (*), {summary['metric']}={best[summary['metric']]:.4f}: "
                        + ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()))
        console.summary(f"best recipe: {best['recipe']}  (finetune run {best['recipe']})")
    console.summary(f"sweep folder: {summary['sweep_dir']} (sweep.json, trials.csv, trial-NNNN/)")
