"""The flat trial config: every key, its type, default and meaning - in one place.

A *trial config* is a plain, flat, JSON-serialisable dict. It names the task, the optimizer,
every MetaAdamW component and hyperparameter, the seed and the budget, so a result row always
says exactly which components produced it. :func:`resolve_config` fills defaults in this order:

1. :data:`COMMON_FIELDS` defaults (the paper's Table 1),
2. the task's ``defaults`` (the paper's Table 4 task-optimal settings, training settings and
   model keys such as ``d_model``),
3. the task's ``embedded_defaults`` when ``data == "embedded"`` (smaller model, fewer epochs),
4. the user's values,

then validates the result: unknown keys, wrong types, values out of range and contradictory
settings raise :class:`ConfigError` naming the key and the allowed values.

This module is the single source of truth for hyperparameter names: the study-file parser, the
trial runner, the optimizer builder and the results tables all read :data:`COMMON_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from ablate.allocator import CPU_MALLOC


class ConfigError(ValueError):
    """A trial config (or a study file) is invalid; the message names the key and the fix (an error
    of several independent problems, :func:`several`, has them in ``problems``, a line each)."""


def several(problems: Sequence[ConfigError]) -> ConfigError:
    """One error for independent ``problems`` (at least one): the one itself, or a ConfigError whose
    ``problems`` are their messages (its message: them a line each), which ``ablate`` says a line each."""
    if len(problems) == 1:
        return problems[0]
    said = [p for e in problems for p in (getattr(e, "problems", None) or [str(e)])]
    error = ConfigError("\n".join(said))
    error.problems = said
    return error


class CrossKeyError(ConfigError):
    """A constraint between keys is broken (``d_model`` a multiple of ``n_heads``, ``seq_len`` within
    the split). :func:`resolve_config` raises it for a complete trial config; the study file's
    checks of one setting or one mapping alone (``cross_keys=False``) leave it to the trials'
    configs, where the other key may come from another layer (the baseline, an override, an arm)."""


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    choices: tuple | Callable[[], list[str]] | None = None  # a tuple, or a callable listing names
    check: Callable[[Any], bool] | None = None
    check_doc: str = ""
    nullable: bool = False

    def allowed(self) -> list | None:
        if self.choices is None:
            return None
        return list(self.choices()) if callable(self.choices) else list(self.choices)


def _component_registries() -> dict[str, Any]:
    """The registry of each config key that names a component MetaAdamW builds (features, grouping,
    objective, weighting: :func:`metaadamw.optimizer.component_registries`, so that a kind added
    there is validated here too), imported when needed."""
    from metaadamw.optimizer import component_registries

    return component_registries()


def _registry(key: str) -> Any:
    """The registry of the components a config key names (task, or a component kind of
    :func:`_component_registries`), or None."""
    from ablate.tasks import TASKS

    return {"task": TASKS, **_component_registries()}.get(key)


#: how the error for an unknown component names its kind, where that is not the config key itself
_PLUGGED_NAMES = {"features": "feature extractor"}


def _plugged_name(key: str) -> str | None:
    """What a plugin registers under a config key that names a component ("task", "feature
    extractor", "grouping", ...), in words for the unknown-name error; None for any other key."""
    if key == "task" or key in _component_registries():
        return _PLUGGED_NAMES.get(key, key)
    return None


def _registry_names(kind: str) -> Callable[[], list[str]]:
    return lambda: _registry(kind).list()


def _entry_point_problem(key: str, value: Any) -> str | None:
    """Why the entry point of that name (of the registry of ``key``: task, features, ...) contributed
    nothing - it failed to load, or its object was refused -, or None."""
    registry = _registry(key)
    return None if registry is None else registry.entry_point_problem(value)


def _task_names() -> list[str]:
    from ablate.tasks import list_tasks

    return list_tasks()


_pos = (lambda v: v > 0, "> 0")
_nonneg = (lambda v: v >= 0, ">= 0")
#: the largest seed: a trial seeds torch generators with ``seed * 1000 + k`` (k < 3) and ``seed + 7919``,
#: which torch takes as unsigned 64-bit integers (a larger seed failed inside the trial with
#: "ValueError: Overflow when unpacking long long")
MAX_SEED = (2**64 - 1 - 7919) // 1000
_seed = (lambda v: 0 <= v <= MAX_SEED, f">= 0 and at most {MAX_SEED}")
_unit = (lambda v: 0 <= v < 1, "in [0, 1)")
_multiplier_range = (lambda v: 0 <= v <= 2, "in [0, 2], so that the multiplier stays positive")
_three = (
    lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(is_number(x) and x >= 0 for x in v),
    "a list of three non-negative numbers [gradient alignment, loss decrease, generalization gap]",
)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _f(name, type_, default, doc, choices=None, check=None, nullable=False):
    check_fn, check_doc = check if check else (None, "")
    return Field(name, type_, default, doc, choices, check_fn, check_doc, nullable)


#: Keys every trial config has. Task-specific keys (model sizes) come from the task's defaults.
COMMON_FIELDS: dict[str, Field] = {
    f.name: f
    for f in [
        # identity and data
        _f("task", str, None, "registered task name (see `ablate list`)", _task_names),
        _f("data", str, "embedded", "'embedded' (small offline variant) or 'real' (the dataset on disk)", ("embedded", "real")),
        _f("data_dir", str, None, "directory of the real dataset (else $ABLATE_DATA_DIR)", nullable=True),
        _f("optimizer", str, "metaadamw", "'adamw' (torch.optim.AdamW reference arm) or 'metaadamw'", ("adamw", "metaadamw")),
        _f("seed", int, 0, "seeds Python, NumPy, torch and the data order", check=_seed),
        _f("device", str, "cpu", "'cpu', 'cuda' or 'auto'", ("cpu", "cuda", "auto")),
        _f("num_threads", int, None, "torch intra-op threads (default: the CPUs the trial holds under ablate run "
           "and tune, torch's own count under ablate train; the row records the count used)", check=_pos, nullable=True),
        # budget and training loop
        _f("epochs", int, 10, "maximum number of epochs", check=_pos),
        _f("max_steps", int, None, "stop after this many optimizer steps (null: no step budget)", check=_pos, nullable=True),
        _f("batch_size", int, 64, "training batch size", check=_pos),
        _f("eval_batch_size", int, None, "evaluation batch size (default: batch_size)", check=_pos, nullable=True),
        _f("patience", int, 2, "early-stopping patience in epochs, warm-up epochs included (0 disables early stopping)", check=_nonneg),
        _f("min_delta", float, 1e-3, "minimum improvement of the primary metric that resets patience (the best epoch is the best value, "
           "whatever its gain)", check=_nonneg),
        _f("warmup_epochs", int, 1, "epochs of plain training before meta-updates start", check=_nonneg),
        _f("max_train_batches", int, None, "cap on training batches per epoch (null: the whole split)", check=_pos, nullable=True),
        _f("grad_clip", float, None, "clip the gradient norm to this value (null: no clipping)", check=_pos, nullable=True),
        # AdamW (paper Table 1)
        _f("lr", float, 5e-4, "learning rate", check=_pos),
        _f("weight_decay", float, 1e-2, "decoupled weight decay", check=_nonneg),
        _f("beta1", float, 0.9, "first-moment decay", check=_unit),
        _f("beta2", float, 0.999, "second-moment decay", check=_unit),
        _f("eps", float, 1e-8, "AdamW epsilon", check=_pos),
        # MetaAdamW
        _f("alpha_range", float, 1.0, "range of the learning-rate multiplier alpha = 1 + range*(sigmoid - 0.5)", check=_multiplier_range),
        _f("beta_range", float, 1.0, "range of the weight-decay multiplier beta", check=_multiplier_range),
        _f("meta_every", int, 100, "K_meta: steps between meta-updates (null when meta_per_epoch sets it)", check=_pos, nullable=True),
        _f("meta_per_epoch", float, None, "meta-updates per epoch (overrides meta_every): that many in every epoch, at evenly spread steps, from 1 up rounded down to a whole number (2.5: 2 per epoch); below 1, one every 1/this epochs", check=_pos, nullable=True),
        _f("meta_lr", float, 1e-4, "learning rate of the modulator's optimizer", check=_pos),
        _f("meta_weight_decay", float, 0.0, "weight decay of the modulator's optimizer", check=_nonneg),
        _f("meta_optimizer", str, "sgd", "the modulator's optimizer", ("sgd", "adam", "adamw")),
        _f("grouping", str, "fine_grained", "grouping strategy (parameter groups = modulator tokens)", _registry_names("grouping")),
        _f("features", str, "basic", "feature extractor", _registry_names("features")),
        _f("time_step", bool, True, "add the normalised time step to the features"),
        _f("second_moment", bool, True, "add the second-moment norm to the features"),
        _f("gating", bool, False, "learnable sigmoid feature gates with an L1 sparsity penalty"),
        _f("gate_l1", float, 1e-3, "L1 penalty weight of the feature gates", check=_nonneg),
        _f("objective", str, "combined", "meta objective", _registry_names("objective")),
        _f("weighting", str, "huw_priority", "how the objective terms are combined", _registry_names("weighting")),
        _f("weighting_form", str, "regression", "uncertainty-weighting form", ("regression", "classification")),
        _f("priorities", list, [1.0, 1.0, 1.0], "HUW priorities [gradient alignment, loss decrease, generalization gap]", check=_three),
        _f("fixed_weights", list, [1.0, 1.0, 1.0], "weights of the 'fixed' weighting", check=_three),
        _f("modulator_layers", int, 8, "Transformer encoder layers of the modulator", check=_pos),
        _f("modulator_heads", int, 6, "attention heads of the modulator", check=_pos),
        _f("modulator_ff", int, 16, "feed-forward width of the modulator", check=_pos),
        _f("modulator_width", int, None, "model width (null: the feature width padded to a multiple of the heads)", check=_pos, nullable=True),
        _f("modulator_init", str, "default", "modulator output head init: 'default' (PyTorch's, as the paper's code: random multipliers ~1+-0.2) or 'zero' (starts as AdamW, up to float rounding, until the first meta-update)", ("default", "zero")),
        _f("meta_gradient", str, "finite_difference", "meta-gradient through g': 'finite_difference' (Hessian-vector product from two gradients) or 'exact' (double backward, as the paper)", ("finite_difference", "exact")),
        _f("refresh_every", int, 1, "recompute alpha/beta every k steps (1: every step, the paper's behaviour)", check=_pos),
        # the trial's process
        _f("cpu_malloc", str, "system", "'system': the C library's defaults; 'keep': the trial's process takes large CPU blocks from the heap and keeps freed memory (glibc; no page faults on every step, faster CPU training of large models, more memory; see ablate.allocator)", CPU_MALLOC),
    ]
}

#: Keys that only matter for MetaAdamW (ignored, and left out of the identity, for AdamW trials).
METAADAMW_KEYS = (
    "alpha_range beta_range meta_every meta_per_epoch meta_lr meta_weight_decay meta_optimizer grouping "
    "features time_step second_moment gating gate_l1 objective weighting weighting_form priorities "
    "fixed_weights modulator_layers modulator_heads modulator_ff modulator_width modulator_init meta_gradient refresh_every "
    "warmup_epochs"
).split()

#: Keys that set the same thing in two ways: giving one drops the other's default.
ALTERNATIVE_KEYS = {"meta_every": "meta_per_epoch", "meta_per_epoch": "meta_every"}


def with_alternatives(keys: Iterable[str]) -> set[str]:
    """``keys`` and the keys they replace (:data:`ALTERNATIVE_KEYS`: meta_every for meta_per_epoch)."""
    keys = set(keys)
    return keys | {ALTERNATIVE_KEYS[k] for k in keys if k in ALTERNATIVE_KEYS}

#: Keys that do not change what a trial computes (left out of its identity).
NON_IDENTITY_KEYS = ("data_dir", "num_threads", "device", "cpu_malloc")

#: The columns a trial's stored row holds beside its config keys (``ablate.trial.Trial._result``
#: and the study's labels, ``ablate.results.LABEL_COLUMNS``), and the per-metric ones ``best_<metric>``
#: adds: a task's own keys and metric names must not take them (the row would keep one of the two).
RESULT_COLUMNS = frozenset((
    "trial_id status error data_source data_fingerprint metric mode best_metric best_epoch epochs_run steps "
    "stop_reason time_total_s time_train_s time_meta_s time_eval_s meta_every_steps meta_updates meta_skipped "
    "resumed_from_epoch device_used finished_at code_fingerprint torch_version python_version hostname provenance_source study arm arms axis"
).split())
#: the prefixes of the per-metric and per-reference columns of that row (best_<metric>,
#: test_<metric>, ref_<reference>): no task key may start with them
RESULT_PREFIXES = ("best_", "test_", "ref_")


def _type_ok(field_type, value) -> bool:
    if field_type is float:
        return is_number(value)
    if field_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if field_type is bool:
        return isinstance(value, bool)
    if field_type is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, field_type)


def _type_name(t) -> str:
    return {float: "a number", int: "an integer", bool: "true/false", list: "a list", str: "a string"}.get(t, str(t))


def task_fields(task_name: str) -> dict[str, Any]:
    """Defaults of the task's own keys (everything in its defaults that is not a common key)."""
    from ablate.tasks import get_task

    spec = get_task(task_name)
    return {k: v for k, v in {**spec.defaults, **spec.embedded_defaults}.items() if k not in COMMON_FIELDS}


def _names_key(where: str, key: str) -> bool:
    """Whether the field path that ``where`` ends with names ``key`` already: the key itself
    (``s.yaml: baseline.lr``), a level of its axis (``ablations.lr[0]``), a bound of its tuned range
    (``tune.params.meta_lr.low``), each also followed by the task it is checked for (``(task etth1)``;
    the last ``(task``, so that a task named with parentheses, a plugin's ``a(b)``, is taken off whole)."""
    head, task, tail = where.rpartition(" (task ")
    path = head if task and tail.endswith(")") else where
    path = re.sub(r"(?:\[\d+\])+$|\.(?:low|high)$", "", path)
    return path.endswith((f".{key}", f": {key}"))


def validate_value(key: str, value: Any, where: str = "trial config") -> None:
    """Check one common key's value; a ConfigError starts with ``where`` and names the key, the
    value and what it must be. Where ``where`` names the key already (a study file's field path,
    ``s.yaml: baseline.priorities``, ``ablations.lr[0]``, ``tune.params.lr.low``: see
    :func:`_names_key`), the key is not said twice: ``...baseline.priorities: must be a list``, not
    ``...baseline.priorities: priorities must be a list``."""
    field = COMMON_FIELDS.get(key)
    if field is None:
        return
    named = _names_key(where, key)
    subject = "" if named else f"{key} "  # (the key, before "must ...")
    shown = f"{value!r}" if named else f"{key}={value!r}"  # (the value, named by its key)
    if value is None:
        if field.nullable:
            return
        raise ConfigError(f"{where}: {subject}must not be null ({field.doc})")
    if not _type_ok(field.type, value):
        hint = (f" (write it as [{value}])" if field.type is list and isinstance(value, str) and "," in value
                and not value.lstrip().startswith("[") else "")
        if field.nullable and isinstance(value, str) and value.strip().lower() == "none":
            hint = " (for none, write null: YAML and --set read None as text)"
        kind = "a finite number" if field.type is float and isinstance(value, float) else _type_name(field.type)
        raise ConfigError(f"{where}: {subject}must be {kind}, got {value!r}{hint} ({field.doc})")
    allowed = field.allowed()
    if allowed is not None and value not in allowed:
        hint = did_you_mean(value, map(str, allowed)) if isinstance(value, str) else ""
        if key == "device" and str(value).lower() == "gpu":  # (closest by spelling is 'cpu', the opposite)
            hint = " (did you mean 'cuda'?)"
        plugged = _plugged_name(key)
        broken = _entry_point_problem(key, value) if plugged else None
        if broken:  # an installed package exposes it, through an entry point that is broken
            hint = f" ({broken})"
        elif plugged and str(value).lower() not in {str(a).lower() for a in allowed}:  # (a plugin's component?)
            hint += (f" (a {plugged} a plugin registers: in a study file, list its module under plugins:; with ablate "
                     f"train or ablate list, give --plugin MODULE)")
        raise ConfigError(f"{where}: {shown} is not allowed{hint}; choose one of: "
                          f"{', '.join(map(str, allowed))}")
    if field.check is not None and not field.check(value):
        raise ConfigError(f"{where}: {shown} must be {field.check_doc} ({field.doc})")
    if key in _component_registries():  # (a plugin's: called as MetaAdamW calls it?)
        from metaadamw.optimizer import component_kind_problem, component_signature_problem

        problem = component_signature_problem(key, value) or component_kind_problem(key, value)
        if problem:
            raise ConfigError(f"{where}: {shown}: {problem}")


def resolve_config(config: Mapping[str, Any], where: str = "trial config", *, cross_keys: bool = True) -> dict[str, Any]:
    """Fill defaults (common, task, embedded) and validate; returns a new flat dict.
    ``cross_keys=False`` skips the constraints between keys (:class:`CrossKeyError`): for checking
    part of a config, against defaults that another part may replace."""
    if "task" not in config or config["task"] is None:
        raise ConfigError(f"{where}: 'task' is required; choose one of: {', '.join(_task_names())}")
    validate_value("task", config["task"], where)
    from ablate.tasks import get_task

    spec = get_task(config["task"])
    resolved = {k: f.default for k, f in COMMON_FIELDS.items()}
    resolved.update(spec.defaults)
    data = config.get("data", resolved["data"])
    if data == "embedded":
        resolved.update(spec.embedded_defaults)
    known = set(resolved)
    unknown = sorted(set(config) - known)
    if unknown:
        task_keys = sorted(k for k in known if k not in COMMON_FIELDS)
        named = ", ".join(f"{k!r}{did_you_mean(k, sorted(known))}" for k in unknown)
        raise ConfigError(
            f"{where}: unknown key(s) {named}. Common keys: {', '.join(COMMON_FIELDS)}; "
            f"keys of task {config['task']!r}: {', '.join(task_keys) or '(none)'}"
        )
    resolved.update(config)
    for key, other in ALTERNATIVE_KEYS.items():  # giving one drops the other's default (a task's meta_per_epoch)
        if config.get(key) is not None and other not in config:
            resolved[other] = None
    problems: list[ConfigError] = []  # (each key's: said together)
    nulls: list[ConfigError] = []  # task keys set to null whose default is not (as for a common key not nullable)
    for key, value in resolved.items():
        if key in COMMON_FIELDS:
            try:
                validate_value(key, value, where)
            except ConfigError as exc:
                problems.append(exc)
        elif key in spec.defaults or key in spec.embedded_defaults:
            mine, other = ((spec.embedded_defaults, spec.defaults) if data == "embedded"
                           else (spec.defaults, spec.embedded_defaults))
            default = mine.get(key) if mine.get(key) is not None else other.get(key)
            subject = "" if _names_key(where, key) else f"{key} "  # (not said twice: see validate_value)
            # the task, where ``where`` does not name it already (a study file's "baseline.seq_len (task etth1)")
            task_said = _names_task(where, spec.name)
            # null where no default of the task's is null (as for a common key that is not nullable;
            # refused after the task's check, which may say more)
            if value is None and all(d[key] is not None for d in (mine, other) if key in d):
                own = mine[key] if key in mine else other[key]
                nulls.append(ConfigError(f"{where}: {subject}must not be null ("
                                         f"{'the task' if task_said else f'task {spec.name}'}'s default: {own!r}; "
                                         f"leave the key out to take it)"))
            if default is not None and value is not None and not _same_kind(default, value):
                kind = "a finite number," if isinstance(default, float) and isinstance(value, float) else _kind_of(default)
                problems.append(ConfigError(f"{where}: {subject}must be {kind} like {default!r}"
                                            f"{'' if task_said else f' (task {spec.name})'}, got {value!r}"))
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                resolved[key] = float(value)  # (dropout: 0 and dropout: 0.0 are the same trial, as for lr)
            elif (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)) and default
                  and all(isinstance(d, float) for d in default)):  # (scales: [1, 2] and [1.0, 2.0]: one trial)
                resolved[key] = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if problems:  # (with the nulls: the task's check, which may say more of them, is not reached)
        raise several(problems + nulls)
    for key in ("priorities", "fixed_weights"):
        resolved[key] = [float(x) for x in resolved[key]]
    for key, field in COMMON_FIELDS.items():  # lr: 1 and lr: 1.0 are the same trial
        if field.type is float and resolved[key] is not None:
            resolved[key] = float(resolved[key])
    deferred: CrossKeyError | None = None  # a broken constraint between keys, raised after every other check
    try:
        _check_contradictions(resolved, config, where)
    except CrossKeyError as exc:
        deferred = exc
    if spec.check is not None:  # the task's own keys: ranges, choices, constraints between them
        try:
            spec.check(dict(resolved))
        except CrossKeyError as exc:
            deferred = deferred or CrossKeyError(f"{where}: {_said_once(str(exc), spec.name, where)}")
        except ValueError as exc:  # ConfigError included
            raise ConfigError(f"{where}: {_said_once(str(exc), spec.name, where)}") from None
        except Exception as exc:  # a bug in the check itself (a KeyError from a misspelt key): named, not a traceback
            if nulls:  # (a check that does arithmetic on the key fails on the null, its cause)
                raise several(nulls) from None
            raise ConfigError(f"{where}: task {spec.name!r}: its check(config) raised {type(exc).__name__}: {exc} (a "
                              f"check refuses a value with ablate.config.ConfigError or ValueError)") from exc
    if nulls:  # (a task factory given None where its default is a value crashed in every trial)
        raise several(nulls)
    if deferred is not None and cross_keys:
        raise deferred
    if resolved["meta_per_epoch"] is not None:
        resolved["meta_every"] = None  # set from the epoch length by the trial; keeps resolution idempotent
    return resolved


def _names_task(where: str, task: str) -> bool:
    """Whether ``where`` ends with the task it is checked for: a study file's field path
    (``baseline.seq_len (task etth1)``), one of its trials (``s.yaml: arm 'baseline' on task 'etth1'``)
    or a corner of its tuned ranges (``s.yaml: tune (low ends of the ranges, task etth1)``, as
    :mod:`ablate.tune` checks them)."""
    return where.endswith((f"(task {task})", f" on task {task!r}", f", task {task})"))


def _said_once(message: str, task: str, where: str) -> str:
    """A task check's message (``"TASK: KEY=VALUE must be ..."``, as :mod:`ablate.tasks.base`'s checks
    say it) less what ``where`` says already: the task where ``where`` ends with it (:func:`_names_task`),
    and the key where its field path names it (:func:`_names_key`) - so that a study file's
    ``baseline.seq_len (task etth1): -1 must be ...`` does not go on ``etth1: seq_len=-1 must be ...``,
    nor ``arm 'baseline' on task 'etth1': d_model=130 is not ...`` on ``etth1: d_model=130 ...``."""
    if not _names_task(where, task) or not message.startswith(f"{task}: "):
        return message
    message = message[len(task) + 2:]
    key = re.match(r"(\w+)=", message)
    return message[key.end():] if key and _names_key(where, key[1]) else message


def _kind_of(default: Any) -> str:
    """What a task key's default is, in words, for the error that refuses a value of another kind."""
    if isinstance(default, bool):
        return "true or false,"
    if isinstance(default, int):
        return "an integer,"
    if isinstance(default, float):
        return "a number,"
    if isinstance(default, (list, tuple)):
        return "a list,"
    return "a string," if isinstance(default, str) else f"a {type(default).__name__},"


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return is_number(value) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _check_contradictions(resolved: dict, given: Mapping[str, Any], where: str) -> None:
    if given.get("meta_every") is not None and given.get("meta_per_epoch") is not None:  # see ALTERNATIVE_KEYS
        raise ConfigError(
            f"{where}: meta_every={given['meta_every']} and meta_per_epoch={given['meta_per_epoch']} both set "
            f"the meta-update frequency; give only one"
        )
    if resolved["data"] == "embedded" and given.get("data_dir"):
        raise ConfigError(f"{where}: data_dir is given but data='embedded'; set data: real (ablate train: --data real) "
                          f"to use the files in it")
    # constraints between keys (CrossKeyError) last: a check of one layer of a study file skips them
    if resolved["meta_every"] is None and resolved["meta_per_epoch"] is None and resolved["optimizer"] == "metaadamw":
        raise CrossKeyError(f"{where}: meta_every is null but meta_per_epoch is not set: MetaAdamW needs one of them "
                          f"(meta_every: steps between meta-updates, or meta_per_epoch: meta-updates per epoch)")
    width = resolved.get("modulator_width")
    if width is not None and width % resolved["modulator_heads"]:
        raise CrossKeyError(
            f"{where}: modulator_width={width} is not a multiple of modulator_heads={resolved['modulator_heads']}"
        )


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines the result (used for the trial id). For
    embedded data, ``data`` is ``"embedded:<version>"`` where the task has an ``embedded_version``
    (:attr:`ablate.tasks.TaskSpec.embedded_version`): new embedded data make new trials."""
    ident = {k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS}
    if ident.get("data") == "embedded":
        version = _embedded_version(ident.get("task"))
        if version:
            ident["data"] = f"embedded:{version}"
    if ident.get("optimizer") == "adamw":
        for k in METAADAMW_KEYS:
            ident.pop(k, None)
    return ident


def _embedded_version(task: Any) -> str:
    """The version of a registered task's embedded data ("" for none, or a task not registered)."""
    from ablate.tasks import TASKS

    if not isinstance(task, str) or task not in TASKS:
        return ""
    return getattr(TASKS.get(task), "embedded_version", "") or ""


def trial_id(config: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit id derived from the trial's identity config."""
    blob = json.dumps(identity_config(config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def describe_fields() -> str:
    """A human-readable table of every common key (used by `ablate list --keys`)."""
    rows = []
    for f in COMMON_FIELDS.values():
        allowed = f.allowed()
        extra = f" (one of: {', '.join(map(str, allowed))})" if allowed else ""
        rows.append(f"{f.name:<18} {json.dumps(f.default):<18} {f.doc}{extra}")
    return "\n".join(rows)


def describe_task_fields(task_name: str) -> str:
    """A human-readable table of the task's own keys - its model and data keys, which are no common
    key (``ablate list --task TASK --keys``) -: each with its kind and its defaults on the real and
    the embedded data (a study file sets them under ``budget:`` or ``overrides.<task>:``). The kind is
    that of a default that is not null; a key of the task's ``path_keys`` is a path (``or null`` where
    a default is null); a key null on both data, not a path: any value the task's check accepts (the
    task says no more of it)."""
    from ablate.tasks import get_task

    spec = get_task(task_name)
    keys = task_fields(task_name)
    if not keys:
        return "(none)"
    width = max(18, *map(len, keys))
    rows = [f"{'key':<{width}} {'data: real':<18} {'data: embedded':<18} kind"]
    for key in keys:  # (a key of the embedded data only is no key of the real data: "-")
        real = json.dumps(spec.defaults[key]) if key in spec.defaults else "-"
        embedded = spec.embedded_defaults[key] if key in spec.embedded_defaults else spec.defaults[key]
        example = next((d[key] for d in (spec.defaults, spec.embedded_defaults) if d.get(key) is not None), None)
        nullable = any(d.get(key, 0) is None for d in (spec.defaults, spec.embedded_defaults))
        if key in spec.path_keys:
            kind = "a path" + (" or null" if nullable else "")
        elif example is None:  # (null on both data: its kind is the task's to check)
            kind = "null or what the task accepts"
        else:
            kind = _kind_of(example).rstrip(",") + (" or null" if nullable else "")
        rows.append(f"{key:<{width}} {real:<18} {json.dumps(embedded):<18} {kind}".rstrip())
    return "\n".join(rows)


def did_you_mean(key: Any, options: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the options closest to a misspelt ``key``, or ``""`` (``cutoff``:
    how close, as difflib measures it, ignoring case): :func:`metaadamw.registry.suggestion`'s, the
    rule of the registries' own "Did you mean" - an option that differs from ``key`` only in case
    alone (``ETTh1``: ``'etth1'``), else every option as close as the closest, in sorted order
    (``etth``: ``'etth1' or 'etth2'``), not one picked of them by its spelling."""
    from metaadamw.registry import suggestion

    named = suggestion(key, options, cutoff)
    return f" (did you mean {named}?)" if named else ""


def first_ten(names: Sequence[str]) -> str:
    """Up to ten ``names``, joined by "; ", and how many more there are (for messages)."""
    return "; ".join(names[:10]) + (f"; and {len(names) - 10} more" if len(names) > 10 else "")
