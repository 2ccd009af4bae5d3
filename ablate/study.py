"""Study files: one YAML file describes a whole ablation study; this module reads, validates and
expands it into trials.

A study names its tasks, seeds, budget and *arms* (the format reference is
``search_spaces/README.md``):

* ``adamw`` - the AdamW reference arm (``adamw: true``, or a mapping of its own settings);
* ``baseline`` - MetaAdamW with each task's defaults (the paper's Table 4) plus ``baseline:``;
* ``<axis>=<level>`` - one-factor-at-a-time ablations, each one change from the baseline;
* ``factorial:<axis>=<level>,...`` - the cells of a full or fractional factorial design.

The trials are tasks x seeds x arms. A trial's config is ``{task, data, [data_dir], seed}``, then
``budget``, then ``baseline`` (for the AdamW arm: ``optimizer: adamw`` and its settings), then
the task's entry of ``baseline.priorities_from`` (a ``best_priorities.yaml`` written by ``ablate
tune``; for the AdamW arm, of ``adamw.tuned_from``, a ``best_adamw.yaml``), then
``overrides[task]``, then the arm's own settings; later layers win. :func:`ablate.config.resolve_config`
fills the defaults and validates the result, and :func:`ablate.config.trial_id` names it. Arms of
one task that resolve to the same trial id (an ablation level equal to the baseline value, say)
share one trial that records every arm name.

:func:`load_study` raises :class:`StudyError` for every problem - malformed YAML, unknown keys,
wrong types, unknown tasks or components, contradictions - before any trial runs, naming the file,
the field path (``quick.yaml: ablations.features[1]``), the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import sys
import warnings
from importlib import import_module, invalidate_caches
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from ablate.config import (
    COMMON_FIELDS,
    METAADAMW_KEYS,
    NON_IDENTITY_KEYS,
    ConfigError,
    ALTERNATIVE_KEYS,
    did_you_mean,
    is_number,
    identity_config,
    resolve_config,
    task_fields,
    trial_id,
    validate_value,
    with_alternatives,
)

#: Top-level keys of a study file and what each holds (any other key is an error).
STUDY_KEYS = {
    "name": "the study's name ([A-Za-z0-9_-]+), also its output directory",
    "description": "free text",
    "data": "'embedded' (small offline variants) or 'real' (the datasets on disk)",
    "data_dir": "directory of the real datasets (default: $ABLATE_DATA_DIR)",
    "tasks": "a list of registered task names",
    "seeds": "an integer N (seeds 0..N-1) or a list of distinct non-negative integers",
    "budget": "trial-config settings applied to every trial, e.g. {epochs: 3}",
    "resources": "per-trial resources {cpus: >0, gpus: >=0}",
    "retries": "how many times a failed trial is retried (integer >= 0)",
    "plugins": "modules imported before validation, e.g. [my_package.my_features]",
    "baseline": "MetaAdamW settings of every MetaAdamW arm, on top of each task's defaults",
    "adamw": "true/false, or a mapping of settings of the AdamW reference arm (tuned_from: a best_adamw.yaml of ablate tune)",
    "overrides": "per-task settings applied to every arm of that task: {task: {key: value}}",
    "ablations": "one-factor-at-a-time axes: {axis: [values]} or {axis: {level: {key: value}}}",
    "factorial": "a factorial design: {axes: {...}, fraction: null|2|4|..., generators: [...]}",
    "tune": "settings of `ablate tune` (the Optuna search of the priorities); validated there, ignored by `ablate run`",
}
REQUIRED_KEYS = ("name", "tasks", "seeds")

FACTORIAL_KEYS = {
    "axes": "the design's axes, written like ablation axes",
    "fraction": "null (the full grid) or 2, 4, 8, ... (a 1/2, 1/4, ... fraction of two-level axes)",
    "generators": "explicit 2^(k-p) generators such as ['C=AB'] (letters A, B, ... = axes in order)",
}

#: Per-trial resources and their defaults.
RESOURCE_DEFAULTS = {"cpus": 1, "gpus": 0}

#: Trial-config keys a study sets in one place only, and where.
_RESERVED = {
    "task": "list the tasks under tasks:",
    "seed": "give the seeds under seeds:",
    "data": "set the top-level data:",
    "data_dir": "set the top-level data_dir:",
    "optimizer": "the arm decides it (adamw: is the AdamW arm, every other arm is MetaAdamW)",
}

#: Keys that set the same quantity: a settings layer that sets one drops the other from the
#: layers below it, so `meta_per_epoch` levels work on top of a task's `meta_every`.

#: A study expanding to more trials than this is refused (split it into several studies).
MAX_TRIALS = 20_000
#: Largest number of generator combinations searched for an automatic fractional design.
MAX_GENERATOR_SEARCH = 50_000

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_LABEL_RE = re.compile(r"[A-Za-z0-9_.+-]+")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_GENERATOR_RE = re.compile(r"([A-Z])=(-?)([A-Z]+)")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class StudyError(ConfigError):
    """A study file is invalid; the message names the file, the field path, the value and the fix.
    One error may hold several independent problems (``problems``, one message each; the message is
    them a line each), so that a file with several is fixed in one go."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclasses.dataclass
class TrialSpec:
    """One trial: a resolved flat config and the arm name(s) it stands for."""

    trial_id: str
    task: str
    seed: int
    arm: str  # the first arm that maps to this trial
    arms: list[str]  # every arm that maps to it (identical configs are merged)
    axis: str  # "" (adamw, baseline), the ablation axis, or "factorial"
    config: dict[str, Any]  # the resolved flat trial config (JSON-serialisable)


@dataclasses.dataclass
class Study:
    """A parsed, validated and expanded study file."""

    name: str
    description: str
    path: Path | None
    data: str
    tasks: list[str]
    seeds: list[int]
    resources: dict[str, float]
    retries: int
    plugins: list[str]
    trials: list[TrialSpec]
    arm_axes: dict[str, str] = dataclasses.field(default_factory=dict)  # arm -> axis, in file order

    def arms(self) -> list[str]:
        """Every arm name in file order, including arms merged into another arm's trial."""
        return list(self.arm_axes)


@dataclasses.dataclass
class _Arm:
    name: str
    axis: str
    settings: dict[str, Any]
    adamw: bool = False


@dataclasses.dataclass
class _Context:
    """What the parsing steps share: the file name for messages and the settings read so far."""

    source: str
    data: str = "embedded"
    data_dir: str | None = None
    tasks: list[str] = dataclasses.field(default_factory=list)
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # baseline.priorities_from, per task
    tuned_on_seeds: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # the seeds they were tuned on
    adamw_tuned: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # adamw.tuned_from, per task
    adamw_tuned_on_seeds: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    tuned_with: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # the settings they were tuned with
    adamw_tuned_with: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    searched: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # arm -> the keys `ablate tune` searches now
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # (each located data file or folder's count and size, for :func:`run_data_fingerprint`: walked once per parse
    # for both tuned arms' files, not once per arm - a 50,000-file tree takes about a second; not kept across
    # parses, as the files may change between runs)
    walked: dict[Any, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def where(self, path: str) -> str:
        return f"{self.source}: {path}" if path else self.source

    def error(self, path: str, message: str) -> StudyError:
        return StudyError(f"{self.where(path)}: {message}")

    problems: list[str] = dataclasses.field(default_factory=list)  # found by attempt(), raised by gate()

    def attempt(self, check: Any, *args: Any, default: Any = None, **kwargs: Any) -> Any:
        """``check(*args, **kwargs)``; where it refuses something, its problems are noted (for
        :meth:`gate`) and ``default`` is returned, so that the independent checks after it still run."""
        try:
            return check(*args, **kwargs)
        except ConfigError as exc:
            self.problems += _problems(exc)
            return default

    def gate(self) -> None:
        """Raise every problem noted so far, as one StudyError: before checks that depend on them."""
        if self.problems:
            raise StudyError(*self.problems)


def _problems(exc: ConfigError) -> list[str]:
    """The problems a ConfigError (a StudyError of several too) names, one message each."""
    return list(getattr(exc, "problems", None) or [str(exc)])


def _each(check: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[check(item) for item in items]``, every item checked: the problems of all of them are
    raised together (one StudyError), so that a file with several is fixed in one go."""
    results, problems = [], []
    for item in items:
        try:
            results.append(check(item))
        except ConfigError as exc:
            problems += _problems(exc)
    if problems:
        raise StudyError(*problems)
    return results


# -- entry points ---------------------------------------------------------------------------


def load_study(path: str | os.PathLike, *, extra_seeds: int | list[int] | None = None) -> Study:
    """Read, validate and expand a study file.

    Plugins listed in the file are imported first (a module file or package next to the study
    file is found there). ``extra_seeds`` adds seeds to the file's: an integer N adds the N seeds
    after the largest one, a list adds those seeds.
    """
    path = Path(path)
    mapping = _read_yaml(path)
    study = parse_study(mapping, source=str(path), base_dir=path.parent, extra_seeds=extra_seeds)
    study.path = path
    return study


def parse_study(
    mapping: Any,
    source: str = "<string>",
    *,
    base_dir: str | os.PathLike | None = None,
    extra_seeds: int | list[int] | None = None,
    searched: dict[str, Iterable[str]] | None = None,
) -> Study:
    """Validate and expand a study given as a mapping (the parsed YAML).

    ``source`` names the file in messages; ``base_dir`` is where plugin modules next to the study
    file are looked for and what a relative ``data_dir`` is relative to. ``searched``: per arm, the
    config keys ``ablate tune`` searches on top of this study (not compared with a tuned file's
    ``tuned_with``: the search sets them).
    """
    ctx = _Context(source)
    for arm, keys in (searched or {}).items():
        ctx.searched[arm] = with_alternatives(keys)
    try:
        return _parse(mapping, ctx, base_dir, extra_seeds)
    except StudyError:
        raise
    except ConfigError as exc:  # from ablate.config, whose message already names the field
        raise StudyError(*_problems(exc)) from None


def import_plugins(plugins: Iterable[str], base_dir: str | os.PathLike | None = None, source: str = "<string>",
                   where: str = "plugins", next_to: str = "next to the study file") -> None:
    """Import plugin modules, which register their components (and tasks) on import.

    When ``base_dir`` holds the plugin's module file or package, ``base_dir`` is put on
    ``sys.path`` first. Call this on every worker before building a trial. ``where`` and
    ``next_to`` word the error: the study file's ``plugins`` list, or ``ablate``'s ``--plugin``.
    """
    if isinstance(plugins, (str, bytes)):  # (iterated, "my_plugin" would import its letters "m", "y", ...)
        raise StudyError(f"{source}: {where}: must be a list of module names, e.g. ['my_package.my_features']; "
                         f"got the single string {_short(plugins)}: give [{_short(plugins)}]")
    for i, name in enumerate(plugins):
        if not isinstance(name, str):  # (a Python caller's: name.endswith below failed with an AttributeError)
            raise StudyError(f"{source}: {where}[{i}]: {_short(name)} is not a module name: give the plugin's module "
                             f"name as a string, e.g. 'my_package.my_features'")
        if not name.strip():  # (importlib's "Empty module name. Fix the error it raises")
            raise StudyError(f"{source}: {where}[{i}]: is an empty module name: give the plugin's module name "
                             f"(its file {next_to}, or importable from the Python path)")
        if name.endswith(".py") or "/" in name or os.sep in name:
            module = Path(name).stem if name.endswith(".py") else Path(name).name
            raise StudyError(f"{source}: {where}[{i}]: {name!r} is a file path: give the module name {module!r} "
                             f"(its file {next_to}, or importable from the Python path)")
        top = name.split(".")[0]
        if base_dir is not None and _holds_module(Path(base_dir), top):
            directory = str(Path(base_dir).resolve())
            if directory not in sys.path:
                sys.path.insert(0, directory)
                invalidate_caches()
        try:
            import_module(name)
        except Exception as exc:
            fix = _plugin_import_fix(name, exc, next_to)
            raise StudyError(
                f"{source}: {where}[{i}]: cannot import plugin module {name!r}: {type(exc).__name__}: {exc}. {fix}"
            ) from exc


def _plugin_import_fix(name: str, exc: Exception, next_to: str) -> str:
    """What to do about plugin ``name`` failing to import with ``exc``: add the module (it, or a
    module of its own package, is missing), install what it imports, or fix its code."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing is None:
        return "Fix the error it raises" + (
            f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.filename else "")
    top = missing.split(".")[0]
    if name == missing or name.startswith(missing + "."):  # the plugin itself (or its package) is not there
        return f"Install it, or put {name.replace('.', '/')}.py {next_to}"
    if top == name.split(".")[0]:  # a module of the plugin's own package
        return f"It imports {missing!r}, a module of its own package that does not exist: add {missing.replace('.', '/')}.py"
    if missing != top and _find_spec(top) is not None:
        return f"It imports {missing!r}, which the installed {top!r} does not have (another version?)"
    return f"It imports {missing!r}, which is not installed here: install {'it' if missing == top else repr(top)}"


def _find_spec(module: str) -> Any:
    """``importlib.util.find_spec`` of a top-level module, None also where looking raises."""
    from importlib.util import find_spec

    try:
        return find_spec(module)
    except (ImportError, ValueError):
        return None


#: ``--dry-run`` lists the trials one per line in studies of at most this many (else ``--list`` does)
LISTED_TRIALS = 500


def format_trials(study: Study, every: bool = False) -> str:
    """The ``--dry-run`` listing: one line per trial (id, task, seed, arms, settings that differ
    from the task's baseline trial) - in a study of more than :data:`LISTED_TRIALS`, only with
    ``every`` - then the number of trials per arm and task."""
    head = f"study {study.name}: {len(study.trials)} trials"
    if len(study.trials) > LISTED_TRIALS and not every:
        return "\n".join([f"{head} (one line per trial with --list)", "", *_summary(study)])
    baselines = {(t.task, t.seed): t.config for t in study.trials if "baseline" in t.arms}
    rows = [
        [t.trial_id, t.task, f"seed={t.seed}", " = ".join(t.arms), _differences(t.config, baselines[t.task, t.seed])]
        for t in study.trials
    ]
    return "\n".join([head, *_table(rows), "", *_summary(study)])


# -- reading the file -----------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys, reads 1e-3 as a number (YAML 1.1 reads it as a
    string), an integer with leading zeros as decimal (010 is 10, as YAML 1.2 reads it: YAML 1.1
    reads octal 8), 1:30 as a string (as YAML 1.2 reads it: YAML 1.1 reads base 60, 90), and
    reports every bad scalar (an impossible date, say) as a YAML error with its mark."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        text = self.construct_scalar(node)
        if ":" in text:
            return text
        digits = text.replace("_", "")
        if digits.lstrip("+-").isdigit():  # (0x10 and 0b11 as YAML 1.1 reads them)
            return int(digits, 10)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float | str:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_float(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {node.tag}: {exc}", node.start_mark
            ) from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


#: a line of a YAML file that holds no content: blank, a comment, a document marker (``---``, ``...``,
#: either with a comment after it) or a directive (``%YAML 1.2``, at the start of the line)
_NO_CONTENT_RE = re.compile(r"\s*(#.*)?|(---|\.\.\.)(\s+#.*)?\s*|%.*")


def _empty_file(text: str) -> str | None:
    """None where ``text`` has content; else what the empty file holds, for its message: ``""``
    (nothing, or whitespace), or `` (nothing but comments and document markers)`` and the like. A
    UTF-8 byte-order mark counts as nothing (YAML skips it; a study file saved with one is read)."""
    lines = text.removeprefix("\ufeff").splitlines()
    if not all(_NO_CONTENT_RE.fullmatch(line) for line in lines):
        return None
    kinds = [what for what, there in (
        ("comments", any(line.lstrip().startswith("#") for line in lines)),
        ("directives", any(line.startswith("%") for line in lines)),
        ("document markers", any(line.startswith(("---", "...")) for line in lines))) if there]
    return f" (nothing but {', '.join(kinds[:-1])}{' and ' if len(kinds) > 1 else ''}{kinds[-1]})" if kinds else ""


def _relative_paths_note(copy: Path) -> str:
    """For the folder error's advice to run a results folder's ``study.yaml``: where that copy names a
    relative ``data_dir``, ``baseline.priorities_from`` or ``adamw.tuned_from``, a note that they are
    read relative to the copy's folder, not the original's (the copy run as advised failed with "data
    directory ... does not exist", or said the tuned file did not exist and to run `ablate tune`
    first); else ``""``."""
    try:
        given = _read_yaml(copy)  # (as the copy is read when it is given)
        paths = {"data_dir": given.get("data_dir")}
        for section, key in (TUNED_FROM[arm].split(".") for arm in TUNED_FROM):
            if isinstance(given.get(section), dict):
                paths[f"{section}.{key}"] = given[section].get(key)
    except Exception:  # (an unreadable or odd copy: its own error comes when it is given)
        return ""
    relative = {k: v for k, v in paths.items()
                if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v))}
    if not relative:
        return ""
    said = " and ".join(f"{k} {v!r}" for k, v in relative.items())
    return (f" (its {said} {'is' if len(relative) == 1 else 'are'} relative to the study file's folder, which is now "
            f"{copy.parent}: give the original study file, or make {next(iter(relative)) if len(relative) == 1 else 'them'} "
            f"absolute in the copy)")


def _read_yaml(path: Path, tuned_file: str | None = None) -> Any:
    """The parsed YAML document of ``path``; every failure is a StudyError naming the file and, for
    the usual mistakes (a path that does not exist, a folder - a study's results folder, say -, a
    file that is not text), what to give instead: the bare OS error named neither. ``tuned_file``:
    the file ``ablate tune`` writes (``best_priorities.yaml``) where ``path`` is a study's tuned file,
    not the study file, so that the advice names that file, not a study file to give."""
    what = "the study file" if tuned_file is None else "the tuned file"
    give = ("a study's YAML file, e.g. search_spaces/quick.yaml" if tuned_file is None
            else f"the {tuned_file} `ablate tune` wrote")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyError(f"{path}: cannot read {what}: no such file; "
                         + ("give the path of a study's YAML file (search_spaces/ holds examples, e.g. "
                            "search_spaces/quick.yaml)" if tuned_file is None else f"give {give}")) from None
    except IsADirectoryError:
        copy = path / "study.yaml"  # (a study's results folder: `ablate run` keeps the file it ran there)
        raise StudyError(f"{path}: cannot read {what}: it is a folder; give "
                         + (f"a study's YAML file, e.g. {copy}, the copy of the study file that wrote these results"
                            + _relative_paths_note(copy)
                            if tuned_file is None and copy.is_file() else give)) from None
    except UnicodeDecodeError:
        raise StudyError(f"{path}: cannot read {what}: it is not a UTF-8 text file; give {give}") from None
    except PermissionError:  # (the bare "Permission denied" named no fix; the path quoted for the shell, spaces and all)
        raise StudyError(f"{path}: cannot read {what}: permission denied; make it readable "
                         f"(`chmod u+r {shlex.quote(str(path))}`, or ask its owner) or give a readable copy") from None
    except OSError as exc:
        raise StudyError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    empty = _empty_file(text)
    if empty is not None:  # (it said "...a mapping...; got None", or a YAML error for a lone %YAML or ...)
        raise StudyError(f"{path}: the file is empty{empty}")
    try:
        document = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        if "'\\t'" in problem:  # (PyYAML: "found character '\t' that cannot start any token")
            problem += " (a tab at that line and column: replace it with spaces, which YAML indents and separates with)"
        if isinstance(exc, yaml.parser.ParserError):
            problem += _misindented_item(text, mark)
        raise StudyError(f"{path}{at}: invalid YAML: {problem or exc}") from None
    except RecursionError:
        raise StudyError(f"{path}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # PyYAML's scanner: an escape beyond Unicode ("\U01000000")
        raise StudyError(f"{path}: invalid YAML: {exc}") from None
    return document


def _misindented_item(text: str, mark: Any) -> str:
    """The hint for a YAML error at a list item indented less than the items before it (``seeds:``,
    ``  - 1``, `` - 2``): YAML ends the list there and then finds an item where a key should be,
    which it says as "expected <block end>, but found '<block sequence start>'" (or ``'-'``); likewise
    an item indented deeper that cannot continue the one before (after a comment line, say). Names
    the list's key and the indentation of its items; ``""`` where the error is not at such an item."""
    lines = text.removeprefix("\ufeff").splitlines()
    if mark is None or mark.line >= len(lines):
        return ""
    line = lines[mark.line]
    item = line.lstrip(" ")
    if not (item == "-" or item.startswith("- ")):
        return ""
    indent = len(line) - len(item)
    items = None  # the indentation of the list's items before it (the shallowest: items' own content is deeper)
    for before in reversed(lines[:mark.line]):
        body = before.lstrip(" ")
        if not body.strip() or body.startswith("#"):
            continue
        column = len(before) - len(body)
        if body == "-" or body.startswith("- "):
            items = column if items is None else min(items, column)
            continue
        if items is None and column > indent:  # (deeper than the item: the content of an item of mappings above)
            continue
        if items is None or column >= items:  # (no item yet, or the content of one)
            if items is None:
                return ""
            continue
        key = body.split(" #")[0].rstrip()
        if not key.endswith(":") or items == indent:
            return ""
        key = key[:-1].strip()
        why = ("YAML ends a list at an item indented less" if indent < items else
               "YAML reads an item indented deeper as the start of a list inside the item before it")
        return (f" (the list item {item.strip()!r} at line {mark.line + 1} is indented by {indent} space(s), the items "
                f"of {key}: before it by {items}: {why}; indent every item of {key}: by {items} spaces, like its first)")
    return ""


def _folded_item(ctx: _Context, path: str, key: str, value: Any) -> None:
    """Refuse a list item that holds several: YAML continues an item with a line indented deeper
    than its ``-`` (``- etth1`` then ``  - imdb`` is the one item ``'etth1 - imdb'``)."""
    if not isinstance(value, str) or not re.search(r"\S\s+-(\s|$)", value):
        return
    parts = [p for p in re.split(r"\s+-(?:\s+|$)", value) if p]
    raise ctx.error(path, f"{value!r} is one item, read from the lines {' and '.join(f'`- {p}`' for p in parts)}: "
                          f"YAML continues a list item with a line indented deeper than its `-`; indent every "
                          f"item of {key}: alike")


def _check_plain(value: Any, ctx: _Context, path: str = "", _parents: tuple[int, ...] = ()) -> None:
    """Refuse what YAML can produce but a study cannot use: dates, sets, binary, non-string keys
    and structures that contain themselves (recursive aliases)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if id(value) in _parents:
        raise ctx.error(path or "top level", "contains itself (a recursive YAML alias)")
    parents = _parents + (id(value),)
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, ctx, f"{path}[{i}]", parents)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ctx.error(path or "top level", f"key {key!r} ({type(key).__name__}) is not a string; quote it")
            _check_plain(item, ctx, _join(path, key), parents)
    else:
        raise ctx.error(
            path or "top level",
            f"{_short(value)} is a {type(value).__name__}; use strings, numbers, booleans, lists and "
            f"mappings only (quote dates and the like)",
        )


# -- parsing --------------------------------------------------------------------------------


def _parse(mapping: Any, ctx: _Context, base_dir: str | os.PathLike | None, extra_seeds: Any) -> Study:
    """Validate every field in order, then expand the trials."""
    _check_plain(mapping, ctx)
    if not isinstance(mapping, dict):
        hint = (" (study files are YAML, or JSON; this looks like TOML: write key: value)"
                if isinstance(mapping, str) and " = " in mapping else "")
        raise ctx.error("", f"a study must be a mapping with at least {', '.join(REQUIRED_KEYS)}; got "
                            f"{_short(mapping)}{hint}")
    ctx.attempt(_check_keys, mapping, STUDY_KEYS, ctx.where, REQUIRED_KEYS)  # (an unknown key: the rest still checked)
    given = {k: v for k, v in mapping.items() if v is not None}  # a key left empty takes its default
    # (a required key that is missing is said above; the keys beside it are still checked, the settings only
    # where the tasks are given)
    # independent problems are collected (ctx.attempt) and said together (ctx.gate) before the checks that need
    # what they check: the plugins (their tasks and components), the tasks and data (the settings), all of them (the
    # trials)
    said = len(ctx.problems)
    plugins = ctx.attempt(_parse_plugins, ctx, given.get("plugins", []), default=[])
    if len(ctx.problems) == said:
        ctx.attempt(import_plugins, plugins, base_dir, ctx.source)
    if len(ctx.problems) > said:
        ctx.gate()
    name = ctx.attempt(_parse_name, ctx, given["name"]) if "name" in given else None
    description = given.get("description", "")
    if not isinstance(description, str):
        ctx.problems.append(str(ctx.error("description", f"must be a string, got {_short(description)}")))
    said = len(ctx.problems)
    ctx.attempt(_parse_data, ctx, given.get("data", COMMON_FIELDS["data"].default), given.get("data_dir"), base_dir)
    ctx.tasks = ctx.attempt(_parse_tasks, ctx, given["tasks"], default=[]) if "tasks" in given else []
    # (the settings are checked against the tasks and their data)
    settings_checkable = len(ctx.problems) == said and "tasks" in given
    seeds = ctx.attempt(_parse_seeds, ctx, given["seeds"], default=[]) if "seeds" in given else []
    if extra_seeds is not None and seeds:
        seeds += ctx.attempt(_parse_extra_seeds, ctx, extra_seeds, seeds, default=[])
    resources = ctx.attempt(_parse_resources, ctx, given.get("resources", {}))
    retries = given.get("retries", 0)
    if not _is_int(retries) or retries < 0:
        ctx.problems.append(str(ctx.error(
            "retries", f"must be an integer >= 0 (how often a failed trial is retried), got {_short(retries)}")))
    if not settings_checkable:
        ctx.gate()
    ctx.budget = ctx.attempt(_check_settings, ctx, _budget_defaults(given.get("budget"), ctx.tasks), "budget", ctx.tasks,
                             default={})
    baseline = given.get("baseline")
    if isinstance(baseline, dict) and "priorities_from" in baseline:
        baseline = {k: v for k, v in baseline.items() if k != "priorities_from"}
        ctx.tuned, ctx.tuned_on_seeds, ctx.tuned_with = ctx.attempt(
            _parse_tuned_file, ctx, given["baseline"]["priorities_from"], base_dir, baseline, given.get("overrides"),
            default=({}, {}, {}))
    ctx.baseline = ctx.attempt(_check_settings, ctx, baseline, "baseline", ctx.tasks, default={})
    adamw = given.get("adamw", True)
    if isinstance(adamw, dict) and "tuned_from" in adamw:
        adamw = {k: v for k, v in adamw.items() if k != "tuned_from"}
        ctx.adamw_tuned, ctx.adamw_tuned_on_seeds, ctx.adamw_tuned_with = ctx.attempt(
            _parse_tuned_file, ctx, given["adamw"]["tuned_from"], base_dir, adamw, arm="adamw", default=({}, {}, {}))
    ctx.overrides = ctx.attempt(_parse_overrides, ctx, given.get("overrides", {}), default={})
    adamw_arms = ctx.attempt(_parse_adamw, ctx, adamw, default=[])
    ablation_arms = ctx.attempt(_parse_ablations, ctx, given.get("ablations", {}), default=[])
    factorial_arms = ctx.attempt(_parse_factorial, ctx, given.get("factorial"), default=[])
    ctx.gate()
    _warn_tuned_on_these_seeds(ctx, seeds)
    arms = adamw_arms + [_Arm("baseline", "", {})]
    _warn_unpaired_baseline_keys(ctx, arms[0] if arms[0].adamw else None)
    arms += ablation_arms + factorial_arms
    total = len(ctx.tasks) * len(seeds) * len(arms)
    if total > MAX_TRIALS:
        raise ctx.error(
            "", f"{len(ctx.tasks)} tasks x {len(seeds)} seeds x {len(arms)} arms = {total} trials, more than "
            f"{MAX_TRIALS}; split the study"
        )
    trials = _expand(ctx, arms, seeds)
    _warn_tuned_with_other_settings(ctx, trials)
    return Study(
        name=name,
        description=description,
        path=None,
        data=ctx.data,
        tasks=ctx.tasks,
        seeds=seeds,
        resources=resources,
        retries=retries,
        plugins=plugins,
        trials=trials,
        arm_axes={arm.name: arm.axis for arm in arms},
    )


def _check_keys(mapping: dict, allowed: Mapping[str, str], where: Callable[[str], str],
                required: Iterable[str] = ()) -> None:
    """Unknown keys (with a did-you-mean hint) and missing required keys are errors, all of them
    raised together (one StudyError). ``where(key)`` words the start of a key's message - the file
    and the key's field path: the study file's (``f"{source}: resources.cpus"``) or the ``tune:``
    section's (``ablate.tune``) - so that both say unknown keys alike."""
    problems = [f"{where(key)}: unknown key{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"
                for key in mapping if key not in allowed]
    problems += [f"{where(key)}: is required: {allowed[key]}" for key in required if mapping.get(key) is None]
    if problems:
        raise StudyError(*problems)


def _parse_plugins(ctx: _Context, plugins: Any) -> list[str]:
    if not isinstance(plugins, list):
        raise ctx.error("plugins", f"must be a list of module names, e.g. [my_package.my_features]; got {_short(plugins)}")
    for i, name in enumerate(plugins):
        _folded_item(ctx, f"plugins[{i}]", "plugins", name)
        if not isinstance(name, str) or not _MODULE_RE.fullmatch(name):
            raise ctx.error(f"plugins[{i}]", f"{_short(name)} is not a module name like my_package.my_features")
    return list(plugins)


def _parse_name(ctx: _Context, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        read_as = (f" (YAML reads on, off, yes, no, true and false unquoted as {name}: quote the name, "
                   f"name: \"on\")" if isinstance(name, bool) else
                   " (YAML reads an unquoted number as one: quote the name)" if isinstance(name, (int, float)) else "")
        raise ctx.error("name", f"must match [A-Za-z0-9_-]+ (it names the output directory); got {_short(name)}{read_as}")
    return name


def _parse_data(ctx: _Context, data: Any, data_dir: Any, base_dir: str | os.PathLike | None) -> None:
    """``data`` and ``data_dir``; a relative data_dir is relative to the study file."""
    validate_value("data", data, ctx.where("data"))
    ctx.data = data
    validate_value("data_dir", data_dir, ctx.where("data_dir"))
    if data_dir and data == "embedded":
        raise ctx.error("data_dir", f"{data_dir!r} is given but data is 'embedded'; set data: real to use it, or remove data_dir")
    if data_dir:
        expanded = os.path.expanduser(data_dir)
        ctx.data_dir = os.path.join(base_dir, expanded) if base_dir is not None and not os.path.isabs(expanded) else expanded


def _parse_tasks(ctx: _Context, tasks: Any) -> list[str]:
    from ablate.tasks import TASKS

    if not isinstance(tasks, list) or not tasks:
        raise ctx.error("tasks", f"must be a non-empty list of task names, e.g. [etth1, imdb]; got {_short(tasks)}")
    def check(item: tuple[int, Any]) -> None:
        i, task = item
        if not (isinstance(task, str) and task in TASKS):  # (a registered task's name may hold " - " itself)
            _folded_item(ctx, f"tasks[{i}]", "tasks", task)
        validate_value("task", task, ctx.where(f"tasks[{i}]"))
        if task in tasks[:i]:
            raise ctx.error(f"tasks[{i}]", f"{task!r} is listed twice")

    _each(check, enumerate(tasks))  # (each task's problem: said together)
    return list(tasks)


def _parse_seeds(ctx: _Context, seeds: Any) -> list[int]:
    if _is_int(seeds):
        if not 1 <= seeds <= MAX_TRIALS:
            raise ctx.error("seeds", f"an integer N means seeds 0..N-1, so it must be in 1..{MAX_TRIALS}; got {seeds}")
        return list(range(seeds))
    if not isinstance(seeds, list) or not seeds:
        raise ctx.error(
            "seeds",
            f"must be an integer N (seeds 0..N-1) or a non-empty list of distinct non-negative integers; "
            f"got {_short(seeds)}",
        )
    _check_seed_list(ctx, seeds, "seeds", [])
    return list(seeds)


def _parse_extra_seeds(ctx: _Context, extra: Any, seeds: list[int]) -> list[int]:
    """Seeds added on top of the file's: N more after the largest, or an explicit list."""
    if _is_int(extra) and 1 <= extra <= MAX_TRIALS:
        added = list(range(max(seeds) + 1, max(seeds) + 1 + extra))
        validate_value("seed", added[-1], ctx.where("extra_seeds"))  # (after a seed near the largest allowed)
        return added
    if isinstance(extra, (list, tuple)) and extra:
        _check_seed_list(ctx, list(extra), "extra_seeds", seeds)
        return list(extra)
    raise ctx.error(
        "extra_seeds", f"must be an integer N >= 1 (N more seeds) or a non-empty list of new seeds; got {_short(extra)}"
    )


def _check_seed_list(ctx: _Context, seeds: list, path: str, existing: list[int]) -> None:
    def check(item: tuple[int, Any]) -> None:
        i, seed = item
        _folded_item(ctx, f"{path}[{i}]", path, seed)
        validate_value("seed", seed, ctx.where(f"{path}[{i}]"))
        if seed in seeds[:i] or seed in existing:
            raise ctx.error(f"{path}[{i}]", f"seed {seed} is given twice")

    _each(check, enumerate(seeds))  # (each seed's problem: said together)


def _parse_resources(ctx: _Context, resources: Any) -> dict[str, float]:
    if not isinstance(resources, dict):
        raise ctx.error("resources", f"must be a mapping like {{cpus: 1, gpus: 0}}; got {_short(resources)}")
    problems = []  # (an unknown key and a bad value beside it: said together)
    try:
        _check_keys(resources, {"cpus": "CPUs per trial (> 0)", "gpus": "GPUs per trial (>= 0, may be fractional)"},
                    lambda key: ctx.where(_join("resources", key)))
    except StudyError as exc:
        problems += exc.problems
    merged = {**RESOURCE_DEFAULTS, **{k: v for k, v in resources.items() if v is not None and k in RESOURCE_DEFAULTS}}
    if not is_number(merged["cpus"]) or merged["cpus"] <= 0:  # (null: the default)
        problems.append(str(ctx.error("resources.cpus", f"must be a number > 0, got {_short(merged['cpus'])}")))
    if not is_number(merged["gpus"]) or merged["gpus"] < 0:
        problems.append(str(ctx.error("resources.gpus", f"must be a number >= 0, got {_short(merged['gpus'])}")))
    if problems:
        raise StudyError(*problems)
    return merged


#: the key of a ``best_priorities.yaml`` entry that records the seeds ``ablate tune`` scored the
#: values on (not a setting: :func:`_parse_tuned_file` sets it aside)
TUNED_ON_SEEDS = "tuned_on_seeds"
#: the key of an entry that records the arm ``ablate tune`` tuned the values for (``tune.arm``): a
#: file of one arm given to the other is refused (files without it, older or hand-written, are read)
TUNED_FOR = "tuned_for"


#: the key of an entry that records the settings the values were tuned with (the searched arm's
#: resolved :data:`TUNING_CONTEXT_KEYS` and the task's own keys on that task, the searched keys
#: left out): a study that reads them under other settings is warned, naming the keys (files
#: without it, or without some of the keys, older or hand-written: those keys are unknown, read
#: silently)
TUNED_WITH = "tuned_with"
#: the key of :data:`TUNED_WITH` under which a cross-task search records the AdamW reference it
#: scored its suggestions against (the AdamW arm's :func:`tuning_context` on that task): the
#: relative improvements, and so the vector picked, depend on it
ADAMW_REFERENCE = "adamw_reference"
#: the key of :data:`TUNED_WITH` that records the fingerprint of the real data the values were tuned
#: on (:func:`run_data_fingerprint`: the names and sizes of the files read), so that a study on other
#: real data (another data directory's files, a subset, a newer version) is warned, which ``data: real``
#: alone does not tell apart (absent: embedded data, or data ``ablate tune`` could not locate - unknown)
DATA_FINGERPRINT = "data_fingerprint"
#: the optimizer keys besides MetaAdamW's own that a suggestion's score depends on
OPTIMIZER_KEYS = ("lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip")
#: the budget keys a suggestion's score depends on (the best lr, or priorities, for 80 steps are not
#: those for 10 epochs)
BUDGET_KEYS = ("epochs", "max_steps", "max_train_batches", "batch_size")
# (not ``eval_batch_size``: it batches the validation split only - the meta-update's validation batches are
# ``batch_size``'s -, and every built-in task's ``evaluate`` averages over examples, not batches, so the
# validation metric the search scores is the same at any evaluation batch size up to float rounding, as the
# threads or the device leave it; recorded, it would warn a study that evaluates in larger batches for speed)
#: the early-stopping keys, which decide where a run ends (and so the best value it reaches)
STOPPING_KEYS = ("patience", "min_delta")
#: the data a run trains on: ``embedded`` (recorded as ``embedded:<version>`` where the task has an
#: embedded version, :func:`ablate.config.identity_config`) or ``real`` (a real dataset's own
#: file or split is one of the task's keys, e.g. ``csv_file``, ``split``, which are recorded too)
DATA_KEYS = ("data",)
#: per ``tune.arm``: the common settings :data:`TUNED_WITH` records (with every key of the task's own)
TUNING_CONTEXT_KEYS = {"baseline": (*METAADAMW_KEYS, *OPTIMIZER_KEYS, *BUDGET_KEYS, *STOPPING_KEYS, *DATA_KEYS),
                       "adamw": (*OPTIMIZER_KEYS, *BUDGET_KEYS, *STOPPING_KEYS, *DATA_KEYS)}


def unused_keys(config: dict[str, Any]) -> set[str]:
    """The keys ``config`` sets that do not change its run: MetaAdamW's
    (:func:`metaadamw.optimizer.unused_options`: ``gate_l1`` without gating, the priorities, fixed
    weights or uncertainty-weighting form of a built-in weighting that does not take them),
    and ``min_delta`` where early stopping cannot end the run (:func:`stops_early`)."""
    from metaadamw.optimizer import unused_options

    weighting = config.get("weighting")  # (a hand-edited tuned_with may hold anything: a list is no weighting's name)
    unused = set(unused_options(weighting if isinstance(weighting, str) else None, config.get("gating") is not False))
    if not stops_early(config):
        unused.add("min_delta")
    return unused


def stops_early(config: dict[str, Any]) -> bool:
    """Whether early stopping may end ``config``'s run before its budget: ``patience`` > 0 and
    below ``epochs - 1``. A run stops once ``patience`` epochs in a row did not improve, and only
    before its last epoch (:meth:`ablate.trial.Trial._early_stopping`); its first epoch always
    improves (on no value yet: a validation metric that is not finite ends the trial as diverged),
    so the earliest stop is after epoch ``patience + 1``, which must come before the last:
    ``patience >= epochs - 1`` never stops a run, which trains as ``patience: 0`` does. Values that
    are not integers (a hand-edited file): True."""
    patience, epochs = config.get("patience"), config.get("epochs")
    if not _is_int(patience) or not _is_int(epochs):
        return True
    return 0 < patience < epochs - 1


def ended_by_max_steps(config: dict[str, Any]) -> bool:
    """Whether ``max_steps`` ends ``config``'s run before its ``epochs`` do, whatever the data:
    ``epochs >= max_steps`` (an epoch has at least one step), so that the run makes ``max_steps``
    optimizer steps and its ``epochs`` changes nothing. (Where ``epochs < max_steps`` the number of
    steps is ``min(epochs * steps per epoch, max_steps)``, and the steps per epoch are the training
    split's batches, which only loading the data gives: ``epochs`` then counts as set.)"""
    epochs, max_steps = config.get("epochs"), config.get("max_steps")
    return _is_int(epochs) and _is_int(max_steps) and epochs >= max_steps


def run_data(config: dict[str, Any]) -> Any:
    """``config``'s ``data`` as :data:`TUNED_WITH` records it: ``embedded:<version>`` for embedded
    data of a task with an embedded version (other embedded data are another run), else as set."""
    return identity_config({"task": config.get("task"), "data": config.get("data")})["data"]


def run_data_fingerprint(config: dict[str, Any], walked: dict[Any, tuple[int, int]] | None = None) -> str | None:
    """The :func:`ablate.tasks.data_fingerprint` of ``config``'s real data (a stat of the files the
    task's ``locate`` names, as ``ablate run`` takes before it reuses a stored trial), or None: embedded
    data, a task without ``locate``, or data not found where ``config`` looks (unknown, not other data).
    ``walked``: the cache :func:`ablate.tasks.data_fingerprint` takes, kept by the caller for one pass
    (e.g. one parse) so that a large tree is walked once in it."""
    from ablate.tasks import TASKS, data_fingerprint

    task = config.get("task")
    if config.get("data") != "real" or not isinstance(task, str) or task not in TASKS:
        return None
    try:
        return data_fingerprint(TASKS.get(task), config, walked) or None
    except OSError:  # (DatasetNotFoundError included: no data here, or a file gone while it was read)
        return None


def task_keys(config: dict[str, Any]) -> list[str]:
    """The keys of ``config`` that are its task's own (model sizes, pooling, split, ...): not common keys."""
    return [k for k in config if k not in COMMON_FIELDS]


def tuning_context(config: dict[str, Any], arm: str, tuned: Iterable[str] = ()) -> dict[str, Any]:
    """What :data:`TUNED_WITH` records: ``config``'s values of the keys of ``arm``'s
    :data:`TUNING_CONTEXT_KEYS` and of the task's own keys, less the ``tuned`` keys (and the keys
    they replace); ``data`` as :func:`run_data` gives it."""
    tuned = with_alternatives(tuned)
    keys = [*TUNING_CONTEXT_KEYS[arm], *task_keys(config)]
    context = {k: config[k] for k in keys if k in config and k not in tuned}
    if "data" in context:
        context["data"] = run_data(config)
    return json.loads(json.dumps(context))


#: the files ``ablate tune`` writes (``tune.arm``: baseline or adamw) and the study-file key that reads each
TUNED_FILES = {"baseline": "best_priorities.yaml", "adamw": "best_adamw.yaml"}
TUNED_FROM = {"baseline": "baseline.priorities_from", "adamw": "adamw.tuned_from"}


def tuned_file_usage(arm: str, path: str) -> str:
    """How a study file reads a best-values file of ``arm``: ``adamw: {tuned_from: PATH}``."""
    return f"{TUNED_FROM[arm].replace('.', ': {')}: {path}}}"


def _parse_tuned_file(
    ctx: _Context, source: Any, base_dir: str | os.PathLike | None, arm_settings: dict[str, Any],
    overrides: Any = None, *, arm: str = "baseline",
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """``baseline: {priorities_from: FILE}`` (``arm="baseline"``) or ``adamw: {tuned_from: FILE}``:
    per-task settings from a YAML file written by ``ablate tune`` - ``best_priorities.yaml``:
    ``{task: [p1, p2, p3]}`` or ``{task: {priorities: [...], meta_lr: ...}}``; ``best_adamw.yaml``:
    ``{task: {lr: ...}}``; either with the ``tuned_on_seeds`` list, the ``tuned_for`` arm and the
    ``tuned_with`` settings. A relative path is relative to the study file. A task the priorities
    file lacks needs its priorities under ``overrides.<task>`` (which come after the file's settings
    anyway). Returns ``({task: settings}, {task: seeds}, {task: tuned_with})``."""
    path_s, file_name, adamw = TUNED_FROM[arm], TUNED_FILES[arm], arm == "adamw"
    example = "{lr: 3.0e-4}" if adamw else "{priorities: [1, 2, 0.5], meta_lr: 1.0e-4}"
    if not isinstance(source, str) or not source.strip() or "\0" in source:
        raise ctx.error(
            path_s, f"must be the path of a YAML file written by `ablate tune` (its {file_name}), "
            f"relative to the study file; got {_short(source)}"
        )
    path = Path(os.path.expanduser(source))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():  # (it said the folder "does not exist")
        inside = path / file_name
        raise ctx.error(path_s, f"{str(path)!r} is a folder: give the file `ablate tune` wrote"
                                + (f", {str(inside)!r}" if inside.is_file() else f" ({file_name})"))
    if not path.is_file():
        from ablate.results import MANIFEST

        tune_first = (f"`ablate tune` first{' with tune: {arm: adamw}' if adamw else ''}, which writes "
                      f"OUT/<name>/tune/{file_name}")
        if base_dir is not None and path != Path(os.path.expanduser(source)) and (Path(base_dir) / MANIFEST).is_file():
            # (the copy `ablate run` keeps in its results folder: the path was written relative to the original study
            # file, so "run `ablate tune` first" sent a user who had to a search they had run already)
            raise ctx.error(
                path_s, f"{str(path)!r} does not exist: this study file is the copy `ablate run` keeps in its results "
                f"folder {str(base_dir)!r}, and a relative path is relative to the study file, so {source!r} is read "
                f"from that folder now; give the original study file, or make the path absolute in the copy (if the "
                f"file was never written: run {tune_first})"
            )
        raise ctx.error(
            path_s, f"{str(path)!r} does not exist (a relative path is relative to the study file); run {tune_first}"
        )
    try:
        data = _read_yaml(path, file_name)
        _check_plain(data, _Context(str(path)))
    except StudyError as exc:
        raise ctx.error(path_s, str(exc)) from None
    if not isinstance(data, dict):
        raise ctx.error(path_s, f"{path} must map task names to "
                                f"{'AdamW settings, e.g. {etth1: {lr: 3.0e-4}}' if adamw else 'priorities, e.g. {etth1: [1.0, 2.0, 0.5]}'}"
                                f"; got {_short(data)}")
    tuned, tuned_on, tuned_with = {}, {}, {}

    def read(task: str) -> None:  # (one task's entry: its independent problems said together)
        where = f"{path_s} ({path.name}).{task}"
        problems: list[str] = []
        if task not in data:
            if (not adamw and isinstance(overrides, dict) and isinstance(overrides.get(task), dict)
                    and "priorities" in overrides[task]):
                return
            raise ctx.error(
                path_s, f"{path} has no entry for task {task!r} (it has: {', '.join(map(str, data)) or 'none'}); "
                f"tune that task too{'' if adamw else f', or set its priorities under overrides.{task}'}"
            )
        entry = data[task]
        if isinstance(entry, list) and not adamw:
            entry = {"priorities": entry}
        elif not isinstance(entry, dict):
            raise ctx.error(
                where, f"must be {'' if adamw else 'a list of three priorities or '}a mapping of settings such as "
                f"{example}; got {_short(entry)}"
            )
        entry = dict(entry)
        tuned_for = entry.pop(TUNED_FOR, None)
        if tuned_for is None:  # (missing, or left empty by hand: unknown)
            tuned_for = arm
        if tuned_for != arm:
            other = tuned_for if isinstance(tuned_for, str) and tuned_for in TUNED_FROM else None
            problems.append(f"{ctx.where(where)}: holds values `ablate tune` tuned for the {tuned_for!r} arm "
                            f"({TUNED_FOR}: {tuned_for}), not for the {arm!r} arm that {path_s} sets"
                            + (f"; use the file as {tuned_file_usage(other, 'FILE')}" if other else ""))
        seeds = entry.pop(TUNED_ON_SEEDS, None)
        if seeds is None:  # (missing, or left empty by hand: unknown)
            seeds = []
        if not isinstance(seeds, list) or not all(_is_int(x) for x in seeds):
            problems.append(f"{ctx.where(f'{where}.{TUNED_ON_SEEDS}')}: must be the list of seeds `ablate tune` "
                            f"scored the values on, got {_short(seeds)}")
        else:
            tuned_on[task] = list(seeds)
        context = entry.pop(TUNED_WITH, None)
        if context is None:  # (missing, or left empty by hand: unknown, so nothing to compare)
            context = {}
        if not isinstance(context, dict) or not all(isinstance(k, str) for k in context):
            problems.append(f"{ctx.where(f'{where}.{TUNED_WITH}')}: must be the mapping of the settings `ablate tune` "
                            f"tuned the values with, got {_short(context)}")
        else:
            reference = context.get(ADAMW_REFERENCE)  # (null: unknown)
            if reference is not None and (not isinstance(reference, dict)
                                          or not all(isinstance(k, str) for k in reference)):
                problems.append(f"{ctx.where(f'{where}.{TUNED_WITH}.{ADAMW_REFERENCE}')}: must be the mapping of the "
                                f"settings of the AdamW reference a cross-task search scored the values against, got "
                                f"{_short(reference)}")
            else:
                tuned_with[task] = context
        for key in entry:
            if key in arm_settings:
                problems.append(f"{ctx.where(where)}: sets {key!r}, which {path_s.split('.')[0]}: sets too; keep one "
                                f"of them")
            elif ALTERNATIVE_KEYS.get(key) in arm_settings:  # (the file's layer would drop the other without a word)
                problems.append(f"{ctx.where(where)}: sets {key!r}, and {path_s.split('.')[0]}: sets "
                                f"{ALTERNATIVE_KEYS[key]!r}: the same meta-update frequency; keep one of them")
        try:
            tuned[task] = _check_settings(ctx, entry, where, [task], adamw=adamw)
        except ConfigError as exc:
            problems += _problems(exc)
        if problems:
            raise StudyError(*problems)

    _each(read, ctx.tasks)  # (each task's problems: said together)
    return tuned, tuned_on, tuned_with


def _warn_tuned_with_other_settings(ctx: _Context, trials: list[TrialSpec]) -> None:
    """Values ``ablate tune`` picked are the best for the settings they were tuned with (the file's
    ``tuned_with``: the priorities of one meta optimizer, meta_lr and meta-update frequency, budget,
    early stopping, data and model, say; for a cross-task search, also the AdamW reference it
    scored them against): a study whose tuned arm runs them with other settings (or whose AdamW
    arm is not that reference) gets no tuned values, whatever the file says. Said per tuned arm,
    naming each task's differing keys (a task whose tuned keys the study's ``overrides.<task>`` all
    replace is not using them; a key the file does not record is unknown, not a difference). The
    advice fits what differs: settings to set back, the data files to read (other real data), or both."""
    for arm, tuned, tuned_with in (("baseline", ctx.tuned, ctx.tuned_with),
                                   ("adamw", ctx.adamw_tuned, ctx.adamw_tuned_with)):
        differ = {}
        for task, context in tuned_with.items():
            if not context or set(tuned.get(task, {})) <= set(ctx.overrides.get(task, {})) and tuned.get(task):
                continue
            config = next((t.config for t in trials if t.task == task and arm in t.arms), None)
            if config is None:
                continue
            said = _tuned_with_differences(context, config, ctx.searched.get(arm, set()), walked=ctx.walked)
            reference = context.get(ADAMW_REFERENCE)
            adamw = next((t.config for t in trials if t.task == task and "adamw" in t.arms), None)
            if isinstance(reference, dict) and adamw is not None:  # (a study without an AdamW arm: nothing to compare)
                said += _tuned_with_differences(reference, adamw, ctx.searched.get("adamw", set()),
                                                f"{ADAMW_REFERENCE}.", walked=ctx.walked)
            if said:
                differ[task] = said
        if not differ:
            continue
        said = "; ".join(f"{task}: {', '.join(keys)}" for task, keys in differ.items())
        what, whom = ("the priorities", "the baseline") if arm == "baseline" else ("AdamW's settings", "the AdamW arm")
        # (the advice fits what differs: a setting is set back in the study file, other real data are not - the same
        # data files are needed, or a new search on these)
        other_data = {k for keys in differ.values() for k in keys if k.split(" (")[0].endswith(DATA_FINGERPRINT)}
        settings = any(k not in other_data for keys in differ.values() for k in keys)
        if not settings:
            advice = "Run this study on the data files they were tuned on, or tune again on this study's data"
        elif other_data:
            advice = (f"Use the settings they were tuned with (the file's {TUNED_WITH}) on the data files they were "
                      f"tuned on, or tune again with this study's settings and data")
        else:
            advice = f"Use the settings they were tuned with (the file's {TUNED_WITH}), or tune again with this study's settings"
        warnings.warn(
            f"{ctx.where(TUNED_FROM[arm])}: {what} were tuned with other settings than {whom} of this study runs them "
            f"with ({said}), so they are not tuned for it. {advice}", stacklevel=3)


def _tuned_with_differences(context: dict[str, Any], config: dict[str, Any], searched: set[str],
                            prefix: str = "", *, walked: dict[Any, tuple[int, int]] | None = None) -> list[str]:
    """``key (tuned with X, here Y)`` for each key of a recorded ``context`` (:func:`tuning_context`)
    that ``config`` runs with another value: common keys and the task's own; ``data`` as
    :func:`run_data` gives it (a recorded ``embedded`` without a version: compared as set); a task key
    that names a file as the file it names (:func:`_same_file`); and, on real data, the recorded
    :data:`DATA_FINGERPRINT` against that of the files ``config`` reads (where they are found; a path
    key that names the recorded file under another name, a link, is read through the recorded path,
    as the fingerprint hashes the names; not where a path key already differs: other files, said once).
    ``walked``: :func:`run_data_fingerprint`'s cache, kept for one parse."""
    here = dict(config)
    if isinstance(context.get("data"), str) and ":" in context["data"]:
        here["data"] = run_data(config)
    # (a key that does not change the run - on either side - is no difference: gate_l1 without gating, the
    # priorities of a weighting that ignores them, min_delta without early stopping; nor is one that `ablate tune`
    # searches now; epochs neither where max_steps ends the run first on both sides - the steps, max_steps, are
    # compared -, nor patience where early stopping cannot end either run: patience 0, 1, 2 or 5 over 2 epochs)
    there = {**here, **context}
    ignore = unused_keys(here) | unused_keys(there) | searched
    if ended_by_max_steps(here) and ended_by_max_steps(there):
        ignore = ignore | {"epochs"}
    if not stops_early(here) and not stops_early(there):
        ignore = ignore | {"patience"}
    own = set(task_keys(config))
    paths = set(_path_keys(config.get("task")))
    keys = [k for k in context if (k in COMMON_FIELDS or k in own) and k not in ignore and here.get(k) != context[k]
            and not (k in paths and _same_file(context[k], here.get(k), config))]
    said = [f"{prefix}{k} (tuned with {json.dumps(context[k])}, here {json.dumps(here.get(k))})" for k in keys]
    recorded = context.get(DATA_FINGERPRINT)  # (real data on both sides: the files read, where this study looks)
    if (isinstance(recorded, str) and recorded and "data" not in keys and not paths & set(keys)
            and here.get("data") == "real"):
        # (a path key that names the same file as the recorded one - a link to it, or the absolute path of the file a
        # relative one finds - is read through the recorded path: the fingerprint hashes the file's name as given,
        # so the name the study gives it would make the same file other data)
        same = {k: context[k] for k in paths if k in context and k not in ignore and k not in keys}
        fingerprint = run_data_fingerprint({**config, **same}, walked)
        if fingerprint is not None and fingerprint != recorded:
            said.append(f"{prefix}{DATA_FINGERPRINT} (tuned with {json.dumps(recorded)}, here {json.dumps(fingerprint)}: "
                        f"other real data)")
    return said


def _path_keys(task: Any) -> tuple[str, ...]:
    """The task's keys that name files (:attr:`ablate.tasks.TaskSpec.path_keys`); none for a task
    not registered."""
    from ablate.tasks import TASKS

    return TASKS.get(task).path_keys if isinstance(task, str) and task in TASKS else ()


def _same_file(recorded: Any, here: Any, config: dict[str, Any]) -> bool:
    """Whether a path key's value in a tuned file's ``tuned_with`` (``recorded``) and ``config``'s
    (``here``) name one file, as the task finds it (:attr:`ablate.tasks.TaskSpec.path_keys`: absolute,
    or relative to the data directory): two relative paths alike once normalised (``./x.csv`` and
    ``x.csv``: both relative to their run's data directory), two absolute ones leading to one file
    (links followed), and ``config``'s relative path where the data directory it runs with, looked
    in as the task looks, finds it at ``recorded``'s absolute one. A recorded relative path against
    an absolute one here: the data directory it was relative to is not recorded, so they differ.
    Values that are not text (a hand-edited file): equal only if equal."""
    from ablate.tasks.base import DOWNLOADS, DatasetNotFoundError, data_dir_candidates

    if not isinstance(recorded, str) or not isinstance(here, str):
        return recorded == here
    there, mine = (os.path.normpath(os.path.expanduser(v)) for v in (recorded, here))
    if os.path.isabs(there) != os.path.isabs(mine):
        if not os.path.isabs(there):
            return False
        folders = [d.dataset_folder for d in DOWNLOADS.get(config.get("task"), ()) if d.dataset_folder] or [None]
        try:
            roots = [root for folder in folders for root in data_dir_candidates(config, folder)]
        except DatasetNotFoundError:  # (no data directory: nothing to resolve against)
            return False
        tried = [root / mine for root in dict.fromkeys(roots)]
        if not tried:
            return False
        mine = str(next((p for p in tried if p.is_file()), tried[0]))
    return there == mine or os.path.realpath(there) == os.path.realpath(mine)


def _warn_tuned_on_these_seeds(ctx: _Context, seeds: list[int]) -> None:
    """Settings picked by ``ablate tune`` for their validation metric on some seeds are at their
    most favourable there: a comparison on those seeds' validation metric credits the tuned arm
    with the selection (the best of many suggestions on the same noise). Said per tuned arm."""
    for arm, tuned, tuned_on in (("baseline", ctx.tuned, ctx.tuned_on_seeds),
                                 ("adamw", ctx.adamw_tuned, ctx.adamw_tuned_on_seeds)):
        shared = {task: sorted(set(seeds) & set(on)) for task, on in tuned_on.items()
                  if not set(tuned.get(task, {})) <= set(ctx.overrides.get(task, {}))}  # (not all overridden)
        shared = {task: s for task, s in shared.items() if s}
        if not shared:
            continue
        said = "; ".join(f"{task}: seed(s) {', '.join(map(str, s))}" for task, s in shared.items())
        every = [*ctx.tuned_on_seeds.values(), *ctx.adamw_tuned_on_seeds.values()]  # (fresh for both arms)
        fresh = max(max(seeds), *(max(t) for t in every if t)) + 1
        what, whom = ("the priorities", "the tuned baseline") if arm == "baseline" else ("AdamW's settings", "AdamW")
        warnings.warn(
            f"{ctx.where(TUNED_FROM[arm])}: {what} were tuned on the validation metric of seeds this study runs too "
            f"({said}); on those seeds the validation comparison favours {whom}, which was picked for them. Compare "
            f"on fresh seeds (seeds: {list(range(fresh, fresh + len(seeds)))}) or on a test split (WikiText-2, "
            f"Multi30k and IMDB have one, but not IMDB from a CSV; ETT's split: 12/4/4; CIFAR-10's split: holdout)",
            stacklevel=3)


def _parse_overrides(ctx: _Context, overrides: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(overrides, dict):
        raise ctx.error("overrides", f"must be a mapping {{task: {{key: value}}}}; got {_short(overrides)}")
    def check(item: tuple[str, Any]) -> tuple[str, dict[str, Any]]:
        task, settings = item
        if task not in ctx.tasks:
            raise ctx.error(f"overrides.{task}", f"{task!r} is not one of this study's tasks ({', '.join(ctx.tasks)})")
        return task, _check_settings(ctx, settings, f"overrides.{task}", [task])

    return dict(_each(check, overrides.items()))  # (each task's problems: said together)


def _parse_adamw(ctx: _Context, adamw: Any) -> list[_Arm]:
    """The AdamW arm: none (false), with the budget only (true), or with its own settings."""
    if adamw is False:
        return []
    if adamw is True:
        return [_Arm("adamw", "", {}, adamw=True)]
    if isinstance(adamw, dict):
        return [_Arm("adamw", "", _check_settings(ctx, adamw, "adamw", ctx.tasks, adamw=True), adamw=True)]
    raise ctx.error("adamw", f"must be true, false or a mapping of AdamW settings such as {{lr: 1.0e-3}}; got {_short(adamw)}")


def _warn_unpaired_baseline_keys(ctx: _Context, adamw: _Arm | None) -> None:
    """``baseline:`` holds MetaAdamW's settings, which the AdamW arm does not get: a model or budget
    key there (and not under ``adamw:`` too) makes AdamW and MetaAdamW train different things,
    where Table 2 pairs them. Likewise such a key in ``baseline.priorities_from``'s file (an ``lr``
    that ``ablate tune`` searched for MetaAdamW). A key AdamW gets a value of its own for (``adamw:``,
    ``adamw.tuned_from``, ``overrides.<task>``) is paired."""
    if adamw is None:
        return

    def shared(key: str, task: str) -> bool:  # (AdamW's trials of ``task`` get a value of their own for ``key``, or
        # overrides.<task> sets it for both arms)
        return (key in METAADAMW_KEYS or key in NON_IDENTITY_KEYS or key in adamw.settings
                or key in ctx.adamw_tuned.get(task, {}) or key in ctx.overrides.get(task, {}))

    keys = [k for k in ctx.baseline if not all(shared(k, task) for task in ctx.tasks)]
    if keys:
        warnings.warn(f"{ctx.where('baseline')}: sets {', '.join(keys)}, which AdamW's trials use as well but do not get "
                      f"(baseline: holds MetaAdamW's settings), so AdamW and MetaAdamW no longer train the same model "
                      f"and budget. Put what both should have under budget: (or overrides.<task>:); to keep a "
                      f"difference on purpose, set the key under adamw: too, to AdamW's value", stacklevel=3)
    # the same for the keys of baseline.priorities_from's file (`ablate tune` writes lr, grad_clip, ... there when
    # its params: searched them): they reach the MetaAdamW arms only, whose comparison with AdamW then credits
    # MetaAdamW with a tuning AdamW never had
    tuned = {task: [k for k in settings if not shared(k, task)] for task, settings in ctx.tuned.items()}
    tuned = {task: keys for task, keys in tuned.items() if keys}
    if tuned:
        said = "; ".join(f"{task}: {', '.join(keys)}" for task, keys in tuned.items())
        warnings.warn(f"{ctx.where(TUNED_FROM['baseline'])}: its file sets {said}, which AdamW's trials use as well but "
                      f"do not get (the file's values go to the MetaAdamW arms only), so AdamW and MetaAdamW no longer "
                      f"train alike and the comparison credits MetaAdamW with a tuning AdamW did not have. Tune AdamW's "
                      f"too (tune: {{arm: adamw}}) and read them with {tuned_file_usage('adamw', 'FILE')}; to keep "
                      f"the difference on purpose, set the key under adamw:", stacklevel=3)


#: names an ablation axis cannot take: an arm "<axis>=<level>" is told apart from these by its axis
_RESERVED_AXES = {"adamw": "the AdamW arm", "baseline": "the baseline", "factorial": "factorial cells"}


def _parse_ablations(ctx: _Context, ablations: Any) -> list[_Arm]:
    if not isinstance(ablations, dict):
        raise ctx.error(
            "ablations", f"must be a mapping {{axis: [values]}} or {{axis: {{level: {{key: value}}}}}}; got {_short(ablations)}"
        )
    def check(item: tuple[str, Any]) -> list[_Arm]:
        axis, levels = item
        if axis in _RESERVED_AXES:
            raise ctx.error(f"ablations.{axis}", f"{axis!r} cannot name an ablation axis: the reports read the arms "
                            f"'{axis}=<level>' as {_RESERVED_AXES[axis]}; name the axis otherwise (e.g. after the key "
                            f"it changes)")
        return [_Arm(f"{axis}={label}", axis, settings)
                for label, settings in _parse_levels(ctx, axis, levels, f"ablations.{axis}")]

    return [arm for arms in _each(check, ablations.items()) for arm in arms]  # (each axis's problems: said together)


def _parse_levels(ctx: _Context, axis: str, levels: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """An axis's levels as (label, settings): a list of values of the config key ``axis``, or a
    mapping of named levels to settings."""
    if not _LABEL_RE.fullmatch(axis):
        raise ctx.error(path, f"axis names must match {_LABEL_RE.pattern} (they become arm names)")
    if isinstance(levels, dict) and levels:
        def named(item: tuple[Any, Any]) -> tuple[str, dict[str, Any]]:
            label, settings = item
            if not _LABEL_RE.fullmatch(label):
                raise ctx.error(f"{path}.{label}", f"level names must match {_LABEL_RE.pattern} (they become arm names)")
            return label, _check_settings(ctx, settings, f"{path}.{label}", ctx.tasks)

        return _each(named, levels.items())  # (each level's problems: said together)
    if not isinstance(levels, list) or not levels:
        raise ctx.error(
            path, f"must be a non-empty list of values or a mapping {{level_name: {{key: value}}}}; got {_short(levels)}"
        )
    if axis not in COMMON_FIELDS and not any(axis in task_fields(t) for t in ctx.tasks):
        raise ctx.error(
            path,
            f"{axis!r} is not a config key{did_you_mean(axis, _known_keys(ctx.tasks))}, so its levels must be named: "
            f"{axis}: {{level_name: {{key: value, ...}}, ...}}",
        )
    labelled: list[tuple[str, dict[str, Any]]] = []

    def level(item: tuple[int, Any]) -> None:
        i, value = item
        _check_value(ctx, axis, value, f"{path}[{i}]", ctx.tasks)
        label = _label(value)
        if value in levels[:i] or label in dict(labelled):
            raise ctx.error(f"{path}[{i}]", f"level {label} is given twice")
        labelled.append((label, {axis: value}))

    _each(level, enumerate(levels))  # (each level's problem: said together)
    return labelled


def _parse_factorial(ctx: _Context, factorial: Any) -> list[_Arm]:
    """The cells of a full or fractional factorial design, each an arm on top of the baseline."""
    if factorial is None:
        return []
    if not isinstance(factorial, dict):
        raise ctx.error(
            "factorial", f"must be a mapping with axes: (and optionally fraction: or generators:); got {_short(factorial)}"
        )
    _check_keys(factorial, FACTORIAL_KEYS, lambda key: ctx.where(_join("factorial", key)), ("axes",))
    axes = factorial["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ctx.error("factorial.axes", f"must be a non-empty mapping {{axis: levels}}; got {_short(axes)}")
    parsed = _each(lambda item: (item[0], _parse_levels(ctx, item[0], item[1], f"factorial.axes.{item[0]}")),
                   axes.items())  # (each axis's problems: said together)
    _check_independent(ctx, parsed)
    rows = _design(ctx, [(axis, len(levels)) for axis, levels in parsed], factorial.get("fraction"), factorial.get("generators"))
    arms = []
    for row in rows:
        cell = [(axis, levels[i]) for (axis, levels), i in zip(parsed, row)]
        name = "factorial:" + ",".join(f"{axis}={label}" for axis, (label, _) in cell)
        arms.append(_Arm(name, "factorial", {k: v for _, (_, settings) in cell for k, v in settings.items()}))
    return arms


def _check_independent(ctx: _Context, parsed: list[tuple[str, list[tuple[str, dict]]]]) -> None:
    """Two factorial axes must not set the same key (or the two meta-update frequency keys)."""
    owner: dict[str, str] = {}
    for axis, levels in parsed:
        keys = with_alternatives(k for _, settings in levels for k in settings)
        for key in sorted(keys):
            if owner.setdefault(key, axis) != axis:
                raise ctx.error(
                    f"factorial.axes.{axis}",
                    f"sets {key!r}, as axis {owner[key]!r} does; the axes of a design must be independent",
                )


# -- settings -------------------------------------------------------------------------------


def _check_settings(ctx: _Context, settings: Any, path: str, tasks: list[str], *, adamw: bool = False) -> dict[str, Any]:
    """Validate a mapping of trial-config settings that applies to ``tasks``; null means {}."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ctx.error(path, f"must be a mapping of config keys to values, e.g. {{epochs: 3}}; got {_short(settings)}")
    _each(lambda item: _check_value(ctx, item[0], item[1], f"{path}.{item[0]}", tasks, adamw=adamw),
          settings.items())  # (each key's problem: said together)
    for task in tasks:  # contradictions within the mapping, against each task's defaults
        resolve_config({"task": task, "data": ctx.data, **settings}, where=f"{ctx.where(path)} (task {task})",
                       cross_keys=False)  # (another layer may set the other key: the trials' configs check them)
    return dict(settings)


def _budget_defaults(budget: Any, tasks: list[str]) -> Any:
    """``budget:`` less its keys set to null that no trial takes null for (``epochs: null``): those take the task's
    default, as a key set to null does; a null a key takes (``max_steps: null``: no step budget; a task key null
    in a default of a task) is kept, and so is a key that is refused here whatever its value."""
    from ablate.tasks import get_task

    if not isinstance(budget, dict):
        return budget

    def default_taken(key: Any) -> bool:
        if key in _RESERVED:
            return False
        if key in COMMON_FIELDS:
            return not COMMON_FIELDS[key].nullable
        specs = [get_task(t) for t in tasks]
        return bool(specs) and all(key in task_fields(s.name) and all(
            d[key] is not None for d in (s.defaults, s.embedded_defaults) if key in d) for s in specs)

    return {k: v for k, v in budget.items() if v is not None or not default_taken(k)}


def _check_value(ctx: _Context, key: str, value: Any, path: str, tasks: list[str], *, adamw: bool = False) -> None:
    """Validate one setting: a common key against its field, a task key against every task."""
    if key in _RESERVED:
        raise ctx.error(path, f"{key} cannot be set here; {_RESERVED[key]}")
    if adamw and key in METAADAMW_KEYS:
        raise ctx.error(
            path, f"{key} is a MetaAdamW setting, which the AdamW arm does not use; set it in baseline: or an ablation"
        )
    if key in COMMON_FIELDS:
        validate_value(key, value, ctx.where(path))
    else:
        _check_task_key(ctx, key, path, tasks)
    for task in tasks:  # the value against each task's defaults (a task key's type and range)
        resolve_config({"task": task, "data": ctx.data, key: value}, where=f"{ctx.where(path)} (task {task})",
                       cross_keys=False)


def _check_task_key(ctx: _Context, key: str, path: str, tasks: list[str]) -> None:
    """A key that is not a common key must be a key of every task the setting applies to."""
    owners = [t for t in tasks if key in task_fields(t)]
    if not owners:
        task_keys = "; ".join(f"keys of task {t}: {', '.join(sorted(task_fields(t))) or '(none)'}" for t in tasks)
        raise ctx.error(
            path,
            f"unknown config key {key!r}{did_you_mean(key, _known_keys(tasks))}. Common keys: "
            f"{', '.join(k for k in COMMON_FIELDS if k not in _RESERVED)}; {task_keys}",
        )
    if len(owners) < len(tasks):
        # (an override sets the key on every arm of its task, the baseline and AdamW included: no ablation of it)
        fix = (f"to ablate it, run the axis in a study of {', '.join(owners)} only (under overrides.<task> it would "
               f"change every arm of the task, the baseline included)" if path.startswith(("ablations.", "factorial."))
               else "set it under overrides.<task> instead")
        raise ctx.error(
            path,
            f"{key!r} is a key of task(s) {', '.join(owners)} only, but this applies to {', '.join(tasks)}; {fix}",
        )


def _known_keys(tasks: list[str]) -> list[str]:
    return [*(k for k in COMMON_FIELDS if k not in _RESERVED), *sorted({k for t in tasks for k in task_fields(t)})]


def _apply(config: dict[str, Any], layer: dict[str, Any]) -> None:
    """Put one settings layer on top of ``config`` (a frequency key replaces its alternative)."""
    for key, value in layer.items():
        if key in ALTERNATIVE_KEYS and value is not None:
            config.pop(ALTERNATIVE_KEYS[key], None)
        config[key] = value


def _layers(ctx: _Context, arm: _Arm, task: str) -> list[dict[str, Any]]:
    """The settings layers of one arm's trial on one task, lowest first."""
    if arm.adamw:
        layers = [ctx.budget, {"optimizer": "adamw", **arm.settings}, ctx.adamw_tuned.get(task, {}),
                  ctx.overrides.get(task, {})]
        return [{k: v for k, v in layer.items() if k not in METAADAMW_KEYS} for layer in layers]
    return [ctx.budget, ctx.baseline, ctx.tuned.get(task, {}), ctx.overrides.get(task, {}), arm.settings]


# -- expansion ------------------------------------------------------------------------------


def _expand(ctx: _Context, arms: list[_Arm], seeds: list[int]) -> list[TrialSpec]:
    """Tasks x seeds x arms, arms that resolve to the same trial merged into one trial."""
    trials = []
    for task in ctx.tasks:
        groups = _resolve_arms(ctx, arms, task, seeds[0])
        for seed in seeds:
            for resolved, group in groups:
                config = json.loads(json.dumps({**resolved, "seed": seed}))  # a private, JSON-safe copy
                names = [arm.name for arm in group]
                trials.append(TrialSpec(trial_id(config), task, seed, names[0], names, group[0].axis, config))
    return trials


def _resolve_arms(ctx: _Context, arms: list[_Arm], task: str, seed: int) -> list[tuple[dict[str, Any], list[_Arm]]]:
    """Each distinct resolved config of ``task`` with the arms that produce it, in arm order.
    (The seed is part of every config alike, so arms that merge for one seed merge for all.)"""
    groups: dict[str, tuple[dict[str, Any], list[_Arm]]] = {}
    for arm in arms:
        config: dict[str, Any] = {"task": task, "data": ctx.data, "seed": seed}
        if ctx.data_dir:
            config["data_dir"] = ctx.data_dir
        for layer in _layers(ctx, arm, task):
            _apply(config, layer)
        resolved = resolve_config(config, where=f"{ctx.source}: arm {arm.name!r} on task {task!r}")
        groups.setdefault(trial_id(resolved), (resolved, []))[1].append(arm)
    return list(groups.values())


# -- factorial designs ----------------------------------------------------------------------


def _design(ctx: _Context, axes: list[tuple[str, int]], fraction: Any, generators: Any) -> list[tuple[int, ...]]:
    """The design's rows, each a tuple of level indices in axis order."""
    if fraction is None and generators is None:
        cells = math.prod(n for _, n in axes)
        if cells > MAX_TRIALS:
            raise ctx.error("factorial.axes", f"the full grid has {cells} cells, more than {MAX_TRIALS}; use a fraction")
        return list(itertools.product(*(range(n) for _, n in axes)))
    if fraction is not None and generators is not None:
        raise ctx.error("factorial", "give fraction: or generators:, not both")
    not_two = [f"{axis} ({n} levels)" for axis, n in axes if n != 2]
    if not_two:
        raise ctx.error(
            "factorial.fraction" if generators is None else "factorial.generators",
            f"a fractional design needs every axis to have exactly two levels; not so: {', '.join(not_two)}",
        )
    if len(axes) > len(_LETTERS):
        raise ctx.error("factorial.axes", f"a fractional design takes at most {len(_LETTERS)} axes, got {len(axes)}")
    names = [axis for axis, _ in axes]
    if generators is None:
        gens = _auto_generators(ctx, len(names), _parse_fraction(ctx, fraction, len(names)))
    else:
        gens = _parse_generators(ctx, generators, names)
    return _fractional_rows(len(names), gens)


def _parse_fraction(ctx: _Context, fraction: Any, k: int) -> int:
    """``fraction: 2**p`` -> p."""
    if not _is_int(fraction) or fraction < 2 or fraction & (fraction - 1):
        raise ctx.error(
            "factorial.fraction",
            f"must be null (the full grid) or a power of two 2, 4, 8, ... (run 1/fraction of the grid); got {_short(fraction)}",
        )
    p = fraction.bit_length() - 1
    largest = max((q for q in range(k) if 2 ** (k - q) >= k + 1), default=0)
    if p > largest:
        raise ctx.error(
            "factorial.fraction",
            f"{fraction} is too small a fraction for {k} two-level axes: some main effects would be confounded with "
            f"each other; the largest fraction is {2 ** largest if largest else 'none (use the full grid)'}",
        )
    return p


def _parse_generators(ctx: _Context, generators: Any, names: list[str]) -> list[tuple[int, int, int]]:
    """Generators like 'C=AB' or 'D=-ABC' -> (generated axis index, word bitmask, sign)."""
    letters = ", ".join(f"{_LETTERS[i]}={name}" for i, name in enumerate(names))
    if not isinstance(generators, list) or not generators:
        raise ctx.error("factorial.generators", f"must be a non-empty list like ['C=AB'] ({letters}); got {_short(generators)}")
    gens = []
    for i, text in enumerate(generators):
        path = f"factorial.generators[{i}]"
        match = _GENERATOR_RE.fullmatch(text.replace(" ", "")) if isinstance(text, str) else None
        if match is None:
            raise ctx.error(
                path, f"{_short(text)} is not a generator like 'C=AB' or 'C=-AB' (an axis = a product of other axes; {letters})"
            )
        lhs, sign, rhs = match.groups()
        for letter in lhs + rhs:
            if _LETTERS.index(letter) >= len(names):
                raise ctx.error(path, f"letter {letter} names no axis; the axes are {letters}")
        if len(set(rhs)) != len(rhs) or len(rhs) < 2 or lhs in rhs:
            raise ctx.error(
                path, f"{text!r}: the right-hand side needs two or more distinct letters other than {lhs} ({letters})"
            )
        gens.append((_LETTERS.index(lhs), sum(1 << _LETTERS.index(c) for c in rhs), -1 if sign else 1))
    generated = [g for g, _, _ in gens]
    for i, (g, word, _) in enumerate(gens):
        path = f"factorial.generators[{i}]"
        if g in generated[:i]:
            raise ctx.error(path, f"axis {_LETTERS[g]} is generated twice")
        if any(word >> other & 1 for other in generated):
            raise ctx.error(path, f"the right-hand side may only use axes that no generator defines ({letters})")
        if word in [w for _, w, _ in gens[:i]]:
            raise ctx.error(path, "two generators share a right-hand side, which confounds their axes with each other")
    return gens


def _auto_generators(ctx: _Context, k: int, p: int) -> list[tuple[int, int, int]]:
    """Generators of a 2^(k-p) design of maximum resolution (then fewest shortest words): the
    last p axes are products of the first k-p, chosen by exhaustive search."""
    base = k - p
    candidates = sorted((w for w in range(1, 1 << base) if w.bit_count() >= 2), key=lambda w: (-w.bit_count(), w))
    if math.comb(len(candidates), p) > MAX_GENERATOR_SEARCH:
        raise ctx.error(
            "factorial.fraction",
            f"too many axes for an automatic search; give generators: explicitly ({FACTORIAL_KEYS['generators']})",
        )
    best = max(itertools.combinations(candidates, p), key=lambda words: _aberration_score(words, base))
    return [(base + j, word, 1) for j, word in enumerate(best)]


def _aberration_score(words: tuple[int, ...], base: int) -> tuple[int, int]:
    """(resolution, -number of words of that length) of the defining relation of generators
    ``words`` (bitmasks over the base axes) for the axes base, base+1, ..."""
    full = [word | 1 << (base + j) for j, word in enumerate(words)]
    lengths = []
    for r in range(1, len(full) + 1):
        for subset in itertools.combinations(full, r):
            product = 0
            for word in subset:
                product ^= word
            lengths.append(product.bit_count())
    resolution = min(lengths)
    return resolution, -lengths.count(resolution)


def _fractional_rows(k: int, gens: list[tuple[int, int, int]]) -> list[tuple[int, ...]]:
    """The full grid of the base axes, each generated axis set to sign x product of its word
    (levels coded -1 / +1 for the first / second level)."""
    generated = {g for g, _, _ in gens}
    base = [i for i in range(k) if i not in generated]
    rows = []
    for levels in itertools.product((0, 1), repeat=len(base)):
        row = [0] * k
        for i, level in zip(base, levels):
            row[i] = level
        for g, word, sign in gens:
            code = sign * math.prod(1 if row[i] else -1 for i in range(k) if word >> i & 1)
            row[g] = int(code > 0)
        rows.append(tuple(row))
    return rows


# -- formatting -----------------------------------------------------------------------------


def _differences(config: dict[str, Any], baseline: dict[str, Any]) -> str:
    """``key=value`` for every identity setting (bar the seed) that differs from the baseline."""
    ident, ref = identity_config(config), identity_config(baseline)
    changed = [f"{k}={_label(v)}" for k, v in ident.items() if k != "seed" and ref.get(k, object()) != v]
    return " ".join(changed) or "-"


def _summary(study: Study) -> list[str]:
    """Trials per arm and task (a trial that serves several merged arms counts in each), then the
    merged arms per task."""
    rows = [["arm", *study.tasks, "total"]]
    for arm in study.arms():
        counts = [sum(arm in t.arms and t.task == task for t in study.trials) for task in study.tasks]
        if any(counts):
            rows.append([arm, *map(str, counts), str(sum(counts))])
    lines = [f"trials per arm and task ({len(study.tasks)} tasks x {len(study.seeds)} seeds):", *_table(rows)]
    merged_any = False
    for task in study.tasks:
        merged = {" = ".join(t.arms) for t in study.trials if t.task == task and len(t.arms) > 1}
        if merged:
            merged_any = True
            lines.append(f"merged on {task} (same trial): {'; '.join(sorted(merged))}")
    if merged_any:
        lines.append(f"(a merged trial counts in each of its arms above: {len(study.trials)} distinct trials)")
    return lines


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


# -- small helpers --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _label(value: Any) -> str:
    """How a level value appears in an arm name: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holds_module(directory: Path, name: str) -> bool:
    """Whether ``directory`` holds module or package ``name`` (a folder without ``__init__.py``
    is a namespace package, which imports as well)."""
    return (directory / f"{name}.py").is_file() or (directory / name).is_dir()
