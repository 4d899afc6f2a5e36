"""Hyperparameter search over a config's ``search()``: Optuna TPE, pruning, trials as sweep arms.

``search()`` returns a dict (see ``docs/search.md``): a ``space`` of dotted config keys, the
number of ``trials``, the objective ``metric``/``mode`` (default ``eval.best_metric`` /
``eval.best_mode``), a ``pruner`` and overrides ``fixed`` for every trial. Each trial is an arm
(``DIR/arms/trial-NNN``) run by a launcher, so trials run wherever arms run (local processes or
Ray). The driver owns the study (ask-and-tell): it watches each trial's ``metrics.jsonl``,
reports every eval of the objective at its step, and stops a trial the pruner rejects (the
launcher sends SIGTERM; the train loop checkpoints and exits). A finished trial's value is the
best eval of its run (``run_summary.json``'s ``best``), the one its best checkpoint holds.

The study lives in ``DIR/study.db`` (SQLite), so a killed search resumes: finished and pruned
trials are read back and not run again, and a trial that was RUNNING is run again in its own arm
dir, where train.py resumes it from its last checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from ftjax.errors import FtjaxError
from ftjax.experiments.launchers import Launcher, forward_signals
from ftjax.experiments.sweep import SEED_KEY, Arm, SweepInterrupted
from ftjax.paths import as_path, is_url
from ftjax.train.logger import read_metrics

STUDY_NAME = "search"
PRUNERS = {"median": optuna.pruners.MedianPruner, "asha": optuna.pruners.SuccessiveHalvingPruner,
           "none": optuna.pruners.NopPruner}


class SearchError(FtjaxError):
    """A ``search()`` that cannot run: a bad space, pruner or objective, or a changed search."""


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    space: dict[str, tuple]
    trials: int
    metric: str
    mode: str  # min | max
    fixed: dict[str, Any]
    pruner: dict[str, Any]
    sampler: dict[str, Any]
    storage: str  # '' = sqlite:///DIR/study.db

    @property
    def direction(self) -> str:
        return "maximize" if self.mode == "max" else "minimize"


def spec_from(entry: dict[str, Any], *, default_metric: str, default_mode: str) -> SearchSpec:
    """Validate what ``search()`` returned; errors name the key at fault."""
    entry = dict(entry)
    unknown = set(entry) - {"space", "trials", "metric", "mode", "fixed", "pruner", "sampler", "storage"}
    if unknown:
        raise SearchError(f"search() returned unknown keys {sorted(unknown)}")
    space = {k: tuple(v) for k, v in dict(entry.get("space") or {}).items()}
    if not space:
        raise SearchError("search() needs a non-empty 'space' of dotted config keys")
    for key, dim in space.items():
        kind = dim[0] if dim else None
        ok = (kind == "choice" and len(dim) == 2 and len(dim[1]) > 0) or (
            kind in ("loguniform", "uniform", "int") and len(dim) == 3 and dim[1] < dim[2])
        if not ok:
            raise SearchError(f"search space {key!r}: {dim!r} is not one of ('loguniform', LOW, HIGH), "
                              "('uniform', LOW, HIGH), ('int', LOW, HIGH) or ('choice', [VALUES])")
    mode = entry.get("mode", default_mode)
    if mode not in ("min", "max"):
        raise SearchError(f"search() mode {mode!r} is not 'min' or 'max'")
    pruner = dict(entry.get("pruner") or {"kind": "median"})
    if pruner.get("kind") not in PRUNERS:
        raise SearchError(f"search() pruner kind {pruner.get('kind')!r} is not one of {sorted(PRUNERS)}")
    trials = int(entry.get("trials", 0))
    if trials < 1:
        raise SearchError("search() needs 'trials' >= 1")
    return SearchSpec(space=space, trials=trials, metric=entry.get("metric", default_metric),
                      mode=mode, fixed=dict(entry.get("fixed") or {}), pruner=pruner,
                      sampler=dict(entry.get("sampler") or {}), storage=entry.get("storage", ""))


def suggest(trial: optuna.Trial, space: dict[str, tuple]) -> dict[str, Any]:
    """Sample one value per dimension of ``space`` (Optuna parameter names are the config keys)."""
    out = {}
    for key, (kind, *args) in space.items():
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, list(args[0]))
        elif kind == "int":
            out[key] = trial.suggest_int(key, int(args[0]), int(args[1]))
        else:
            out[key] = trial.suggest_float(key, float(args[0]), float(args[1]), log=kind == "loguniform")
    return out


def open_study(workdir: str | os.PathLike, spec: SearchSpec) -> optuna.Study:
    """Create (or load, to resume) the study: TPE sampler, the spec's pruner, stored beside the arms."""
    workdir, storage = as_path(workdir), spec.storage
    if not storage:
        if is_url(workdir):
            raise SearchError(f"the study database cannot live in {workdir} (SQLite needs a local "
                              "or mounted folder): set 'storage' in search() to a database URL")
        storage = f"sqlite:///{workdir / 'study.db'}"
    pruner = _build(PRUNERS[spec.pruner["kind"]], {k: v for k, v in spec.pruner.items() if k != "kind"},
                    "pruner")
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=spec.direction,
                                pruner=pruner, load_if_exists=True)
    # A resumed search must not replay the sampler's random stream from its start (that would
    # ask the first trials' parameters again): the seed moves on by the trials already stored.
    sampler = {"seed": 0, **spec.sampler}
    if sampler["seed"] is not None:
        sampler["seed"] += len(study.get_trials(deepcopy=False))
    study.sampler = _build(optuna.samplers.TPESampler, sampler, "sampler")
    return study


def _build(cls: type, kwargs: dict[str, Any], what: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SearchError(f"search() {what} {kwargs}: {cls.__name__} says: {e}") from e


def load_spec(module: Any, arg: str | None, config: Any) -> SearchSpec:
    """The spec of a config module's ``search()`` (``search(arg)`` when it takes the config arg)."""
    entry = module.search(arg) if module.search.__code__.co_argcount else module.search()
    spec = spec_from(entry, default_metric=config.eval.best_metric, default_mode=config.eval.best_mode)
    if spec.pruner["kind"] != "none" and not spec.fixed.get("eval.every_steps", config.eval.every_steps):
        raise SearchError("pruning needs evals during training: set eval.every_steps in the config "
                          "or in search()['fixed'] (or use pruner {'kind': 'none'})")
    return spec


@dataclasses.dataclass
class _Running:
    trial: optuna.Trial
    arm: Arm
    reported: set[int]  # steps whose value the study holds
    future: concurrent.futures.Future | None = None
    pruned_at: int | None = None


class SearchDriver:
    """Asks the study for trials, runs each through ``launcher`` and tells the study how it ended.

    SIGTERM or Ctrl-C stops the running trials at a checkpoint (they stay RUNNING in the study
    and resume on the next run) and raises ``SweepInterrupted``.
    """

    def __init__(self, launcher: Launcher, workdir: str | os.PathLike, spec: SearchSpec, *,
                 parallel: int = 1, echo: Callable[[str], None] = print, poll_s: float = 0.25):
        self.launcher, self.workdir, self.spec = launcher, as_path(workdir), spec
        self.parallel, self.echo, self.poll_s = max(1, parallel), echo, poll_s
        self._stopping = False

    def run(self) -> optuna.Study:
        """Run trials until the study holds ``spec.trials`` of them; returns the study."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_same_search()
        study = open_study(self.workdir, self.spec)
        resume = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if resume:
            self.echo(f"search: continuing trial(s) {', '.join(str(t.number) for t in resume)}, "
                      "running when the search stopped")
        with forward_signals(self._stop), concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
            try:
                self._loop(study, resume, pool)
            except BaseException:  # a driver error: the running trials checkpoint and exit
                self._stop()
                raise
        left = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if self._stopping and left:
            raise SweepInterrupted({t.user_attrs["arm"]: "interrupted" for t in left})
        return study

    def _loop(self, study: optuna.Study, resume: list[optuna.trial.FrozenTrial],
              pool: concurrent.futures.Executor) -> None:
        running: list[_Running] = []
        while True:
            while not self._stopping and len(running) < self.parallel and (
                    resume or len(study.get_trials(deepcopy=False)) < self.spec.trials):
                run = self._start(study, resume.pop(0) if resume else None)
                if run.pruned_at is None:
                    run.future = pool.submit(self.launcher.run_arm, run.arm)
                    running.append(run)
                else:
                    self._tell(study, run, "interrupted")
            if not running:
                return
            time.sleep(self.poll_s)
            for run in list(running):
                if run.future.done():
                    self._tell(study, run, run.future.result())
                    running.remove(run)
                else:
                    self._watch(run)

    def _stop(self) -> None:
        self._stopping = True
        self.launcher.stop_all()

    def _check_same_search(self) -> None:
        path = self.workdir / "search.json"
        spec = json.loads(json.dumps(dataclasses.asdict(self.spec)))
        if path.exists() and json.loads(path.read_text()) != spec:
            raise SearchError(f"{path} holds a different search (space, trials, objective or pruner); "
                              "resume it unchanged or start the new search in another --workdir")
        path.write_text(json.dumps(spec, indent=2))

    def _arm(self, number: int, params: dict[str, Any]) -> Arm:
        overrides = {**self.spec.fixed, **params, "eval.best_metric": self.spec.metric,
                     "eval.best_mode": self.spec.mode}
        return Arm(name=f"trial-{number:03d}", group="search", seed=overrides.get(SEED_KEY),
                   overrides=overrides)

    def _start(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial | None) -> _Running:
        if frozen is None:
            trial = study.ask()
            run = _Running(trial, self._arm(trial.number, suggest(trial, self.spec.space)), set())
            trial.set_user_attr("arm", run.arm.name)
        else:  # Optuna has no public handle on a stored RUNNING trial; Trial(study, id) is its own
            run = _Running(optuna.trial.Trial(study, frozen._trial_id),
                           self._arm(frozen.number, frozen.params), set(frozen.intermediate_values))
            if run.reported and run.trial.should_prune():  # stopped, but not yet told, last time
                run.pruned_at = max(run.reported)
        self.echo(f"[{run.arm.name}] trial {run.trial.number}: " +
                  " ".join(f"{k}={v}" for k, v in run.arm.overrides.items() if k in self.spec.space))
        return run

    def _watch(self, run: _Running) -> None:
        """Report the trial's new evals of the objective; stop it if the pruner says so."""
        if run.pruned_at is not None:
            return
        key, new = f"eval/{self.spec.metric}", False
        for row in read_metrics(self.workdir / "arms" / run.arm.name):
            if key in row and row["step"] not in run.reported:
                run.trial.report(float(row[key]), row["step"])
                run.reported.add(row["step"])
                new = True
        if new and run.trial.should_prune():
            run.pruned_at = max(run.reported)
            self.echo(f"[{run.arm.name}] pruned at step {run.pruned_at}")
            self.launcher.stop_arm(run.arm)

    def _tell(self, study: optuna.Study, run: _Running, status: str) -> None:
        """Tell the study how the trial's run ended (an interrupted one stays RUNNING)."""
        self._watch(run)  # evals logged after the last look
        stopped = status in ("interrupted", "pending")
        if stopped and run.pruned_at is None and self._stopping:
            return
        arm_dir = self.workdir / "arms" / run.arm.name
        summary_path = arm_dir / "run_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if "steps" in summary:
            run.trial.set_user_attr("stopped_at_step", summary["steps"])
        best = summary.get("best") or {}
        value, state, error = None, TrialState.FAIL, None
        if status == "done" and best.get("metric") == self.spec.metric:
            value, state = best["value"], TrialState.COMPLETE
        elif status == "done":
            error = f"{summary_path} holds no best {self.spec.metric!r}"
        elif stopped and run.pruned_at is not None:
            state = TrialState.PRUNED
        elif stopped:
            error = "the trial's process was stopped from outside the search (preempted?)"
        else:
            error = f"the trial's run {status}; see {arm_dir / 'error.txt'}"
        if error:
            run.trial.set_user_attr("error", error)
        frozen = study.tell(run.trial, value, state=state)
        self.echo(f"[{run.arm.name}] trial {frozen.number} {frozen.state.name.lower()}"
                  + (f" ({self.spec.metric}={frozen.value:.4g})" if frozen.value is not None else "")
                  + (f": {error}" if error else ""))
