"""``ablate tune SPEC``: an Optuna search of MetaAdamW's uncertainty-weighting priorities (and,
when the file asks, other numeric knobs), run through Ray Tune. With ``tune: {arm: adamw}`` it
searches the AdamW arm's own settings instead (its ``lr``, say), so that both optimizers can be
given the same tuning budget.

The spec is a study file (``search_spaces/README.md``) plus a ``tune:`` section. Every *target*
- each task, or with ``cross_task: true`` all tasks at once - has its own Optuna study, stored
persistently, so running the command again *extends* the stored study by ``--trials`` more
suggestions instead of starting over.

How one suggestion is scored
    Its values are applied to the study's baseline arm (``budget`` + ``baseline`` + the task's
    ``overrides``; with ``arm: adamw``, to the AdamW arm's trials) and trained for every seed of the study - all seeds in lockstep inside one
    Ray trial: epoch 1 of every seed, report, epoch 2 of every seed, report, ... Each report
    carries the *objective* so far: per seed the best validation value reached (the task's
    primary metric, which is also what early stopping tracks), aggregated over the seeds by the
    mean or the median. So the early-termination scheduler (ASHA on ``training_iteration`` =
    epochs) sees one curve per suggestion, and the final report is the suggestion's score. ASHA's
    grace period defaults to ``warmup_epochs + 1``: the warm-up epochs have no meta-updates, so
    they train every suggestion identically. The direction comes from the task's metric mode. In cross-task mode each seed's best value is
    turned into a relative improvement over the AdamW arm on the same task and seed (positive =
    better; AdamW is run once through :func:`ablate.sweep.run_study` and cached under
    ``OUT/<name>/tune/adamw_reference``), aggregated over seeds per task, then averaged over the
    tasks, and maximised.

Search machinery
    Ray Tune's own :class:`ray.tune.search.optuna.OptunaSearch` with a persistent Optuna storage
    (it calls ``optuna.create_study(storage=..., load_if_exists=True)`` and asks/tells through
    the storage, so the study lives outside the process). Two of its behaviours are wrong for a
    stored study and are corrected in the subclass :class:`StoredStudySearch`:

    * a trial that the scheduler stops early is told ``COMPLETE`` with the value of the epoch it
      was stopped at, which would put partial-budget values among the finished ones; here it is
      told ``PRUNED`` (Optuna then records its last intermediate value, as its own pruners do),
      and only a trial whose last report says it finished every seed is ``COMPLETE``;
    * its ``save()`` pickles the whole study (storage included) into Ray's experiment
      checkpoint; here the stored study *is* the state, so nothing else is saved.

    It also records per-seed values, which process asked for a trial (``driver``) and how the
    trial ended as Optuna user attributes, fails (rather than leaves ``RUNNING`` forever) the
    trials of an interrupted run - and, at the next run on the same machine, those of a killed one
    (:func:`fail_orphans`) - and skips non-finite intermediate values; a suggestion with a
    diverged member is ``FAIL``, also when the scheduler stopped it. Samplers are seeded *per trial* from ``(sampler_seed, trial
    number)`` (:class:`PerTrialSeededSampler`), so a search is reproducible, an extension does not
    replay the random start-up points of the first run, and two processes extending one study at
    once do not propose the same points.

Storage
    ``tune.storage`` / ``--study-storage``: ``null`` = the journal file
    ``OUT/<name>/tune/optuna.journal`` (one file, one study per target named ``<name>/<task>`` or
    ``<name>/cross_task``; safe for several processes, also over NFS); a path = another journal
    file; ``sqlite:///...``, ``postgresql://...`` = a database. Open it with
    ``optuna-dashboard OUT/<name>/tune/optuna.journal`` (``pip install optuna-dashboard``) or
    ``optuna.load_study(study_name="<name>/<task>", storage=ablate.tune.open_storage(path))``.
    A stored study remembers what its values mean (the trial configs, seeds, aggregate); a spec
    whose objective differs from the stored one is refused rather than mixed into it.

Outputs (``OUT/<name>/tune/``, rewritten from the stored studies after every invocation; where no
target has a finished suggestion, an earlier run's best-values file is set aside as ``<file>.stale``,
not left to be read as this search's)
    ``best_priorities.yaml`` - ``{task: {priorities: [p1, p2, p3], tuned_on_seeds: [...],
    tuned_for: baseline, tuned_with: {meta_optimizer: ..., ...}}}`` (with ``meta_lr: ...`` and the
    like when other knobs are tuned; ``tuned_with``: the settings they were tuned with, see
    :func:`ablate.study.tuning_context`, which a study running others is warned about - with
    ``cross_task``, also ``adamw_reference:``, the settings of the AdamW arm they were scored against), for
    ``baseline: {priorities_from: FILE}`` in a study file (with ``arm: adamw``: ``best_adamw.yaml``,
    ``{task: {lr: ..., tuned_on_seeds: [...], tuned_for: adamw, tuned_with: {...}}}``, for
    ``adamw: {tuned_from: FILE}``); ``history.parquet`` - one row per Optuna trial: ``task, study, number, value,
    state, direction, params_<name>..., datetime_start, datetime_complete, duration_s, epochs,
    baseline, arm, ended, chosen``; ``importances.parquet`` - ``task, param, importance`` (fANOVA,
    complete trials); ``targets.json`` - the run's targets, for the report.

The best values are those of the best finished suggestion, except that the arm's own values (the
first suggestion, ``baseline``; where the spec has changed them since, that of the new values, which
the next run evaluates first) are kept when they tie with it (:func:`ablate.stats.tuning_tie`:
within a relative 1e-6 per task): a suggestion that wins by float rounding is no better. Optuna's
``study.best_trial`` (and optuna-dashboard) then names the other trial; ``history.parquet``'s
``chosen`` column marks the one written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import optuna
import yaml

from ablate.config import (
    ALTERNATIVE_KEYS,
    COMMON_FIELDS,
    METAADAMW_KEYS,
    ConfigError,
    did_you_mean,
    identity_config,
    is_number,
    resolve_config,
    validate_value,
    with_alternatives,
)
from ablate.files import atomic_write_bytes
from ablate.stats import TUNING_TIE_TOL, tuning_tie
from ablate.study import (ADAMW_REFERENCE, DATA_FINGERPRINT, TUNED_FILES, TUNED_FOR, TUNED_ON_SEEDS, TUNED_WITH, Study,
                          StudyError, _check_keys, _read_yaml, parse_study, run_data_fingerprint, tuned_file_usage,
                          tuning_context)

#: Optuna parameter names of the three HUW priorities, in the order of the ``priorities`` list.
PRIORITY_PARAMS = ("p_gradient", "p_loss_decrease", "p_gen_gap")
#: The metric every report carries (the objective so far) and the flag of a trial's last report.
OBJECTIVE = "objective"
FINAL = "final"
#: the key of the first report that carries the members' warnings (a JSON list), which the driver prints
WARNINGS_KEY = "member_warnings"
#: the objective a report carries while the suggestion has no finite value (negated when maximising)
NO_VALUE = sys.float_info.max
JOURNAL_FILE = "optuna.journal"
HEARTBEAT_S = 60.0  # a progress line about the running suggestions at most this often
BEST_FILE = TUNED_FILES["baseline"]
#: the suffix an earlier run's best-values file is set aside with, where a run has no best values of its own
STALE_SUFFIX = ".stale"
#: the arms whose settings a search can tune (``tune.arm``)
ARMS = ("baseline", "adamw")
CROSS_TASK = "cross_task"
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
AGGREGATES = ("mean", "median")

#: The keys of the ``tune:`` section, with what each holds.
TUNE_KEYS = {
    "trials": "suggestions per target (task, or the cross-task vector) per invocation, integer >= 0 (--trials overrides)",
    "sampler": f"the Optuna sampler: {' | '.join(SAMPLERS)}",
    "sampler_seed": "integer >= 0 (reproducible suggestions), or null",
    "aggregate": f"how a suggestion's per-seed values are combined: {' | '.join(AGGREGATES)}",
    "arm": "whose settings are searched: baseline (MetaAdamW) or adamw (AdamW's own, e.g. lr: the same tuning budget)",
    "priorities": "the range of each of the three priorities {low, high, log} (a key left out: the default's, "
                  "{low: 0.1, high: 10.0, log: true}: a log scale unless log: false), or false to keep the "
                  "baseline's (arm: baseline only)",
    "params": "other numeric config keys to search: {key: {low, high, log}} (low and high required; log left out: "
              "false, a linear scale)",
    "scheduler": "early termination: {type: asha, grace_period: epochs >= 1, reduction_factor: > 1}, or none",
    "cross_task": "true: one vector for every task, scored by the mean relative improvement over AdamW",
    "storage": f"null (OUT/<name>/tune/{JOURNAL_FILE}), a journal file path (relative to this file) or a database URL",
    "max_concurrent": "Ray trials (suggestions) running at once per target, integer >= 1",
    "enqueue_baseline": "true: a new study first evaluates the searched arm's own values (when inside the ranges; "
                        "again where that run was cut off, or the spec now gives the arm other values)",
}
RANGE_KEYS = {"low": "the lower bound", "high": "the upper bound (> low)",
              "log": "true: search on a log scale (low > 0); left out: true for tune.priorities (the default range's), "
                     "false for tune.params"}
#: a ``tune.params`` range whose ``high / low`` is at least this, without ``log:``, is warned about:
#: searched on its (default) linear scale, nearly every suggestion falls in its top decade
WIDE_LINEAR_RANGE = 100.0
SCHEDULER_KEYS = {
    "type": "asha or none",
    "grace_period": "epochs every suggestion runs before it may be stopped (integer > warmup_epochs; default warmup_epochs + 1)",
    "reduction_factor": "ASHA keeps the best 1/reduction_factor at each rung (number > 1)",
}
DEFAULT_SCHEDULER = {"type": "asha", "grace_period": None, "reduction_factor": 2}  # None: warmup_epochs + 1

#: Config keys that ``tune.params`` may search: the numeric MetaAdamW and AdamW hyperparameters.
TUNABLE_KEYS = tuple(
    k for k, f in COMMON_FIELDS.items()
    if f.type in (int, float) and (k in METAADAMW_KEYS or k in ("lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip"))
    and k not in ("modulator_heads", "modulator_width")  # constrained together (width % heads == 0)
)


# ---------------------------------------------------------------------------------------------
# the spec


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric search range; ``integer`` ranges sample integers."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def distribution(self):
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        return is_number(value) and self.low <= value <= self.high and (not self.integer or float(value).is_integer())


#: the default range of each priority (``tune.priorities``; a key a file leaves out takes this one's)
DEFAULT_PRIORITIES = Range(0.1, 10.0, True)


@dataclasses.dataclass
class TuneSettings:
    trials: int = 20
    #: where ``trials`` came from, for messages: ``"--trials"`` (the command line) or ``"tune.trials"`` (the file)
    trials_from: str = "tune.trials"
    sampler: str = "tpe"
    sampler_seed: int | None = 0
    aggregate: str = "mean"
    priorities: Range | None = DEFAULT_PRIORITIES
    params: dict[str, Range] = dataclasses.field(default_factory=dict)
    scheduler: dict[str, Any] | None = dataclasses.field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    cross_task: bool = False
    storage: str | None = None  # as written in the file (a path is resolved against the spec's directory)
    max_concurrent: int = 2
    enqueue_baseline: bool = True
    arm: str = "baseline"

    @property
    def best_file(self) -> str:
        """The file the best values are written to (``best_priorities.yaml`` or ``best_adamw.yaml``)."""
        return TUNED_FILES[self.arm]

    def space(self) -> dict[str, Range]:
        """Optuna parameter name -> range, the priorities first."""
        space = {p: self.priorities for p in PRIORITY_PARAMS} if self.priorities is not None else {}
        return {**space, **self.params}


@dataclasses.dataclass
class Target:
    """What one Optuna study optimises: a task, or every task together (cross-task)."""

    key: str  # the task's name, or "cross_task"
    study_name: str
    direction: str  # "minimize" | "maximize"
    description: str  # what a value is, for messages
    members: list[dict[str, Any]]  # {"task", "seed", "config"}: the baseline trials a suggestion is applied to
    modes: dict[str, str]  # task -> "min" | "max"
    epochs: int  # the most epochs a member runs (ASHA's max_t)
    references: dict[str, float] | None = None  # cross-task: "task/seed" -> AdamW's best value


@dataclasses.dataclass
class TuneSpec:
    study: Study
    settings: TuneSettings
    path: Path | None
    source: str

    @property
    def name(self) -> str:
        return self.study.name

    def arm_trials(self, task: str) -> list[Any]:
        """The trials of the searched arm (``tune.arm``) on ``task``, by seed."""
        arm = self.settings.arm
        return sorted((t for t in self.study.trials if t.task == task and arm in t.arms), key=lambda t: t.seed)


def load_tune_spec(path: str | os.PathLike, *, trials: int | None = None) -> TuneSpec:
    """Read and validate a tune spec (a study file with a ``tune:`` section)."""
    path = Path(path)
    spec = parse_tune_spec(_read_yaml(path), str(path), base_dir=path.parent, trials=trials)
    spec.path = path
    spec.study.path = path
    return spec


def parse_tune_spec(mapping: Any, source: str = "<string>", *, base_dir: str | os.PathLike | None = None,
                    trials: int | None = None) -> TuneSpec:
    """Validate the study part (:func:`ablate.study.parse_study`) and the ``tune:`` section; every
    problem is a :class:`StudyError` naming the file and the field path (the problems of the two
    parts together, so that a spec with several is fixed in one go)."""
    if not isinstance(mapping, dict):
        raise StudyError(f"{source}: a tune spec must be a mapping (a study file with a tune: section); got {mapping!r:.80}")
    problems: list[str] = []  # (the tune: section's, and the study's own: said together)
    for key in ("ablations", "factorial"):
        if mapping.get(key) is not None:
            problems.append(
                f"{source}: {key}: is not used by `ablate tune`, which searches one arm's settings (tune.arm); "
                f"remove it (run the ablations with `ablate run`, e.g. with baseline: {{priorities_from: "
                f".../{BEST_FILE}}})"
            )
    try:
        settings = _parse_tune_section(mapping.get("tune"), source, trials)
    except StudyError as exc:
        settings = None
        problems += exc.problems
    study_part = {k: v for k, v in mapping.items() if k not in ("ablations", "factorial")}  # (refused above)
    try:
        with warnings.catch_warnings():
            if problems:  # (the study's warnings wait for a spec that is read: its errors are what to fix first)
                warnings.simplefilter("ignore")
            # (the keys searched now are not compared with a tuned file's tuned_with: e.g. meta_lr searched again on
            # top of baseline: {priorities_from: ...}, whose priorities were tuned with one meta_lr)
            study = parse_study(study_part, source, base_dir=base_dir,
                                searched={settings.arm: _searched_setting_keys(settings)} if settings else None)
    except StudyError as exc:
        problems += exc.problems
    if problems:
        raise StudyError(*problems)
    if settings.arm == "adamw" and not any("adamw" in t.arms for t in study.trials):
        raise _err(source, "arm", "is adamw, but the study has adamw: false; set adamw: true (or a mapping of its "
                                  "settings)")
    _check_against_study(settings, study, source)
    return TuneSpec(study, settings, None, source)


def _err(source: str, path: str, message: str) -> StudyError:
    return StudyError(f"{source}: tune.{path}: {message}" if path else f"{source}: tune: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_section(source: str, path: str) -> Callable[[str], str]:
    """For :func:`ablate.study._check_keys`: where a key of the mapping at ``path`` of the tune:
    section is (``<file>: tune.<path>.<key>``)."""
    return lambda key: f"{source}: tune.{path}.{key}" if path else f"{source}: tune.{key}"


def _parse_tune_section(section: Any, source: str, trials: int | None) -> TuneSettings:
    """The ``tune:`` section's settings; its independent problems are raised together (one
    StudyError), a check that needs another key's value only where that key was read."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise _err(source, "", f"must be a mapping of: {', '.join(TUNE_KEYS)}; got {section!r:.80}")
    problems: list[str] = []
    failed: set[str] = set()  # the keys whose value was refused (the checks that need them are left out)

    def read(key: str, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except StudyError as exc:
            problems.extend(exc.problems)
            failed.add(key)
            return None  # (the section is refused: a refused key's value is not used)

    def refuse(key: str, message: str) -> None:  # (a problem found here: noted like read()'s)
        problems.append(str(_err(source, key, message)))
        failed.add(key)

    read("", lambda: _check_keys(section, TUNE_KEYS, _in_section(source, "")))
    given = {k: v for k, v in section.items() if v is not None or k in ("sampler_seed", "storage")}
    s = TuneSettings()
    if "trials" in given:
        s.trials = read("trials", lambda: _int_at_least(source, "trials", given["trials"], 0))
    if trials is not None:
        s.trials = read("trials", lambda: _int_at_least(source, "trials (--trials)", trials, 0))
        s.trials_from = "--trials"
    if "sampler" in given:
        s.sampler = read("sampler", lambda: _choice(source, "sampler", given["sampler"], SAMPLERS))
    if s.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append(str(_err(source, "sampler", "cmaes needs the `cmaes` package (pip install cmaes); or choose "
                                     "one of: " + ", ".join(x for x in SAMPLERS if x != "cmaes"))))
    if "sampler_seed" in given and given["sampler_seed"] is not None:
        s.sampler_seed = read("sampler_seed", lambda: _int_at_least(source, "sampler_seed", given["sampler_seed"], 0))
    elif "sampler_seed" in given:
        s.sampler_seed = None
    if "aggregate" in given:
        s.aggregate = read("aggregate", lambda: _choice(source, "aggregate", given["aggregate"], AGGREGATES))
    if "arm" in given:
        s.arm = read("arm", lambda: _choice(source, "arm", given["arm"], ARMS))
    if "priorities" in given and "arm" not in failed:
        pr = given["priorities"]
        if s.arm == "adamw" and pr is not False:
            refuse("priorities", "are MetaAdamW's, and arm: adamw searches AdamW's settings; remove "
                                 "tune.priorities (or set it to false)")
        else:  # (a key left out takes the default range's: {low: 0.5, high: 5} is searched on its log scale too)
            s.priorities = None if pr is False else read("priorities", lambda: _parse_range(
                source, "priorities", pr, float, minimum=0.0, defaults=DEFAULT_PRIORITIES))
    if "params" in given:
        s.params = read("params", lambda: _parse_params(source, given["params"])) or {}
    if s.arm == "adamw" and not failed & {"arm", "params"}:
        s.priorities = None
        for key in s.params:
            if key in METAADAMW_KEYS:
                problems.append(str(_err(source, f"params.{key}", "is a MetaAdamW setting, which the AdamW arm does not "
                                                                  "use (arm: adamw); search it with arm: baseline")))
        if not s.params:
            problems.append(str(_err(source, "params", "is empty, so arm: adamw has nothing to search; give AdamW's "
                                                        "settings, e.g. params: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}")))
    elif s.priorities is None and not s.params and not failed & {"arm", "priorities", "params"}:
        problems.append(str(_err(source, "priorities", "is false and params: is empty, so there is nothing to search")))
    if "scheduler" in given:
        s.scheduler = read("scheduler", lambda: _parse_scheduler(source, given["scheduler"]))
    if "cross_task" in given:
        if not isinstance(given["cross_task"], bool):
            refuse("cross_task", f"must be true or false, got {given['cross_task']!r:.80}")
        else:
            s.cross_task = given["cross_task"]
    if s.cross_task and s.arm == "adamw" and "arm" not in failed:
        problems.append(str(_err(source, "cross_task", "scores improvements over the AdamW arm, which arm: adamw is "
                                                       "searching; tune AdamW per task (cross_task: false)")))
    if given.get("storage") is not None:
        if not isinstance(given["storage"], str) or not given["storage"].strip() or "\0" in given["storage"]:
            problems.append(str(_err(source, "storage", f"must be null, a journal file path or a database URL; got "
                                                        f"{given['storage']!r:.80}")))
        else:
            s.storage = given["storage"]
    if "max_concurrent" in given:
        s.max_concurrent = read("max_concurrent", lambda: _int_at_least(source, "max_concurrent",
                                                                        given["max_concurrent"], 1))
    if "enqueue_baseline" in given:
        if not isinstance(given["enqueue_baseline"], bool):
            problems.append(str(_err(source, "enqueue_baseline", f"must be true or false, got "
                                                                 f"{given['enqueue_baseline']!r:.80}")))
        else:
            s.enqueue_baseline = given["enqueue_baseline"]
    if problems:
        raise StudyError(*problems)
    return s


def _int_at_least(source: str, path: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise _err(source, path, f"must be an integer >= {minimum}, got {value!r:.80}")
    return value


def _choice(source: str, path: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise _err(source, path, f"{value!r:.80} is not allowed{hint}; choose one of: {', '.join(allowed)}")
    return value


def _parse_range(source: str, path: str, spec: Any, kind: type, minimum: float | None = None,
                 key: str | None = None, defaults: Range | None = None) -> Range:
    """``{low, high, log}``; with ``defaults``, a key left out (or null) takes the default range's."""
    if not isinstance(spec, dict):
        raise _err(source, path, f"must be a mapping {{low: ..., high: ..., log: true|false}}; got {spec!r:.80}")
    _check_keys(spec, RANGE_KEYS, _in_section(source, path))
    log_given = spec.get("log") is not None
    defaulted = {k for k in ("low", "high") if spec.get(k) is None} if defaults is not None else set()
    if defaults is not None:
        spec = {"low": defaults.low, "high": defaults.high, "log": defaults.log,
                **{k: v for k, v in spec.items() if v is not None}}
    problems: list[str] = []  # (each bound's and log's: said together)

    def check_bound(bound: str) -> None:
        if bound not in spec or spec[bound] is None:
            raise _err(source, f"{path}.{bound}", f"is required ({RANGE_KEYS[bound]})")
        value = spec[bound]
        if kind is int and not _is_int(value):
            raise _err(source, f"{path}.{bound}", f"{key} is an integer key, so its bounds must be integers; got {value!r:.80}")
        if not is_number(value):
            raise _err(source, f"{path}.{bound}", f"must be a finite number, got {value!r:.80}")
        if minimum is not None and value < minimum:
            raise _err(source, f"{path}.{bound}", f"must be >= {minimum}, got {value!r}")
        if key is not None:  # the bound itself must be a valid value of the config key
            try:
                validate_value(key, float(value) if kind is float else value, f"{source}: tune.{path}.{bound}")
            except ConfigError as exc:
                raise StudyError(str(exc)) from None

    for bound in ("low", "high"):
        try:
            check_bound(bound)
        except StudyError as exc:
            problems += exc.problems
    log = spec.get("log", False)
    if log is None:
        log = False
    if not isinstance(log, bool):
        problems += _err(source, f"{path}.log", f"must be true or false, got {log!r:.80}").problems
    if problems:  # (the checks below compare the bounds, and read log)
        raise StudyError(*problems)
    low, high = spec["low"], spec["high"]
    if low >= high:
        raise _err(source, path, f"low ({low}{', the default' if 'low' in defaulted else ''}) must be less than high "
                                 f"({high}{', the default' if 'high' in defaulted else ''})"
                                 + (f"; give {' and '.join(sorted(defaulted))} too" if defaulted else ""))
    if log and low <= 0:
        default = (f" (tune.{path} takes the keys left out from {{low: {defaults.low}, high: {defaults.high}, log: "
                   f"{str(defaults.log).lower()}}})" if defaults is not None and not log_given else "")
        raise _err(source, f"{path}.low", f"must be > 0 on a log scale (log: true{'' if log_given else ', the default'}), "
                                          f"got {low}{default}{'' if log_given else '; or set log: false'}")
    if not log_given and defaults is None and low > 0 and high / low >= WIDE_LINEAR_RANGE:
        # (tune.priorities default to a log scale, tune.params to a linear one: a params range written like a
        # priorities range - {low: 1.0e-5, high: 1.0e-2} - was searched linearly without a word)
        warnings.warn(f"{source}: tune.{path}: {{low: {low:g}, high: {high:g}}} spans {math.log10(high / low):.1f} "
                      f"orders of magnitude on a linear scale (log left out is false for tune.params, unlike "
                      f"tune.priorities), so {(high - high / 10) / (high - low):.0%} of the suggestions fall above "
                      f"{high / 10:g}; "
                      f"set log: true to search it on a log scale, or log: false to keep the linear one",
                      stacklevel=2)
    return Range(low, high, log, kind is int)


def _parse_params(source: str, params: Any) -> dict[str, Range]:
    if not isinstance(params, dict):
        raise _err(source, "params", f"must be a mapping {{config_key: {{low, high, log}}}}; got {params!r:.80}")
    out: dict[str, Range] = {}
    problems: list[str] = []  # (each key's: said together)
    for key, spec in params.items():
        try:
            if key == "priorities" or key in PRIORITY_PARAMS:
                raise _err(source, f"params.{key}", "the priorities are searched by tune.priorities: {low, high, log}")
            if key not in TUNABLE_KEYS:
                raise _err(source, f"params.{key}", f"is not a numeric config key that can be searched"
                           f"{did_you_mean(key, TUNABLE_KEYS)}; "
                           f"choose from: {', '.join(TUNABLE_KEYS)}")
            out[key] = _parse_range(source, f"params.{key}", spec, COMMON_FIELDS[key].type, key=key)
            other = ALTERNATIVE_KEYS.get(key)
            if other in out:  # (a suggestion would set both: one of them silently unused, and the best values refused)
                raise _err(source, f"params.{key}", f"and params.{other} both set the meta-update frequency; search "
                                                    f"one of them")
        except StudyError as exc:
            problems += exc.problems
    if problems:
        raise StudyError(*problems)
    return out


def _parse_scheduler(source: str, spec: Any) -> dict[str, Any] | None:
    if spec is False or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str) and spec.lower() == "asha":
        return dict(DEFAULT_SCHEDULER)
    if not isinstance(spec, dict):
        raise _err(source, "scheduler", f"must be a mapping like {DEFAULT_SCHEDULER} or none; got {spec!r:.80}")
    _check_keys(spec, SCHEDULER_KEYS, _in_section(source, "scheduler"))
    kind = spec.get("type", "asha")
    if kind is None or kind is False or (isinstance(kind, str) and kind.lower() == "none"):
        if set(spec) - {"type"}:
            raise _err(source, "scheduler", "type is none, so grace_period and reduction_factor have no effect; remove them")
        return None
    problems: list[str] = []  # (each key's: said together)
    try:
        _choice(source, "scheduler.type", kind, ("asha", "none"))
    except StudyError as exc:
        problems += exc.problems
    out = dict(DEFAULT_SCHEDULER)
    if spec.get("grace_period") is not None:
        try:
            out["grace_period"] = _int_at_least(source, "scheduler.grace_period", spec["grace_period"], 1)
        except StudyError as exc:
            problems += exc.problems
    if spec.get("reduction_factor") is not None:
        rf = spec["reduction_factor"]
        if not is_number(rf) or rf <= 1:
            problems += _err(source, "scheduler.reduction_factor", f"must be a number > 1, got {rf!r:.80}").problems
        out["reduction_factor"] = rf
    if problems:
        raise StudyError(*problems)
    return out


def _check_priorities_matter(config: dict[str, Any], task: str, source: str) -> None:
    """Refuse a priority search whose suggestions all train alike: a built-in weighting that takes
    no priorities, or ``huw_priority`` on an objective with none of the three terms they weigh - or
    without some of them, whose priorities would be searched (and written) for nothing (a
    weighting a user registered is given the priorities: its use of them is its own). An objective
    of a single term gets its own message: priorities weigh terms against each other, so none of
    the three means anything there, and ``tune.priorities: false`` alone leaves nothing to search
    (the message says to name what to search in ``tune.params``)."""
    from metaadamw.objectives import TERM_ORDER
    from metaadamw.optimizer import _make_objective
    from metaadamw.weighting import IGNORE_PRIORITIES

    weighting = config["weighting"]
    if weighting in IGNORE_PRIORITIES:
        raise StudyError(
            f"{source}: tune.priorities: the baseline of task {task!r} uses weighting={weighting!r}, "
            f"which ignores the priorities; set baseline: {{weighting: huw_priority}} or tune.priorities: false")
    if weighting == "huw_priority":
        terms = list(_make_objective(config["objective"]).terms)
        if not set(terms) & set(TERM_ORDER):
            raise StudyError(
                f"{source}: tune.priorities: the baseline of task {task!r} uses objective={config['objective']!r}, "
                f"whose terms {terms} are none of the {list(TERM_ORDER)} the priorities weigh (huw_priority weighs "
                f"other terms 1.0), so every suggestion would train alike; use an objective with those terms, a "
                f"weighting of your own that uses the priorities, or tune.priorities: false")
        missing = [t for t in TERM_ORDER if t not in terms]
        if missing and len(terms) == 1:  # (priorities weigh terms against each other: one term, nothing to weigh)
            raise StudyError(
                f"{source}: tune.priorities: the baseline of task {task!r} uses objective={config['objective']!r}, "
                f"whose terms {terms} lack {missing}: with a single term the priorities mean nothing - they weigh the "
                f"terms against each other; those of {missing} weigh no term, and the priority of {terms[0]!r} "
                f"itself is largely absorbed by its learned log-variance (it rescales the meta-gradient, as meta_lr "
                f"does) - and the "
                f"search would write meaningless values to best_priorities.yaml. To search priorities, use an "
                f"objective with all of {list(TERM_ORDER)} (objective: combined); to tune this objective, set "
                f"tune.priorities: false and name what to search in tune.params, e.g. params: {{meta_lr: {{low: "
                f"1.0e-5, high: 1.0e-3, log: true}}}}")
        if missing:  # their priorities weigh nothing: dimensions without effect, recorded as if tuned
            raise StudyError(
                f"{source}: tune.priorities: the baseline of task {task!r} uses objective={config['objective']!r}, "
                f"whose terms {terms} lack {missing}: the priorities of {missing} weigh nothing, so the search would "
                f"spend its suggestions on dimensions that change nothing and write values for them to "
                f"best_priorities.yaml; use an objective with all of {list(TERM_ORDER)} (objective: combined), a "
                f"weighting of your own that uses the priorities, or tune.priorities: false")


def _check_against_study(s: TuneSettings, study: Study, source: str) -> None:
    """The search against the study: priorities must matter, the ranges must give valid configs,
    ASHA's grace period must fit the epochs, cross-task needs the AdamW arm. Every task is checked
    and every problem raised together (one StudyError), so that a spec with several is fixed in one go."""
    problems: list[str] = []

    def note(exc: ConfigError) -> None:
        problems.extend(getattr(exc, "problems", None) or [str(exc)])

    for task in study.tasks:
        trials = [t for t in study.trials if t.task == task and s.arm in t.arms]
        config = trials[0].config
        if s.priorities is not None:
            try:
                _check_priorities_matter(config, task, source)
            except StudyError as exc:
                note(exc)
        for corner in ("low", "high"):
            settings = settings_from_params({p: getattr(r, corner) for p, r in s.space().items()})
            try:
                resolve_config(apply_settings(config, settings), where=f"{source}: tune ({corner} ends of the ranges, task {task})")
            except ConfigError as exc:
                note(exc)
        epochs = max(t.config["epochs"] for t in trials)
        warmup = max(t.config["warmup_epochs"] for t in trials) if _meta_only(s) else 0
        if epochs <= warmup:
            problems.append(
                f"{source}: budget.epochs: task {task!r} trains {epochs} epoch(s), all of them warm-up epochs "
                f"(warmup_epochs={warmup}) without meta-updates, so no suggestion can change anything; "
                f"give it more epochs or fewer warm-up epochs"
            )
        searched = s.params.get("warmup_epochs")
        if searched is not None and searched.high >= min(t.config["epochs"] for t in trials):
            note(_err(source, "params.warmup_epochs",
                      f"reaches {searched.high:g}, but task {task!r} trains "
                      f"{min(t.config['epochs'] for t in trials)} epoch(s): suggestions that far up would have no "
                      f"meta-update at all; keep high below the epochs"))
        grace = s.scheduler and s.scheduler["grace_period"]
        if grace and grace > epochs:
            note(_err(source, "scheduler.grace_period",
                      f"{grace} is more than the {epochs} epoch(s) of task {task!r}; lower it"))
        if grace and grace <= warmup:  # (warmup is 0 when an AdamW knob or warmup_epochs itself is searched)
            note(_err(source, "scheduler.grace_period",
                      f"{grace} is within the warm-up of task {task!r} (warmup_epochs={warmup}), whose epochs have no "
                      f"meta-updates and so train every suggestion identically: ASHA would stop suggestions on ties. "
                      f"Use at least {warmup + 1}, or leave it out (the default is warmup_epochs + 1)"))
    if s.cross_task and not any("adamw" in t.arms for t in study.trials):
        note(_err(source, "cross_task", "scores against the AdamW arm, but the study has adamw: false; set adamw: true"))
    if problems:
        raise StudyError(*problems)


# ---------------------------------------------------------------------------------------------
# suggestions -> trial configs


def settings_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna parameters -> trial-config settings (``p_*`` -> ``priorities``)."""
    out: dict[str, Any] = {}
    if all(p in params for p in PRIORITY_PARAMS):
        out["priorities"] = [float(params[p]) for p in PRIORITY_PARAMS]
    for key, value in params.items():
        if key not in PRIORITY_PARAMS:
            out[key] = float(value) if COMMON_FIELDS[key].type is float else int(value)
    return out


def params_from_config(config: Mapping[str, Any], space: Mapping[str, Range]) -> dict[str, Any]:
    """The values a resolved config has for the searched parameters (for enqueuing the baseline)."""
    out = {}
    for name in space:
        if name in PRIORITY_PARAMS:
            out[name] = config["priorities"][PRIORITY_PARAMS.index(name)]
        else:
            out[name] = config.get(name)
    return out


def apply_settings(config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``settings`` on top; a frequency key drops its alternative."""
    out = dict(config)
    for key, value in settings.items():
        if key in ALTERNATIVE_KEYS:
            out.pop(ALTERNATIVE_KEYS[key], None)
        out[key] = value
    return out


def score(values: list[float], members: list[dict[str, Any]], aggregate: str,
          references: Mapping[str, float] | None = None, modes: Mapping[str, str] | None = None) -> float:
    """The objective of one suggestion from each member's best value so far: aggregated over the
    seeds; cross-task (``references`` given) each value is first a relative improvement over the
    AdamW reference of its task and seed, and the per-task aggregates are averaged. NaN when a
    member has no finite value."""
    agg = statistics.fmean if aggregate == "mean" else statistics.median
    if any(not math.isfinite(v) for v in values):
        return math.nan
    if references is None:
        return float(agg(values))
    per_task: dict[str, list[float]] = {}
    for value, m in zip(values, members):
        ref = references[f"{m['task']}/{m['seed']}"]
        rel = (ref - value) / abs(ref) if modes[m["task"]] == "min" else (value - ref) / abs(ref)
        per_task.setdefault(m["task"], []).append(rel)
    return float(statistics.fmean(agg(v) for v in per_task.values()))


# ---------------------------------------------------------------------------------------------
# the trainable (runs in Ray workers)


def _advance(trial) -> dict[str, Any] | None:
    """One epoch of an :class:`ablate.trial.Trial` (one pass of ``Trial.run``'s loop); None when the
    trial has stopped (budget, early stopping, divergence)."""
    return None if trial.done else trial.run_epoch()


def _finished(trial) -> bool:
    return bool(trial.stop_reason) or trial.epoch >= trial.config["epochs"]


def _best_so_far(trial) -> float:
    """A member's best validation value so far; NaN once it diverged (its best from before the
    divergence is not a result: ``ablate run`` excludes such a trial as "diverged", and a
    suggestion with a diverged member is told FAIL, never a candidate for the best priorities)."""
    if trial.stop_reason == "diverged":
        return math.nan
    return float(trial.best_value) if trial.best_state is not None else math.nan


def tune_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one suggestion, every member (task x seed) in lockstep."""
    import torch
    from ray import tune

    from ablate.sweep import prepare_worker, worker_warnings

    prepare_worker(config)
    from ablate.trial import Trial

    settings = settings_from_params({k: config[k] for k in config["param_names"]})
    threads = max(1, int(config["cpus"]))
    torch.set_num_threads(threads)
    members = config["members"]
    trials = []
    with worker_warnings() as member_warnings:  # (printed by the driver with the first result, as `ablate run` does)
        for m in members:
            cfg = apply_settings(m["config"], settings)
            cfg["num_threads"] = cfg.get("num_threads") or threads
            trials.append(Trial(cfg))
    minimize = config["direction"] == "minimize"
    start = time.monotonic()
    for epoch in range(1, max(t.config["epochs"] for t in trials) + 1):
        for t in trials:
            _advance(t)
        values = [_best_so_far(t) for t in trials]
        value = score(values, members, config["aggregate"], config.get("references"), config["modes"])
        # a diverged member's value is NaN for good, so the suggestion can only be told FAIL: training the
        # other members on to the last epoch would spend the search's budget on a result never used
        done = all(_finished(t) for t in trials) or any(t.stop_reason == "diverged" for t in trials)
        # no value: the worst *finite* number, which ASHA ranks last like an infinity, but without the NaN cutoffs
        # (and numpy's "invalid value encountered in scalar subtract" warning) an infinity makes in its percentiles
        finite = value if math.isfinite(value) else (NO_VALUE if minimize else -NO_VALUE)
        tune.report({
            OBJECTIVE: finite, "objective_is_finite": math.isfinite(value), "epoch": epoch, FINAL: done,
            "members_running": sum(not _finished(t) for t in trials), "wall_s": time.monotonic() - start,
            "member_values": json.dumps([None if not math.isfinite(v) else v for v in values]),
            "member_epochs": json.dumps([t.epoch for t in trials]),
            "member_stops": json.dumps([t.stop_reason for t in trials]),
            **({WARNINGS_KEY: json.dumps(member_warnings)} if epoch == 1 and member_warnings else {}),
        })
        if done:
            return


# ---------------------------------------------------------------------------------------------
# samplers, storage, searcher


def make_sampler(kind: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``tune.sampler`` (TPE, random, CMA-ES, GP: seeded per trial;
    QMC: one scrambled Sobol sequence indexed by the storage, the same in every process), which
    records the process that asks for each trial as Optuna creates it (see fail_orphans)."""
    if kind == "qmc":
        return DriverLabellingSampler(optuna.samplers.QMCSampler(qmc_type="sobol", scramble=seed is not None, seed=seed))
    return PerTrialSeededSampler(kind, seed)


def _new_sampler(kind: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; choose one of: {', '.join(SAMPLERS)}")


def _record_driver(storage, trial_id: int) -> None:
    """Record on a trial the process that asks for it (``driver_id``, which fail_orphans and SIGTERM's
    handler go by, first; then ``driver``, for messages)."""
    try:
        storage.set_trial_user_attr(trial_id, "driver_id", DRIVER_ID)
        storage.set_trial_user_attr(trial_id, "driver", DRIVER)
    except Exception:  # noqa: BLE001 - a storage hiccup must not stop the search (suggest() tries again)
        pass


def _trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class DriverLabellingSampler(optuna.samplers.BaseSampler):
    """``inner``, which first records on each new trial the process asking for it (``driver``,
    ``driver_id``): Optuna calls ``before_trial`` right after it stores the trial RUNNING, before
    the sampling (seconds with GP on a long study). A process killed from then on leaves a
    trial that :func:`fail_orphans` and SIGTERM's handler (``fail_unfinished``) recognise as its."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self._inner = inner

    def before_trial(self, study, trial) -> None:
        _record_driver(study._storage, trial._trial_id)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class PerTrialSeededSampler(DriverLabellingSampler):
    """A sampler of ``kind`` whose randomness is a function of ``(seed, trial number)``: each trial
    gets a fresh inner sampler seeded from both (TPE, random, CMA-ES and GP keep their model in the
    study, not in the object). Reproducible for a given history, and different in an extension of
    the study and in concurrent processes (their trials have distinct numbers); a single fixed seed
    would replay the same random start-up points in every invocation."""

    def __init__(self, kind: str, seed: int | None) -> None:
        self.kind, self.seed = kind, seed
        super().__init__(_new_sampler(kind, seed))

    def before_trial(self, study, trial) -> None:
        self._inner = _new_sampler(self.kind, None if self.seed is None else _trial_seed(self.seed, trial.number))
        super().before_trial(study, trial)  # (records the process, then the new sampler's own before_trial)

    def reseed_rng(self) -> None:
        pass  # the seed is derived from the trial number on purpose


def storage_location(spec: TuneSpec, out_root: str | os.PathLike, override: str | None = None) -> str:
    """The study storage: ``--study-storage`` (relative to the working directory), else
    ``tune.storage`` (relative to the spec file), else the journal file under the output dir."""
    if override:
        return override if "://" in override else str(Path(os.path.expanduser(override)).resolve())
    if spec.settings.storage:
        raw = spec.settings.storage
        if "://" in raw:
            return raw
        path = Path(os.path.expanduser(raw))
        if not path.is_absolute() and spec.path is not None:
            path = spec.path.parent / path
        return str(path.resolve())
    return str((Path(out_root) / spec.name / "tune" / JOURNAL_FILE).resolve())


def open_storage(location: str):
    """An Optuna storage for a journal file path or a database URL."""
    from optuna.storages.journal import JournalFileBackend

    try:
        if "://" in location:
            return optuna.storages.RDBStorage(location)
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(location))
    except Exception as exc:  # a bad URL, a missing database driver, an unwritable directory
        detail = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else ""
        raise ConfigError(
            f"the Optuna study storage {location!r} (--study-storage, or tune.storage in the study file) cannot be "
            f"opened: {type(exc).__name__}{': ' + detail if detail else ''}. Give a journal file path in a writable "
            f"directory, or a database URL that SQLAlchemy can open (sqlite:///path.db; other databases need their "
            f"driver installed, e.g. pip install psycopg2-binary for postgresql://)") from exc


def dashboard_command(location: str) -> str:
    return f"optuna-dashboard {location}"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


#: this process, as recorded on the trials it asks for and the studies it pins: host and pid (the
#: ``driver`` attribute, for people), and with the pid namespace and start time (``driver_id``), so that
#: a later process can tell a dead driver from a live one, a reused pid, or another container's process
DRIVER_ID = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
             "start": _process_start(os.getpid())}
DRIVER = f"{DRIVER_ID['host']}:{DRIVER_ID['pid']}"


def _driver_state(driver_id: Any) -> str:
    """"self", "alive", "dead", or "unknown" (another machine or pid namespace, or not recorded)."""
    if not isinstance(driver_id, dict) or driver_id.get("host") != DRIVER_ID["host"]:
        return "unknown"
    if driver_id.get("pidns") != DRIVER_ID["pidns"]:
        return "unknown"  # another container with this host name: its pids are not ours to look up
    pid = driver_id.get("pid")
    if not isinstance(pid, int):
        return "unknown"
    if pid == DRIVER_ID["pid"] and driver_id.get("start") == DRIVER_ID["start"]:
        return "self"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:  # another user's process
        pass
    start = _process_start(pid)
    if start is not None and driver_id.get("start") is not None and start != driver_id["start"]:
        return "dead"  # the pid was reused by a process that started later
    return "alive"


#: a RUNNING trial still without the process that asked for it this long after it started was cut off in
#: the instant between Optuna storing it and the sampler recording the process (:class:`DriverLabellingSampler`,
#: before any sampling): no process labels it later
UNLABELLED_ORPHAN_S = 600.0


def fail_orphans(study) -> tuple[int, int]:
    """Tell FAIL for the study's RUNNING trials whose ``ablate tune`` process, on this machine, is
    gone (killed with SIGKILL, out of memory, a crash): a journal storage has no heartbeat that
    would; and for those without a recorded process :data:`UNLABELLED_ORPHAN_S` after they started.
    RUNNING trials of live processes, of other machines or containers, or unlabelled ones younger
    than that, are left alone (another process may be extending the study). Returns (failed, left
    alone)."""
    from optuna.trial import TrialState

    failed = unknown = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        driver = t.user_attrs.get("driver_id")
        unlabelled = driver is None and t.datetime_start is not None and \
            (now - t.datetime_start).total_seconds() > UNLABELLED_ORPHAN_S
        if not unlabelled and _driver_state(driver) != "dead":
            unknown += 1
            continue
        why = ("its process was cut off as it asked for it" if unlabelled else
               f"its process {t.user_attrs.get('driver')} ended without recording it")
        if _fail_stored(study._storage, t._trial_id, f"interrupted: {why}"):
            failed += 1
        else:
            unknown += 1
    return failed, unknown


def _fail_stored(storage, trial_id: int, ended: str) -> bool:
    """Mark a stored RUNNING trial FAIL, with ``ended`` saying why; False where the storage refused
    (e.g. the trial finished meanwhile)."""
    from optuna.trial import TrialState

    try:
        storage.set_trial_user_attr(trial_id, "ended", ended)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        return True
    except Exception:  # noqa: BLE001
        return False


def _no_value_reason(result: dict) -> str:
    """How a suggestion whose objective is not finite ended, for its ``ended`` attribute."""
    stops = json.loads(result.get("member_stops", "[]"))
    diverged = sum(stop == "diverged" for stop in stops)
    if diverged:
        return f"no finite value: {diverged} of {len(stops)} member(s) diverged (epoch {result.get('epoch')})"
    return f"no finite value (epoch {result.get('epoch')})"


@functools.cache
def _searcher_class():
    """:class:`StoredStudySearch` (built on first use: importing Ray is slow)."""
    from ray.tune.search.optuna import OptunaSearch

    class StoredStudySearch(OptunaSearch):
        """:class:`OptunaSearch` on a stored study; see the module docstring for what differs."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            #: ray trial id -> (number, state, value, how it ended)
            self.told: dict[str, tuple[int, str, float | None, str]] = {}
            #: ray trial id -> Ray's Trial (set by the progress callback): the error of a crashed one
            self.ray_trials: dict[str, Any] = {}
            self._reported: dict[str, set[int]] = {}  # ray trial id -> epochs recorded as intermediate values

        def suggest(self, trial_id: str):
            new = trial_id not in self._ot_trials
            params = super().suggest(trial_id)
            if new and trial_id in self._ot_trials:  # which process runs it: see fail_orphans()
                ot_trial = self._ot_trials[trial_id]
                try:  # (ablate's samplers recorded it as Optuna created the trial; others did not)
                    recorded = "driver_id" in self._ot_study._storage.get_trial_user_attrs(ot_trial._trial_id)
                except Exception:  # noqa: BLE001 - a storage hiccup must not stop the search
                    recorded = False
                if not recorded:
                    _record_driver(self._ot_study._storage, ot_trial._trial_id)
            return params

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id in self._ot_trials and trial_id not in self._completed_trials:
                self._report(trial_id, result)

        def _report(self, trial_id: str, result: dict) -> None:
            """Record the objective so far as the intermediate value of its epoch (once)."""
            from ray.air.constants import TRAINING_ITERATION

            step = result.get(TRAINING_ITERATION)
            ot_trial = self._ot_trials[trial_id]
            value = result.get(self.metric)
            if step is None or value is None or not result.get("objective_is_finite", True):
                return
            if step not in self._reported.setdefault(trial_id, set()):
                ot_trial.report(float(value), step)
                self._reported[trial_id].add(step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            from optuna.trial import TrialState

            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            result = result or {}
            value = result.get(self.metric)
            if error:  # (Ray has recorded the error in its Trial before it calls this)
                state, values, ended = TrialState.FAIL, None, _error_reason(self.ray_trials.get(trial_id))
            elif result and not result.get("objective_is_finite", True):
                # a member diverged (its value is NaN for good) or none has a value: FAIL, also when the
                # scheduler stopped it early (PRUNED would keep the value from before the divergence)
                state, values, ended = TrialState.FAIL, None, _no_value_reason(result)
            elif result.get(FINAL) and value is not None:
                state, values, ended = TrialState.COMPLETE, float(value), "complete"
            elif result.get(FINAL):
                state, values, ended = TrialState.FAIL, None, "no value"
            elif result:
                state, values, ended = TrialState.PRUNED, None, f"stopped by the scheduler after epoch {result.get('epoch')}"
            else:
                state, values, ended = TrialState.FAIL, None, "never ran"
            try:
                if result:  # Ray does not pass the result that made the scheduler stop a trial to on_trial_result
                    self._report(trial_id, result)
                ot_trial.set_user_attr("ended", ended)
                ot_trial.set_user_attr("ray_trial_id", trial_id)
                if result:
                    ot_trial.set_user_attr("epochs", int(result.get("epoch", 0)))
                    ot_trial.set_user_attr("member_values", json.loads(result.get("member_values", "[]")))
                    ot_trial.set_user_attr("member_stops", json.loads(result.get("member_stops", "[]")))
                frozen = self._ot_study.tell(ot_trial, values, state=state)
                self.told[trial_id] = (ot_trial.number, state.name, frozen.value, ended)
            except Exception as exc:  # a storage problem must not kill the other trials
                import logging

                logging.getLogger(__name__).warning("could not record trial %s in the study: %s", trial_id, exc)
                self.told[trial_id] = (ot_trial.number, "FAIL", None, f"not recorded: {exc}")
                return  # fail_unfinished() tries again at the end
            self._completed_trials.add(trial_id)

        def fail_unfinished(self) -> int:
            """Tell FAIL for every trial this searcher asked for and never finished (an interrupted
            run), so the stored study holds no trial RUNNING forever. Returns how many. Also the
            one being asked for when SIGTERM's handler calls this, which Optuna has stored, and
            the sampler labelled with this process (:class:`DriverLabellingSampler`), before the
            searcher knows it."""
            from optuna.trial import TrialState

            n = 0
            for trial_id, ot_trial in self._ot_trials.items():
                if trial_id in self._completed_trials:
                    continue
                try:
                    ot_trial.set_user_attr("ended", "interrupted")
                    self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
                    n += 1
                except Exception:
                    pass
                self._completed_trials.add(trial_id)
            known = {t._trial_id for t in self._ot_trials.values()}
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("driver_id") == DRIVER_ID and t._trial_id not in known:
                    n += _fail_stored(self._ot_study._storage, t._trial_id, "interrupted")
            return n

        def save(self, checkpoint_path: str) -> None:
            import pickle

            with open(checkpoint_path, "wb") as f:  # the stored study is the state; nothing else to keep
                pickle.dump({"study_name": self._study_name}, f)

        def restore(self, checkpoint_path: str) -> None:
            pass

    return StoredStudySearch


# ---------------------------------------------------------------------------------------------
# the driver


@dataclasses.dataclass
class TargetOutcome:
    target: Target
    ran: int
    counts: dict[str, int]  # state name -> trials in the stored study
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any] | None
    baseline_value: float | None
    #: cross-task with per-task baselines that differ: (tasks, state, value, trial number) of each one applied to
    #: every task
    starting_points: list[tuple[list[str], str, float | None, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TuneOutcome:
    out_dir: Path
    storage: str
    targets: list[TargetOutcome]
    files: dict[str, Path]
    interrupted: list[str] = dataclasses.field(default_factory=list)  # targets whose search was cut off
    arm: str = "baseline"  # whose settings were searched (tune.arm)
    #: target -> why it has no importances ("none - ...") or which trials they are of (see study_importances)
    importance_notes: dict[str, str] = dataclasses.field(default_factory=dict)
    space: dict[str, Range] = dataclasses.field(default_factory=dict)  # the search space as run now


def _searched_setting_keys(settings: TuneSettings) -> set[str]:
    """The config keys a search with ``settings`` sets (and the keys they replace)."""
    return with_alternatives(settings_from_params({p: 1 for p in settings.space()}))


def _searched_keys(spec: TuneSpec) -> set[str]:
    """The config keys the search sets (and the keys they replace), left out of the objective record."""
    return _searched_setting_keys(spec.settings)


def _objective_record(target: Target, spec: TuneSpec) -> dict[str, Any]:
    """What a stored study's values mean; a spec whose record differs cannot extend the study."""
    tuned = _searched_keys(spec)
    members = [{"task": m["task"], "seed": m["seed"],
                "config": {k: v for k, v in identity_config(m["config"]).items() if k not in tuned}}
               for m in target.members]
    record = {"members": members, "aggregate": spec.settings.aggregate, "cross_task": spec.settings.cross_task,
              "direction": target.direction}
    if spec.settings.cross_task:  # the AdamW reference is part of what a value means
        record["reference"] = [{"task": t.task, "seed": t.seed, "config": identity_config(t.config)}
                               for t in spec.study.trials if "adamw" in t.arms]
    return record


def _describe_difference(stored: dict[str, Any], wanted: dict[str, Any], searched: set[str] = frozenset()) -> str:
    """The first difference between two objective records, in words (``searched``: the keys the
    search sets now, which the record leaves out)."""
    for key in ("aggregate", "cross_task", "direction"):
        if stored.get(key) != wanted.get(key):
            return f"{key}: stored {stored.get(key)!r}, now {wanted.get(key)!r}"
    def by_run(rows) -> dict[tuple[str, int], dict[str, Any]]:
        return {(r["task"], r["seed"]): r["config"] for r in rows or []}

    def changed(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
        return sorted(key for key in set(was) | set(now) if was.get(key) != now.get(key))

    old, new = by_run(stored.get("members")), by_run(wanted["members"])

    def arm(configs) -> set[str]:
        return {"adamw" if c.get("optimizer") == "adamw" else "baseline" for c in configs}

    if arm(old.values()) != arm(new.values()):
        return f"tune.arm: stored {', '.join(sorted(arm(old.values())))}, now {', '.join(sorted(arm(new.values())))}"
    if set(old) != set(new):
        return (f"tasks/seeds: stored {sorted(old)}, now {sorted(new)}")
    for k in new:
        diff = changed(old[k], new[k])
        if diff:
            return "settings " + ", ".join(
                f"{d} (now searched; the stored study's trials held it at {old[k][d]!r})" if d in searched and d in old[k]
                else f"{d} (no longer searched, now {new[k][d]!r})" if d not in searched and d not in old[k]
                else f"{d} (stored {old[k].get(d)!r}, now {new[k].get(d)!r})" for d in diff[:5])
    # (cross-task: the AdamW arm the suggestions are scored against, which the members leave out)
    old_ref, new_ref = by_run(stored.get("reference")), by_run(wanted.get("reference"))
    for k in new_ref:
        was = old_ref.get(k, {})
        diff = changed(was, new_ref[k])
        if diff:
            return "the AdamW reference's settings " + ", ".join(
                f"{d} (stored {was.get(d)!r}, now {new_ref[k].get(d)!r})" for d in diff[:5])
    return "unknown"


def _embedded_data_change(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Where two objective records differ in the version of the embedded data alone
    (:func:`ablate.config.identity_config`'s ``embedded:<version>``; ``embedded`` in a record made
    before ablate recorded it), that difference in words; "" otherwise."""
    old = {(m["task"], m["seed"]): m["config"] for m in stored.get("members", [])}
    new = {(m["task"], m["seed"]): m["config"] for m in wanted.get("members", [])}
    if set(old) != set(new) or any(stored.get(k) != wanted.get(k) for k in ("aggregate", "cross_task", "direction")):
        return ""
    changed = {}
    for k in new:
        a, b = old[k].get("data"), new[k].get("data")
        if a == b:
            continue
        if not (isinstance(a, str) and isinstance(b, str) and a.split(":")[0] == b.split(":")[0] == "embedded"):
            return ""
        changed.setdefault(k[0], (a, b))
    if not changed or any({**old[k], "data": None} != {**new[k], "data": None} for k in new):
        return ""
    said = lambda d: d if ":" in d else "embedded data of a version not recorded (a study made before ablate recorded it)"
    return "; ".join(f"task {task}: stored {said(a)}, now {b}" for task, (a, b) in changed.items())


def _load_stored(target: Target, storage):
    """The target's stored study, or None when the storage holds none (nothing is created)."""
    try:
        return optuna.load_study(study_name=target.study_name, storage=storage)
    except KeyError:
        return None


def _check_stored(study, target: Target, spec: TuneSpec) -> bool:
    """Refuse a stored study whose direction, objective or parameter distributions differ from
    this spec's. Returns whether the study's objective record must be (re)written: it has none,
    or it differs but the study holds no trial yet and the process that pinned it is gone (a
    start that failed before any suggestion ran pins nothing)."""
    record = _objective_record(target, spec)
    stored_direction = study.direction.name.lower()
    if stored_direction != target.direction:
        raise StudyError(
            f"{spec.source}: the stored study {target.study_name!r} is to {stored_direction} but this spec's objective "
            f"is to {target.direction}; use another name: or tune.storage"
        )
    trials = study.get_trials(deepcopy=False)
    stored = study.user_attrs.get("ablate_objective")
    if stored is None:
        return True
    differs = json.loads(json.dumps(stored)) != json.loads(json.dumps(record))
    if differs and not trials and _pinner_gone(study):
        return True  # pinned by a start that failed before any suggestion ran: nothing to mix with
    if differs:
        data = _embedded_data_change(stored, record)
        if data:  # (no setting brings the old embedded data back)
            raise StudyError(
                f"{spec.source}: the stored study {target.study_name!r} scored its suggestions on other embedded data "
                f"({data}), so its values cannot be mixed with this spec's; start a new study: change name: or "
                f"tune.storage (or --study-storage)"
            )
        raise StudyError(
            f"{spec.source}: the stored study {target.study_name!r} scored suggestions differently, so its values cannot "
            f"be mixed with this spec's ({_describe_difference(stored, record, _searched_keys(spec))}). Restore those settings, or start a "
            f"new study: change name: or tune.storage (or --study-storage)"
        )
    space = {name: r.distribution() for name, r in spec.settings.space().items()}
    for t in trials:  # Optuna refuses a parameter whose kind or log scale changed, mid-run
        for name, dist in t.distributions.items():
            if name in space:
                try:
                    optuna.distributions.check_distribution_compatibility(dist, space[name])
                except ValueError:
                    was = "log" if getattr(dist, "log", False) else "linear"
                    # (where the scale is written: a log left out is true for the priorities, false for params)
                    where = "tune.priorities" if name in PRIORITY_PARAMS else f"tune.params.{name}"
                    raise StudyError(
                        f"{spec.source}: tune: {name} is searched on a {'log' if getattr(space[name], 'log', False) else 'linear'} "
                        f"scale ({type(space[name]).__name__}), but the stored study {target.study_name!r} searched it on a "
                        f"{was} scale ({type(dist).__name__}, trial #{t.number}), which Optuna cannot mix in one study; "
                        f"restore the {was} scale (its range may change: write log: {str(was == 'log').lower()} in "
                        f"{where}, where log left out is {'true' if name in PRIORITY_PARAMS else 'false'}), or start a "
                        f"new study: change name: or tune.storage (or --study-storage)"
                    ) from None
    return False


def _pinner_gone(study) -> bool:
    """Whether the process that pinned an empty study is gone (or is this one, or an older version
    that recorded none), so that no search of its may still be starting: a live process, or one on
    another machine or container (which cannot be checked), keeps the study as it pinned it."""
    pinned_by = study.user_attrs.get("pinned_by")
    return pinned_by is None or _driver_state(pinned_by) in ("dead", "self")


def check_target_study(target: Target, spec: TuneSpec, storage) -> None:
    """Refuse, before anything runs, a stored study that this spec cannot extend (creates nothing)."""
    study = _load_stored(target, storage)
    if study is not None:
        _check_stored(study, target, spec)


def open_target_study(target: Target, spec: TuneSpec, storage, sampler=None):
    """Create or load the target's study; refuse one whose direction or objective differs."""
    study = optuna.create_study(study_name=target.study_name, storage=storage, direction=target.direction,
                                sampler=sampler, load_if_exists=True)
    if _check_stored(study, target, spec):
        study.set_user_attr("ablate_objective", _objective_record(target, spec))
        study.set_user_attr("description", target.description)
        study.set_user_attr("pinned_by", DRIVER_ID)
    return study


def build_targets(spec: TuneSpec, references: Mapping[str, float] | None = None) -> list[Target]:
    """The targets of the spec: one per task, or one cross-task target (``references`` needed)."""
    study = spec.study
    agg = spec.settings.aggregate
    members_of = {task: [{"task": task, "seed": t.seed, "config": t.config} for t in spec.arm_trials(task)]
                  for task in study.tasks}
    seeds = ("seeds " if len(study.seeds) > 1 else "seed ") + ", ".join(map(str, study.seeds))
    if spec.settings.cross_task:
        members = [m for task in study.tasks for m in members_of[task]]
        modes = {m["task"]: _metric(m["task"]).mode for m in members}
        return [Target(CROSS_TASK, f"{study.name}/{CROSS_TASK}", "maximize",
                       f"mean over {', '.join(study.tasks)} of the {agg} over {seeds} of the relative improvement "
                       f"of the best validation metric over AdamW (+ = better)",
                       members, modes, max(m["config"]["epochs"] for m in members), dict(references or {}))]
    targets = []
    for task in study.tasks:
        metric = _metric(task)
        members = members_of[task]
        targets.append(Target(task, f"{study.name}/{task}", "minimize" if metric.mode == "min" else "maximize",
                              f"{agg} over {seeds} of the best validation {metric.name}",
                              members, {task: metric.mode}, max(m["config"]["epochs"] for m in members)))
    return targets


def _metric(task: str):
    from ablate.tasks import get_task

    return get_task(task).metric


class AdamWReferenceError(RuntimeError):
    """The AdamW reference of the cross-task objective could not be computed."""


class ReferenceInterrupted(RuntimeError):
    """The AdamW reference run was interrupted (Ctrl-C): no suggestion ran."""


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C outside a search (Ray Tune's fit() catches one within): what is stored and the command that goes on."""


@contextlib.contextmanager
def _said_on_ctrl_c(describe: Callable[[], str]):
    try:
        yield
    except TuneInterrupted:
        raise
    except KeyboardInterrupt:
        raise TuneInterrupted(describe()) from None


def adamw_references(spec: TuneSpec, out_dir: Path, *, address: str | None, ray_storage: str | None,
                     again: str | None = None) -> dict[str, float]:
    """Run (or reuse) the AdamW arm's trials once; ``"task/seed"`` -> AdamW's best value
    (``again``: the command that continues, for the message of a run that SIGTERM ends)."""
    from ablate.results import load_results
    from ablate.sweep import run_study

    adamw = [t for t in spec.study.trials if "adamw" in t.arms]
    ref_study = dataclasses.replace(spec.study, name="adamw_reference", trials=adamw, arm_axes={"adamw": ""})
    print(f"cross-task: AdamW reference ({len(adamw)} trials, run once and cached in {out_dir / 'adamw_reference'})",
          flush=True)
    outcome = run_study(ref_study, out_dir, address=address, storage=ray_storage,
                        max_concurrent=spec.settings.max_concurrent, wait_for_folder=True,
                        resume_hint=again or "the same command")
    if outcome.unfinished:  # Ctrl-C: Ray Tune returned early (finished reference trials are stored and reused)
        raise ReferenceInterrupted(f"{outcome.unfinished} of the AdamW reference's trials did not finish")
    trials = load_results(out_dir / "adamw_reference").trials
    refs, missing = {}, []
    for t in adamw:
        row = trials[trials["trial_id"] == t.trial_id]
        ok = row[row["status"] == "ok"]
        value = float(ok["best_metric"].iloc[0]) if len(ok) else math.nan
        if not math.isfinite(value) or value == 0:
            missing.append(f"{t.task} seed {t.seed}")
        refs[f"{t.task}/{t.seed}"] = value
    if missing:
        raise AdamWReferenceError(f"the AdamW reference has no usable value for {', '.join(missing)} (see "
                           f"{out_dir / 'adamw_reference'}); fix or rerun it, then tune again")
    return refs


def _baseline_vectors(target: Target, space: Mapping[str, Range]) -> list[tuple[dict[str, Any], list[str]]]:
    """The searched arm's own values of ``target``'s members as the spec gives them now, each with
    the tasks that have them: one vector, or (cross-task, baselines that differ) one per group of tasks."""
    vectors: list[tuple[dict[str, Any], list[str]]] = []
    for m in target.members:
        params = params_from_config(m["config"], space)
        for seen, tasks in vectors:
            if seen == params:
                if m["task"] not in tasks:
                    tasks.append(m["task"])
                break
        else:
            vectors.append((params, [m["task"]]))
    return vectors


def own_values(target: Target, spec: TuneSpec) -> dict[str, Any]:
    """The searched arm's own values of ``target`` as the spec gives them now (the parameters of its
    ``baseline`` suggestion); ``{}`` where its tasks' differ (cross-task starting points: no vector
    is the arm's own)."""
    vectors = _baseline_vectors(target, spec.settings.space())
    return vectors[0][0] if len(vectors) == 1 else {}


def _trial_params(trial) -> dict[str, Any]:
    """A stored trial's parameters (a queued one's: those it was enqueued with)."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


def _same_values(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two parameter mappings hold the same values (numbers compared as floats: a config's 2 is a trial's 2.0)."""
    return set(a) == set(b) and all(
        float(a[k]) == float(b[k]) if is_number(a[k]) and is_number(b[k]) else a[k] == b[k] for k in a)


def _is_own(trial, own: Mapping[str, Any] | None) -> bool:
    """Whether ``trial`` evaluated the searched arm's own values: flagged ``baseline`` and, with
    ``own`` (:func:`own_values`), of those values - the baseline suggestion of an earlier run,
    whose arm had other values then (the searched keys are no part of what a stored study's values
    mean, so a spec may change them), is not. ``own`` None: any trial flagged ``baseline``."""
    return bool(trial.user_attrs.get("baseline")) and (own is None or _same_values(_trial_params(trial), own))


def _baselines_evaluated(study, current: Mapping[tuple[str, ...], Mapping[str, Any]] | None = None
                         ) -> set[tuple[str, ...]]:
    """The baseline suggestions the study holds evaluated, queued or running, by the tasks whose
    values they are (``("*",)``: a baseline recorded without them, by an older version). One
    whose run was interrupted or crashed (FAIL other than by divergence) is not among them, so
    it is enqueued again; nor, with ``current`` (tasks -> the values their baseline has now), one
    of other values than those tasks' now (the spec changed them: their values are not evaluated),
    or, recorded without its tasks, than any tasks' now."""
    done = set()
    for t in study.get_trials(deepcopy=False):
        if "baseline_of" not in t.user_attrs and not t.user_attrs.get("baseline"):
            continue
        evaluated = t.state.name in ("COMPLETE", "PRUNED", "WAITING", "RUNNING") or (
            t.state.name == "FAIL" and str(t.user_attrs.get("ended", "")).startswith("no finite value"))  # diverged
        tasks = tuple(t.user_attrs.get("baseline_of", ["*"]))
        if current is not None and tasks in current and not _same_values(_trial_params(t), current[tasks]):
            continue
        if current is not None and tasks == ("*",) and not any(_same_values(_trial_params(t), v)
                                                               for v in current.values()):
            continue  # (an older version's baseline of other values: ("*",) would stand for every task's)
        if evaluated:
            done.add(tasks)
    return done


def _enqueue_baseline(study, target: Target, spec: TuneSpec, done: set[tuple[str, ...]] = frozenset()) -> None:
    """Queue the baseline's own values as the first suggestion(s), except those in ``done`` (see
    :func:`_baselines_evaluated`). In cross-task mode, tasks whose baselines differ each give a
    starting point (their values applied to every task), none of which is the baseline itself:
    only one shared by every task is flagged ``baseline``."""
    if ("*",) in done:
        return
    space = spec.settings.space()
    vectors = _baseline_vectors(target, space)
    shared = len(vectors) == 1  # one vector for every task: the baseline itself
    vectors = [(params, tasks) for params, tasks in vectors if tuple(tasks) not in done]
    if not vectors:
        return
    if len(vectors) > 1:
        listed = "; ".join(f"{', '.join(tasks)}: {_format_params(p)}" for p, tasks in vectors)
        print(f"[{target.key}] the tasks' baselines differ ({listed}): each is evaluated first, applied to every "
              f"task, as a starting point", flush=True)
    for params, tasks in vectors:
        outside = sorted(k for k, v in params.items() if not space[k].contains(v))
        if outside:  # a partial enqueue would be scored as "the baseline's own values" without being them
            whose = f" of {', '.join(tasks)}" if len(vectors) > 1 else ""
            own = "the baseline's" if spec.settings.arm == "baseline" else "AdamW's"
            # (a key the arm leaves null - meta_every where meta_per_epoch sets the frequency - has no value to be outside)
            ranged = [k for k in outside if params[k] is not None]
            said = ([f"{', '.join(ranged)} outside its range"] if ranged else []) + [
                f"{k} is null" + (f": the arm sets {ALTERNATIVE_KEYS[k]} instead" if k in ALTERNATIVE_KEYS else "")
                for k in outside if params[k] is None]
            print(f"[{target.key}] {own} values{whose} are not all in the search space ({'; '.join(said)}): "
                  f"not evaluated as a first suggestion", flush=True)
            continue
        study.enqueue_trial(params, user_attrs={"baseline": shared, "baseline_of": tasks})


def _format_params(params: Mapping[str, Any] | None) -> str:
    if not params:
        return "-"
    settings = settings_from_params(params)
    parts = []
    for k, v in settings.items():
        parts.append(f"{k}=[{', '.join(f'{x:.4g}' for x in v)}]" if isinstance(v, list) else f"{k}={v:.4g}")
    return " ".join(parts)


def _error_reason(trial) -> str:
    """``"error: <the exception's last line>"`` of a crashed Ray trial (``"error"`` without one)."""
    if trial is None:
        return "error"
    from ablate.sweep import _last_line, _trial_error

    try:
        last = _last_line(_trial_error(trial), "")
    except Exception:  # (an unreadable error file must not lose the trial's record)
        return "error"
    return f"error: {last[:300]}" if last else "error"


def _best(study, own: Mapping[str, Any] | None = None):
    """The study's best complete trial; where the searched arm's own values (the first suggestion;
    ``own``: those the spec gives now, see :func:`_is_own`) tie with it
    (:func:`ablate.stats.tuning_tie`), those: a suggestion that wins by float rounding is no
    better, and writing it to the best-values file would change a study's settings for nothing."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    cross_task = study.study_name.endswith(f"/{CROSS_TASK}")
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if _is_own(t, own) and tuning_tie(t.value, best.value, cross_task):
            return t
    return best


def _progress_callback(target: Target, searcher, study, planned: int, own: Mapping[str, Any] | None = None):
    from ray import tune

    from ablate.sweep import _duration, _last_line, _trial_error

    class Progress(tune.Callback):
        """One line per finished suggestion (done / running, its value, the best so far), and a
        line about the running ones at most every HEARTBEAT_S seconds."""

        def __init__(self) -> None:
            self.done = self.errors = 0
            self.start = self.last_beat = time.monotonic()
            self.warned: set[str] = set()  # the members' warnings printed

        def on_trial_start(self, iteration, trials, trial, **info):
            searcher.ray_trials[trial.trial_id] = trial

        def on_trial_result(self, iteration, trials, trial, result, **info):
            for message in json.loads(result.get(WARNINGS_KEY) or "[]"):  # (every suggestion warns alike: once)
                if message not in self.warned:
                    self.warned.add(message)
                    # (a task's warning that starts with its name - "etth1: ..." - not said "[etth1] warning: etth1: ...")
                    print(f"[{target.key}] warning: {message.removeprefix(f'{target.key}: ')}", flush=True)
            now = time.monotonic()
            if now - self.last_beat < HEARTBEAT_S:
                return
            self.last_beat = now
            running = [t for t in trials if t.status == "RUNNING"]
            epochs = ", ".join(f"epoch {t.last_result['epoch']}/{target.epochs} ("
                               + (f"{t.last_result[OBJECTIVE]:.4g})" if t.last_result.get("objective_is_finite", True)
                                  else "no value)")
                               if OBJECTIVE in (t.last_result or {}) else "starting" for t in running)
            best = _best(study, own)
            best_s = f"best #{best.number} {best.value:.6g}" if best else "no complete trial yet"
            print(f"[{target.key}] {self.done}/{planned} done, {len(running)} running: {epochs or '-'} | {best_s} "
                  f"({_duration(now - self.start)} so far)", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, "")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errors += 1
            self._line(trials, trial, f" ({_last_line(_trial_error(trial), 'error')})")

        def _line(self, trials, trial, extra: str) -> None:
            self.done += 1
            running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
            number, state, value, ended = searcher.told.get(trial.trial_id, (None, "?", None, ""))
            value_s = f"{value:.6g}" if value is not None else "-"
            if state == "FAIL" and not extra and ended:  # (a crash's error is in extra)
                extra = f" ({ended})"
            best = _best(study, own)
            best_s = f"best #{best.number} {best.value:.6g} {_format_params(best.params)}" if best else "no complete trial yet"
            elapsed = time.monotonic() - self.start
            left = planned - self.done
            eta = f", ~{_duration(elapsed / self.done * left)} left" if left > 0 else ""
            print(f"[{target.key}] {self.done}/{planned} done, {running} running{eta} | #{number} {state.lower()} "
                  f"{value_s}{extra} | {best_s}", flush=True)

    return Progress()


def _meta_only(s: TuneSettings) -> bool:
    """Whether every searched knob acts through the meta-updates only (so the warm-up epochs, which
    have none, train every suggestion identically)."""
    return all(k in METAADAMW_KEYS for k in s.params) and "warmup_epochs" not in s.params


def grace_default(target: Target, s: TuneSettings) -> int:
    """ASHA's default grace period: the first epoch with meta-updates when the warm-up epochs
    train every suggestion identically, else 1; capped at the target's epochs."""
    warmup = max(m["config"]["warmup_epochs"] for m in target.members) if _meta_only(s) else 0
    return min(target.epochs, 1 + warmup)


def _nodes_fit(cpus: float, gpus: float, nodes: list[dict[str, Any]] | None = None) -> int | None:
    """How many suggestions (``cpus`` and ``gpus`` each) the alive nodes of the running Ray hold at
    once (``nodes``: ``ray.nodes()``); None when Ray does not run here."""
    if nodes is None:
        import ray

        if not ray.is_initialized():
            return None
        nodes = ray.nodes()
    fit = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        n = math.floor(have.get("CPU", 0) / cpus + 1e-9) if cpus else math.inf
        if gpus:
            n = min(n, math.floor(have.get("GPU", 0) / gpus + 1e-9))
        fit += n if n != math.inf else 0
    return fit


def at_a_time(s: TuneSettings, trials: int, cpus: float, gpus: float,
              nodes: list[dict[str, Any]] | None = None) -> str:
    """How many suggestions run at once, in words: ``max_concurrent``, or fewer where the suggestions
    asked for or the running Ray's nodes allow fewer ("none to run" for ``trials`` 0; none yet where
    no node fits one suggestion: they wait for a node that does)."""
    if trials < 1:  # (--trials 0: the outputs only)
        return "none to run"
    fit = _nodes_fit(cpus, gpus, nodes)
    each = f"{cpus:g} CPU(s){f' and {gpus:g} GPU(s)' if gpus else ''}"
    if fit == 0:  # (it said max_concurrent, which no node can run: Ray waits for a node that fits one)
        return (f"none at a time yet: no node of the running Ray fits one suggestion of {each}, so they wait for one "
                f"that does (lower resources: in the study file if none will join)")
    n = min(s.max_concurrent, trials, s.max_concurrent if fit is None else fit)
    if n == s.max_concurrent:
        return f"{n} at a time"
    why = ([f"{trials} suggestion(s) asked for"] if trials == n else []) + \
          ([f"Ray's nodes fit {fit} suggestion(s) of {each} each"] if fit == n else [])
    return f"{n} at a time (max_concurrent {s.max_concurrent}; {', '.join(why)})"


def _run_target(target: Target, spec: TuneSpec, storage, trials: int, out_dir: Path,
                ray_storage: str | None, stopped: Callable[[], str] | None = None) -> tuple[int, int]:
    """Ask the target's study for ``trials`` more suggestions through Ray Tune (``stopped``: what
    the run has stored and the command that goes on, for the message of a search that SIGTERM
    ends)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = spec.settings
    space = s.space()
    sampler = make_sampler(s.sampler, s.sampler_seed)
    study = open_target_study(target, spec, storage, sampler)
    orphans, elsewhere = fail_orphans(study)
    if orphans:
        print(f"[{target.key}] {orphans} suggestion(s) left RUNNING by an `ablate tune` process of this machine that "
              f"ended without recording them (killed?) marked FAIL in the stored study", flush=True)
    if elsewhere:
        print(f"[{target.key}] {elsewhere} suggestion(s) RUNNING in another process (or machine) are left as they are",
              flush=True)
    before = len(study.trials)
    sched = s.scheduler and {**s.scheduler, "grace_period": s.scheduler["grace_period"] or grace_default(target, s)}
    study_ = spec.study
    cpus, gpus = study_.resources.get("cpus", 1), study_.resources.get("gpus", 0)
    print(f"[{target.key}] study {target.study_name!r}: {before} stored trial(s); {trials} more suggestion(s) "
          f"({s.sampler}, seed {s.sampler_seed}, {at_a_time(s, trials, cpus, gpus)}"
          f"{', ASHA grace %d rf %g' % (sched['grace_period'], sched['reduction_factor']) if sched else ', no early stopping'}); "
          f"{target.direction} {target.description}", flush=True)
    if trials == 0:
        return 0, 0
    if s.enqueue_baseline:  # (again where the spec now gives the arm other values than those evaluated)
        current = {tuple(tasks): params for params, tasks in _baseline_vectors(target, space)}
        _enqueue_baseline(study, target, spec, _baselines_evaluated(study, current))
    searcher = _searcher_class()({name: r.distribution() for name, r in space.items()}, metric=OBJECTIVE,
                                 mode="min" if target.direction == "minimize" else "max", sampler=sampler,
                                 study_name=target.study_name, storage=storage)
    scheduler = None
    if sched:
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=OBJECTIVE,
                                  mode="min" if target.direction == "minimize" else "max", max_t=target.epochs,
                                  grace_period=sched["grace_period"], reduction_factor=sched["reduction_factor"])
    param_space = {
        "members": target.members, "modes": target.modes, "aggregate": s.aggregate, "direction": target.direction,
        "references": target.references, "param_names": list(space), "plugins": list(study_.plugins),
        "plugin_dir": str(spec.path.parent.resolve()) if spec.path is not None else None, "cwd": os.getcwd(),
        "cpus": cpus,
    }
    progress = _progress_callback(target, searcher, study, trials, own_values(target, spec))
    run_name = f"{target.key}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    tuner = tune.Tuner(
        tune.with_resources(tune_trainable, {"cpu": cpus, "gpu": gpus}),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name, storage_path=ray_storage or str((out_dir / "ray").resolve()),
            failure_config=tune.FailureConfig(max_failures=study_.retries),
            callbacks=[progress], verbose=0,
        ),
    )
    from ablate.cluster import exit_on_sigterm, ray_tune_quiet

    try:
        def cut_off() -> str:  # (the searcher's count: it records a suggestion before Ray's callbacks hear of it)
            return (f"{target.key}: {len(searcher._completed_trials)} of {trials} suggestion(s) stored, the unfinished "
                    f"ones marked FAIL; " + (stopped() if stopped else "run the same command to go on"))

        with exit_on_sigterm(cut_off, on_exit=searcher.fail_unfinished), ray_tune_quiet():
            try:
                tuner.fit()
            except KeyboardInterrupt:  # a second Ctrl-C, which Ray's message invites: the unfinished suggestions
                pass  # are marked FAIL below and the run ends as after the first (summary, continue command, 130)
    finally:
        interrupted = searcher.fail_unfinished()
        if interrupted:
            print(f"[{target.key}] {interrupted} unfinished suggestion(s) marked FAIL in the stored study", flush=True)
    if not interrupted and progress.done < trials:
        # Ray Tune's fit() also returns early on a Ctrl-C that comes between two suggestions (or after the last
        # epoch of the running one): nothing is unfinished then, but the search is cut short all the same
        interrupted = trials - progress.done
        print(f"[{target.key}] stopped after {progress.done} of {trials} suggestion(s)", flush=True)
    if not progress.errors and ray_storage is None:
        # every suggestion of this run is in the stored study (finished, or FAIL if cut off): its Ray experiment
        # directory holds nothing more (a run with errors keeps it, for the tracebacks; another process's
        # directories are its own business; OUT/ray itself goes where that leaves it empty, as ablate run's does)
        from ablate.sweep import _remove_if_empty

        shutil.rmtree(out_dir / "ray" / run_name, ignore_errors=True)
        _remove_if_empty(out_dir / "ray")
    return progress.done, interrupted


def _refuse_outputs_only(spec: TuneSpec, missing: list[str], location: str) -> None:
    """Refuse ``--trials 0`` (or ``tune.trials: 0``), which only rewrites the outputs of stored studies,
    where the ``missing`` target studies have none in the storage at ``location``."""
    one = len(missing) == 1
    cli = spec.settings.trials_from == "--trials"  # (the 0 of the command line, or of the file)
    raise StudyError(f"{spec.source}: {'--trials 0' if cli else 'tune.trials: 0'} only rewrites the outputs "
                     f"of stored studies, and {', '.join(map(repr, missing))} {'has' if one else 'have'} "
                     f"none in {location}; {'' if cli else 'set tune.trials to N, or '}run with --trials N "
                     f"to start {'it' if one else 'them'}")


def run_tune(spec: TuneSpec, out_root: str | os.PathLike = "results", *, address: str | None = None,
             ray_storage: str | None = None, study_storage: str | None = None,
             num_cpus: int | None = None, again: str | None = None, outputs_only: str | None = None) -> TuneOutcome:
    """Extend every target's stored study by ``spec.settings.trials`` suggestions, then write the
    outputs (best values, history, importances) from the stored studies. ``again`` and
    ``outputs_only``: the command lines that run this again and that only rewrite the outputs
    (``--trials 0``), for the messages of a run that SIGTERM ends."""
    from ablate.cluster import (check_cluster_nodes, check_real_data, check_resources, exit_on_sigterm, init_ray,
                                no_result_files, node_warnings_once, ray_storage_path)
    from ablate.sweep import _exclusive, make_out_folder

    ray_storage = ray_storage_path(ray_storage)
    out_dir = Path(out_root) / spec.name / "tune"
    location = storage_location(spec, out_root, study_storage)
    if spec.settings.trials == 0 and "://" not in location and not Path(location).exists():
        # (opening the journal creates it: a first run with --trials 0 left an empty journal file and folder)
        _refuse_outputs_only(spec, [t.study_name for t in build_targets(spec)], location)
    make_out_folder(out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    no_result_files()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(location)
        ran: dict[str, int] = {}
        interrupted: list[str] = []
        targets = build_targets(spec)
        if spec.settings.trials == 0:  # only rewrite outputs: never create (and pin) a study that is not stored
            stored = set(optuna.get_all_study_names(storage))
            missing = [t.study_name for t in targets if t.study_name not in stored]
            if missing:
                _refuse_outputs_only(spec, missing, location)
        for target in targets:  # a stored study that scores differently is refused before anything runs
            check_target_study(target, spec, storage)
        if spec.settings.trials > 0:
            check_resources(spec.study, address, num_cpus)
            if address is None:  # trials run on this machine: missing data is an error now, not in every suggestion
                check_real_data(spec.study)
        if spec.path is not None:  # (the spec as run: written once it is accepted)
            atomic_write_bytes(out_dir / "spec.yaml", spec.path.read_bytes())
        started = spec.settings.trials > 0 and init_ray(spec.study, address, num_cpus)
        def stopped() -> str:
            """SIGTERM (a scheduler's time limit) outside a search - before, between two, or as the outputs are
            written: what is stored, and the command that goes on (a search's own handler says what it ran). From
            what this run did, not from the storage: the signal may have cut off a call that holds its lock."""
            text = f"the suggestions that finished are stored in {location}; "
            cut = [key for key in begun if key not in ran]  # (its own handler was no longer, or not yet, installed)
            missing = [t.key for t in targets if t.key not in begun] if spec.settings.trials > 0 else []
            if cut or missing:
                said = [f"the search of {', '.join(cut)} was cut off"] if cut else []
                said += [f"the search of {', '.join(missing)} did not run"] if missing else []
                return text + f"{', '.join(said)}: `{again or 'the same command'}` goes on"
            return (text + f"the outputs in {out_dir} (best values, history, importances) may not show them: "
                           f"`{outputs_only or f'ablate tune {spec.source} --trials 0'}` rewrites them")

        begun: list[str] = []  # the targets whose _run_target was called
        # (after ray.init, which installs Ray's handler: no word, exit 143)
        with exit_on_sigterm(stopped, fallback=again or "the same command") as rearm, node_warnings_once(), \
                _said_on_ctrl_c(stopped):  # (a Ctrl-C after the searches: not the command that adds suggestions)
            try:
                if started and address is not None:  # a cluster: the data the trials need on the nodes that run them
                    check_cluster_nodes(spec.study, {})
                if spec.settings.cross_task and spec.settings.trials > 0:
                    references = adamw_references(spec, out_dir, address=address, ray_storage=ray_storage, again=again)
                    for target in targets:
                        target.references = references
                for target in targets:
                    begun.append(target.key)
                    ran[target.key], unfinished = _run_target(target, spec, storage, spec.settings.trials, out_dir,
                                                              ray_storage, stopped=stopped)
                    if unfinished:  # interrupted (Ray Tune catches Ctrl-C and returns): not the next target either
                        interrupted.append(target.key)
                        break
            finally:
                if started:
                    import ray

                    ray.shutdown()
                    rearm()  # (ray.shutdown resets the signal's handling in the kernel)
            outcomes = [_target_outcome(t, storage, ran.get(t.key, 0), own_values(t, spec)) for t in targets]
            # one writer at a time: a process extending the study at the same time that read the stored
            # studies before this one and wrote after it would leave its older outputs (fewer trials)
            with _exclusive(out_dir, wait=True):
                files, importance_notes = write_outputs(spec, storage, targets, out_dir, location)
    return TuneOutcome(out_dir, location, outcomes, files, interrupted, spec.settings.arm, importance_notes,
                       spec.settings.space())


def _target_outcome(target: Target, storage, ran: int, own: Mapping[str, Any] | None = None) -> TargetOutcome:
    """The target's stored study in numbers (``own``: the searched arm's own values now, see :func:`_is_own`)."""
    study = _load_stored(target, storage)
    if study is None:  # a first run interrupted before this target's search started
        return TargetOutcome(target, ran, {}, None, None, None, None)
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = _best(study, own)
    base = [t for t in trials if _is_own(t, own) and t.state.name == "COMPLETE"]
    starts = {}
    for t in trials:  # the latest evaluation of each starting point
        if "baseline_of" in t.user_attrs and not t.user_attrs.get("baseline"):
            starts[tuple(t.user_attrs["baseline_of"])] = (list(t.user_attrs["baseline_of"]), t.state.name, t.value,
                                                          t.number)
    return TargetOutcome(target, ran, counts, best.number if best else None, best.value if best else None,
                         dict(best.params) if best else None, base[0].value if base else None, list(starts.values()))


# ---------------------------------------------------------------------------------------------
# outputs


def study_history(study, target: Target, arm: str = "baseline", own: Mapping[str, Any] | None = None):
    """One row per trial of ``study`` (the report's ``history.parquet`` columns; ``arm``: tune.arm;
    ``chosen``: the trial whose values the best-values file holds - Optuna's best trial, unless the
    arm's own values tie with it, see :func:`_best`; ``baseline``: the suggestion of the arm's own
    values, ``own`` where given, see :func:`_is_own`)."""
    import pandas as pd

    rows = []
    best = _best(study, own)
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else math.nan
        rows.append({
            "task": target.key, "study": target.study_name, "number": t.number,
            "value": t.value if t.value is not None else math.nan, "state": t.state.name,
            "direction": target.direction,
            **{f"params_{k}": float(v) for k, v in t.params.items()},
            "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete, "duration_s": duration,
            "epochs": t.user_attrs.get("epochs", math.nan), "baseline": _is_own(t, own),
            "arm": arm,
            "ended": str(t.user_attrs.get("ended", "running" if t.state.name == "RUNNING" else "")),
            "chosen": best is not None and t.number == best.number,
        })
    return pd.DataFrame(rows)


def study_importances(study, target: Target, space: Mapping[str, Range] | None = None):
    """fANOVA importances of the complete trials, and a note: why there are none, or which trials
    they are of (``""``: every complete trial). With ``space`` (the search space as run now), of
    the trials drawn from it: Optuna attributes scores only to parameters searched over one range
    in every trial it is given, so a range changed between runs would leave none."""
    import pandas as pd

    empty = pd.DataFrame(columns=["task", "param", "importance"])
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    changed = ""
    if space is not None:
        current = {name: r.distribution() for name, r in space.items()}
        drawn = [t for t in complete if t.distributions == current]
        if len(drawn) < len(complete):
            changed = (f"the {len(drawn)} of the {len(complete)} finished suggestions drawn from the current search "
                       f"space, which changed between runs")
            study = optuna.create_study(direction=study.direction)  # (in memory: those trials only)
            study.add_trials(drawn)
            complete = drawn
    if len(complete) < 2:
        return empty, f"{changed or f'{len(complete)} finished suggestion(s)'}, too few to tell"
    over = f"; they are {changed}" if changed else ""
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception as exc:  # no variance in the values (every suggestion scored the same), ...
        return empty, f"fANOVA could not attribute the scores ({str(exc).strip() or type(exc).__name__}){over}"
    if not imp:
        return empty, f"no searched parameter varies among the finished suggestions{over}"
    return pd.DataFrame([{"task": target.key, "param": k, "importance": float(v)} for k, v in imp.items()]), changed


def best_settings(study, own: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    best = _best(study, own)
    return settings_from_params(best.params) if best is not None else None


def write_outputs(spec: TuneSpec, storage, targets: list[Target], out_dir: Path,
                  location: str) -> tuple[dict[str, Path], dict[str, str]]:
    """``best_priorities.yaml``, ``history.parquet`` and ``importances.parquet`` from the stored
    studies (written atomically: concurrent invocations leave a complete file). Returns the files
    and, per target, a note on its importances where it has none (``"none - <why>"``) or they are
    not of every complete trial. Where no target has a finished suggestion, a best-values file of an
    earlier run (other tasks, another storage) is set aside as ``<file>.stale`` (``.stale.1`` and on
    where that is taken: an earlier one set aside is kept too) (``files["best_set_aside"]``). Each located
    real data file or folder is walked once in a call (for the ``data_fingerprint`` of
    ``tuned_with``), however many tasks read it."""
    import pandas as pd

    from ablate.results import TUNE_TARGETS_FILE, atomic_write_parquet

    histories, importances, best, notes = [], [], {}, {}
    # (each located data file or folder's count and size, for run_data_fingerprint: walked once in this call, not once
    # per task - tasks reading the same files, e.g. a plugin task on IMDB's tree beside imdb, walked it again each)
    walked: dict[Any, tuple[int, int]] = {}
    for target in targets:
        study = _load_stored(target, storage)
        if study is None:  # (not started yet)
            continue
        own = own_values(target, spec)
        histories.append(study_history(study, target, spec.settings.arm, own))
        imp, note = study_importances(study, target, spec.settings.space())
        importances.append(imp)
        if note:  # (why there are none, or which trials they are of)
            notes[target.key] = note if len(imp) else f"none - {note}"
        settings = best_settings(study, own)
        if settings is None:
            continue
        tasks = spec.study.tasks if target.key == CROSS_TASK else [target.key]
        for task in tasks:
            # where they were picked: a study that compares on these seeds' validation metric reads them
            # at their most favourable (load_study warns)
            # (at full precision: the values that scored best are the values a study runs)
            # (a deep copy each: the tasks of a cross-task search sharing one list were written as a YAML
            # anchor and aliases, and editing the first task's values in the file changed every task's)
            # and with what: the values are tuned for these settings of the searched arm (the stored study's
            # objective record pins them), which a study reading them under others is warned about
            config = next(m["config"] for m in target.members if m["task"] == task)
            context = tuning_context(config, spec.settings.arm, _searched_keys(spec))
            fingerprint = run_data_fingerprint(config, walked)  # (real data: which files, beyond `data: real`)
            if fingerprint is not None:
                context[DATA_FINGERPRINT] = fingerprint
            if target.key == CROSS_TASK:  # (scored against the AdamW arm: the vector picked depends on its settings)
                reference = next(t.config for t in spec.study.trials if t.task == task and "adamw" in t.arms)
                context[ADAMW_REFERENCE] = tuning_context(reference, "adamw")
            best[task] = {**copy.deepcopy(settings), TUNED_ON_SEEDS: list(spec.study.seeds),
                          TUNED_FOR: spec.settings.arm, TUNED_WITH: context}
    files = {}
    history = pd.concat([h for h in histories if len(h)], ignore_index=True) if any(len(h) for h in histories) else \
        pd.DataFrame(columns=["task", "study", "number", "value", "state", "direction", "baseline", "arm", "ended",
                              "chosen"])
    atomic_write_parquet(history, out_dir / "history.parquet")
    files["history"] = out_dir / "history.parquet"
    # every target of the run, so that a report names those whose search has not started (no history rows)
    atomic_write_bytes(out_dir / TUNE_TARGETS_FILE, json.dumps([t.key for t in targets]).encode("utf-8"))
    imp = pd.concat([i for i in importances if len(i)], ignore_index=True) if any(len(i) for i in importances) else \
        pd.DataFrame({"task": pd.Series(dtype=str), "param": pd.Series(dtype=str), "importance": pd.Series(dtype=float)})
    atomic_write_parquet(imp, out_dir / "importances.parquet")
    files["importances"] = out_dir / "importances.parquet"
    if best:
        arm = spec.settings.arm
        header = (f"# Best values found by `ablate tune` for study {spec.name!r} "
                  f"({'one vector for all tasks' if spec.settings.cross_task else 'per task'}"
                  f"{', the AdamW arm' if arm == 'adamw' else ''}), "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.\n"
                  f"# Stored study: {location}\n"
                  f"# Use in a study file: {tuned_file_usage(arm, '<path to this file>')}\n"
                  + ("# priorities are [gradient alignment, loss decrease, generalization gap].\n" if arm == "baseline"
                     else "")
                  + f"# {TUNED_ON_SEEDS}: the seeds whose validation metric picked them (compare the optimizers on "
                    f"other seeds).\n"
                  + f"# {TUNED_WITH}: the settings they were tuned with (a study that runs them with others is "
                    f"warned).\n")
        text = header + yaml.safe_dump(best, sort_keys=False, default_flow_style=None)
        files["best"] = atomic_write_bytes(out_dir / spec.settings.best_file, text.encode("utf-8"))
    elif (out_dir / spec.settings.best_file).exists():
        # no target has a finished suggestion (every one failed, in another storage or for other tasks than the file's
        # run): an earlier run's file, left, would be read by `ablate run` as this search's best values, which the
        # history written beside it does not hold. Set aside, not deleted: its values are no less an earlier result
        best = out_dir / spec.settings.best_file
        files["best_set_aside"] = best.replace(_unused_name(best.with_name(best.name + STALE_SUFFIX)))
    return files, notes


def _unused_name(path: Path) -> Path:
    """``path``, or where that exists ``path.1``, ``path.2``, ...: the first name not taken."""
    n, free = 0, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}.{n}")
    return free


def format_summary(outcome: TuneOutcome) -> str:
    lines = []
    for o in outcome.targets:
        t = o.target
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(o.counts.items())) or "none"
        lines.append(f"\n{t.key}: {t.direction} {t.description}")
        lines.append(f"  stored study {t.study_name!r}: {sum(o.counts.values())} trials ({counts}); {o.ran} run now")
        if o.best_number is None:
            lines.append("  no complete trial yet" if o.counts else "  its search has not started")
            continue
        lines.append(f"  best: {o.best_value:.6g} (trial #{o.best_number})  {_format_params(o.best_params)}")
        outside = [f"{k} = {v:.4g} not in [{r.low:g}, {r.high:g}]" for k, v in o.best_params.items()
                   if (r := outcome.space.get(k)) is not None and not r.contains(v)]
        if outside:  # (a range may change between runs; the best is over every stored trial)
            lines.append(f"  outside the current search range ({'; '.join(outside)}): the best is over every trial of "
                         f"the stored study, also those of earlier runs with other ranges")
        if o.baseline_value is not None:
            own = "the baseline's" if outcome.arm == "baseline" else "AdamW's"
            lines.append(f"  {own} own values scored {o.baseline_value:.6g}")
            gain = abs(o.best_value - o.baseline_value)
            min_delta = max(m["config"]["min_delta"] for m in t.members)
            if gain == 0:
                lines.append(f"  the best are {own} own values: no suggestion beat them (scores within "
                             f"{TUNING_TIE_TOL:g}{'' if t.key == CROSS_TASK else ' of each other, relative,'} count as "
                             f"ties)")
            elif t.key != CROSS_TASK and gain < min_delta:
                lines.append(f"  the best beats them by {gain:.3g}, less than {t.key}'s min_delta ({min_delta:g}), the "
                             f"smallest change early stopping counts: on this budget the searched values made no "
                             f"measurable difference")
        for tasks, state, value, number in o.starting_points:
            scored = f"scored {value:.6g}" if state == "COMPLETE" else state.lower()
            tie = (state == "COMPLETE" and number != o.best_number and tuning_tie(value, o.best_value, t.key == CROSS_TASK))
            lines.append(f"  starting point: the baseline values of {', '.join(tasks)}, applied to every task, {scored}"
                         + (f" - a tie with the best: the best values, one vector for every task, change "
                            f"{', '.join(tasks)}'s own for no measured gain" if tie else ""))
    files = outcome.files
    lines.append("")
    if "best" in files:
        lines.append(f"best values: {files['best']}  (in a study file: {tuned_file_usage(outcome.arm, Path(files['best']).resolve())}"
                     f"; a relative path there is relative to the study file)")
    elif "best_set_aside" in files:
        best = Path(files["best_set_aside"])
        lines.append(f"no best values: no target of this run has a finished suggestion in {outcome.storage}; the "
                     f"earlier run's {best.name.split(STALE_SUFFIX)[0]} (of other tasks or another study storage), "
                     f"which `ablate run` would have read as this search's, is set aside as {best}")
    lines.append(f"history: {files['history']}; importances: {files['importances']} (`ablate report` plots both)")
    for key, note in outcome.importance_notes.items():
        lines.append(f"  importances of {key}: {note}")
    lines.append(f"study storage: {outcome.storage}; browse it with `{dashboard_command(outcome.storage)}` "
                 f"(pip install optuna-dashboard); extend it with `ablate tune SPEC --trials N`")
    return "\n".join(lines)


def tune_command(args) -> int:
    import argparse

    from ablate.sweep import resume_command

    def command(**changes: Any) -> str:  # this command line, with other --trials
        return resume_command(argparse.Namespace(**{**vars(args), **changes}))

    spec = load_tune_spec(args.spec, trials=args.trials)
    try:
        outcome = run_tune(spec, args.out, address=args.address, ray_storage=args.storage,
                           study_storage=args.study_storage, again=command(), outputs_only=command(trials=0))
    except AdamWReferenceError as exc:
        print(f"ablate: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ReferenceInterrupted as exc:
        print(f"interrupted during the cross-task AdamW reference ({exc}); no suggestion ran. Continue (the "
              f"finished reference trials are kept and reused) with:\n  {command()}", flush=True)
        return 130
    except TuneInterrupted as exc:  # (between or after the searches, as the outputs are written)
        print(f"interrupted; {exc}", flush=True)
        return 130
    except KeyboardInterrupt:  # (before a search, e.g. while Ray starts: a search's own Ctrl-C ends in the summary)
        print(f"interrupted; the suggestions that finished are stored in the study storage. Continue with:\n"
              f"  {command()}", flush=True)
        return 130
    print(format_summary(outcome), flush=True)
    if outcome.interrupted:
        key = outcome.interrupted[0]
        keys = [o.target.key for o in outcome.targets]
        ran = {o.target.key: o.ran for o in outcome.targets}
        after = keys[keys.index(key) + 1:]
        left = spec.settings.trials - ran[key]
        # (--trials is one count for every target: a command adds just the rest only where there is one target)
        rest = (f"\nor, to add only the {left} suggestion(s) this run did not get to:\n  {command(trials=left)}"
                if len(keys) == 1 and 0 < left < spec.settings.trials else "")  # (none finished: the same command)
        print(f"interrupted during {key} after {ran[key]} of {spec.settings.trials} suggestion(s) (finished ones are "
              f"kept in its stored study){'; the searches of ' + ', '.join(after) + ' did not start' if after else ''}. "
              f"The same command continues, adding --trials suggestions to every target ({key} included):\n"
              f"  {command()}{rest}", flush=True)
        return 130
    empty = [o.target.key for o in outcome.targets if o.best_number is None]
    if empty:  # (as `ablate run` returns 1 when trials failed: `ablate tune ... && ablate run ...` must stop)
        print(f"ablate: error: no suggestion of {', '.join(empty)} has finished (see the states above), so there are "
              f"no best values for {'it' if len(empty) == 1 else 'them'}", file=sys.stderr, flush=True)
        return 1
    return 0
