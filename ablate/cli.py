"""The ``ablate`` command line.

    ablate list [--keys] [--task TASK] [--plugin MODULE]
                                               registered tasks and components, or TASK's trial config
                                               (and config keys)
    ablate train --task etth1 --optimizer metaadamw --set key=value [--plugin MODULE] ...   one trial
          [--checkpoint FILE] [--resume FILE] [--json] [--no-progress]
    ablate run SPEC [--dry-run [--list]] [--resume] [--rerun TASK|ARM|all] [--address ADDR] [--storage PATH] ...
                                               a study on Ray Tune
    ablate tune SPEC [--trials N] [--study-storage PATH|URL] [--address ADDR] [--storage PATH]
                                               Optuna search of the HUW priorities (tune.arm: adamw: AdamW's lr)
    ablate report RESULTS_DIR [--out DIR]      Markdown/HTML report with figures
    ablate data download TASK [--data-dir DIR] [--force]
                                               fetch a real dataset (needs the network)
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence, TextIO

import yaml


def _parse_value(text: str) -> Any:
    """A --set value: YAML scalars and lists (1e-3, true, [1, 2, 5], null), else the string; read as
    a study file is read (1e-3 is a number also inside a list: YAML 1.1 reads it as a string; 010 is
    10, not YAML 1.1's octal 8, and 1:30 a string, not its base-60 90; a quoted value, "1.5", stays a string)."""
    from ablate.study import _Loader

    try:
        value = yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, ValueError, OverflowError):  # (PyYAML raises ValueError for "\U01000000")
        return text
    if isinstance(value, str) and text.lstrip()[:1] not in ("'", '"', "!"):  # (plain .5e3: a number; "1.5", !!str: text)
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # (argparse said "invalid _positive_int value", naming this function)
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            print(f"ablate: error: --set expects key=value, got {item!r}", file=sys.stderr)
            raise SystemExit(2)
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:  # (it was reported as the unknown key '')
            print(f"ablate: error: --set expects key=value, got {item!r}, which has no key before the '='",
                  file=sys.stderr)
            raise SystemExit(2)
        if key in out:  # (as a study file refuses a duplicate key: the first value was silently dropped)
            first = next(i for i in items if "=" in i and i.split("=", 1)[0].strip() == key)
            print(f"ablate: error: --set {key} is given twice ({first.split('=', 1)[1].strip()!r}, then "
                  f"{value.strip()!r}): give each key once", file=sys.stderr)
            raise SystemExit(2)
        out[key] = _parse_value(value.strip())
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from ablate.config import describe_fields, describe_task_fields

    _import_cli_plugins(args)
    if args.task:
        _print_task_defaults(args.task)
    else:
        _print_registries()
    if args.keys and args.task:  # (its own keys, which the common keys' table below does not describe)
        print(f"\nkeys of task {args.task} (its model and data; ablate train --set KEY=VALUE, or in study files under "
              f"budget: or overrides.{args.task}:):")
        print(describe_task_fields(args.task))
    if args.keys:  # (with --task too: what each key of its config means)
        print("\ntrial-config keys (ablate train --set KEY=VALUE, or in study files):")
        print(describe_fields())
    return 0


def _print_registries() -> None:
    """``ablate list``: the registered tasks and components."""
    import metaadamw
    from ablate.tasks import TASKS

    print("tasks:")
    for name, spec in TASKS.items():
        metrics = ", ".join(f"{m.name} ({m.mode})" for m in spec.metrics)
        print(f"  {name:<10} {metrics:<32} {spec.description}")
    for title, reg in (("feature extractors", metaadamw.FEATURES), ("groupings", metaadamw.GROUPINGS),
                       ("meta objectives", metaadamw.OBJECTIVES), ("loss weightings", metaadamw.WEIGHTINGS)):
        print(f"{title}: {', '.join(reg.list())}")


def _print_task_defaults(task: str) -> None:
    """``ablate list --task TASK``: the task's trial config on the real data (its paper settings,
    Table 4) and on the embedded data, the values the task sets itself marked."""
    from ablate.config import COMMON_FIELDS, resolve_config
    from ablate.tasks import TASKS, get_task
    from metaadamw import UnknownComponentError

    try:
        spec = get_task(task)
    except UnknownComponentError as exc:
        if TASKS.entry_point_problem(task):  # (an installed package's broken entry point: the error says so)
            raise
        if task.lower() in {name.lower() for name in TASKS.list()}:  # ("ETTh1": a registered task's name, in other
            raise  # case - the error's did-you-mean names it -, as `ablate train` says; no plugin registers it)
        # (a plugin's task listed without --plugin: name the option, as `ablate train` and study files do)
        raise UnknownComponentError(f"{exc} A task a plugin registers: give --plugin MODULE (the module that "
                                    f"registers it, in the working directory or installed).") from None
    real, embedded = (resolve_config({"task": task, "data": data}) for data in ("real", "embedded"))
    metrics = ", ".join(f"{m.name} ({m.mode})" for m in spec.metrics)
    print(f"{task}: {spec.description}\nmetrics: {metrics} (the first is the primary one)\n")
    print("trial config (* = set by the task, not the common default; override in a study file or with --set):")
    keys = [k for k in real if k not in ("task", "data")]
    width = max(map(len, keys))
    print(f"    {'key':<{width}}  {'data: real':<24}  data: embedded")
    for key in keys:
        own = key not in COMMON_FIELDS or any(c[key] != COMMON_FIELDS[key].default for c in (real, embedded))
        print(f"  {'*' if own else ' '} {key:<{width}}  {real[key]!r:<24}  {embedded[key]!r}")


#: trial-config keys that ``ablate train`` takes as options of their own, not through --set
_TRAIN_FLAGS = {"task": "--task", "optimizer": "--optimizer", "seed": "--seed", "data": "--data",
                "data_dir": "--data-dir"}


def _import_cli_plugins(args: argparse.Namespace) -> None:
    """``--plugin MODULE``: import modules that register components or tasks (as a study file's
    ``plugins:`` list does), from the working directory or the installed packages."""
    if getattr(args, "plugin", None):
        from ablate.study import import_plugins

        import_plugins(args.plugin, os.getcwd(), source="command line", where="--plugin",
                       next_to="in the working directory")


def cmd_train(args: argparse.Namespace) -> int:
    if not args.json:
        return _train(args, sys.stdout)
    json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # (--json: stdout holds the result row alone, for | jq)
        return _train(args, json_out)


def _train(args: argparse.Namespace, json_out: TextIO) -> int:
    from ablate.config import ConfigError
    from ablate.trial import Trial

    _import_cli_plugins(args)

    config: dict[str, Any] = {"task": args.task, "optimizer": args.optimizer, "seed": args.seed}
    if args.data:
        config["data"] = args.data
    if args.data_dir:
        config["data_dir"] = args.data_dir
    sets = _parse_sets(args.set or [])
    flagged = sorted(k for k in sets if k in _TRAIN_FLAGS)
    if flagged:
        print(f"ablate: error: --set {flagged[0]}=... would silently replace {_TRAIN_FLAGS[flagged[0]]}: give "
              f"{_TRAIN_FLAGS[flagged[0]]} instead", file=sys.stderr)
        return 2
    if args.optimizer == "adamw":  # as a study's adamw: arm refuses them, rather than ignoring them
        from ablate.config import METAADAMW_KEYS

        unused = sorted(k for k in sets if k in METAADAMW_KEYS)
        if unused:
            print(f"ablate: error: --set {', '.join(unused)}: MetaAdamW setting(s), which --optimizer adamw does not "
                  f"use; drop them, or train with --optimizer metaadamw", file=sys.stderr)
            return 2
    config.update(sets)
    if args.resume and not Path(args.resume).is_file():
        print(f"ablate: error: --resume {args.resume}: no such file (give the file --checkpoint wrote)", file=sys.stderr)
        return 2
    if args.checkpoint:  # refused now, not after the first epoch's training
        target = Path(args.checkpoint)
        if target.is_dir():
            print(f"ablate: error: --checkpoint {target} is a directory; give a file path, e.g. {target / 'trial.pt'}",
                  file=sys.stderr)
            return 2
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"ablate: error: --checkpoint {target}: cannot create its folder ({exc.strerror or exc})",
                  file=sys.stderr)
            return 2
        try:  # (a real write: os.access says yes to root on read-only mounts and on /proc)
            tempfile.TemporaryFile(dir=target.parent).close()
        except OSError as exc:
            print(f"ablate: error: --checkpoint {target}: cannot write in its folder {target.parent} (creating a file "
                  f"there failed: {exc.strerror or exc})", file=sys.stderr)
            return 2
    trial = Trial(config)
    cfg = trial.config
    print(f"trial {trial.trial_id}: task={cfg['task']} data={trial.task.data_source} optimizer={cfg['optimizer']} "
          f"seed={cfg['seed']} epochs<={cfg['epochs']} steps/epoch={trial.steps_per_epoch}"
          + (f" meta-update every {trial.meta_every} steps after {cfg['warmup_epochs']} warm-up epoch(s)"
             if trial.is_meta else ""))
    if trial.is_meta:
        print(f"  {trial.optimizer!r}")
        if cfg["epochs"] <= cfg["warmup_epochs"]:
            print(f"note: epochs={cfg['epochs']} <= warmup_epochs={cfg['warmup_epochs']}: this run makes no meta-update, so "
                  f"the modulator stays as initialised (raise epochs, or --set warmup_epochs=0)", flush=True)
        elif trial.planned_meta_updates() == 0:
            print(f"note: the budget ends before the first meta-update (warm-up epochs {cfg['warmup_epochs']}, then "
                  + (f"{cfg['meta_per_epoch']:g} per epoch" if trial.meta_in_epoch else f"one every {trial.meta_every} "
                     f"steps of the run") + f"; {trial.steps_per_epoch} steps per epoch): the modulator stays as "
                  f"initialised (raise epochs or max_train_batches, or lower warmup_epochs or meta_every)", flush=True)
    metric = trial.metric.name

    def show(row: dict, _trial) -> None:
        vals = " ".join(f"{k[4:]}={v:.6g}" for k, v in row.items() if k.startswith("val_"))
        print(f"epoch {row['epoch']:>3}  step {row['step']:>6}  train_loss={row['train_loss']:.6g}  {vals}  "
              f"({row['time_train_s']:.1f}s train, {row['time_meta_s']:.1f}s meta, {row['time_eval_s']:.1f}s eval)",
              flush=True)
        if args.checkpoint:
            try:
                _trial.save(args.checkpoint)
            except OSError as exc:
                raise ConfigError(f"--checkpoint {args.checkpoint}: writing the checkpoint of epoch {row['epoch']} "
                                  f"failed ({exc.strerror or exc})") from exc
            args.checkpoint_written = True  # (Ctrl-C: this run's epoch is in it, not an earlier run's)

    if args.resume:
        trial.load(args.resume)
    # the bar only on a terminal: elsewhere (a file, a pipe, a batch job's log) its redraws are
    # carriage returns, one per step, and the per-epoch lines say it all
    result = trial.run(callback=show, progress=not args.no_progress and _is_terminal(sys.stderr))
    row = result.row
    print(f"\nstatus: {row['status']} ({row['stop_reason']})  best {metric}: {row['best_metric']:.6g} at epoch "
          f"{row['best_epoch']}  epochs: {row['epochs_run']}  steps: {row['steps']}  total time: "
          f"{row['time_total_s']:.1f}s (meta-updates {row['time_meta_s']:.1f}s, {row['meta_updates']} of them)")
    if row.get("error"):
        print(f"error: {row['error']}")
    refs = {k: v for k, v in row.items() if k.startswith("ref_") and not k.startswith("ref_test_")}
    if refs:
        print("trivial reference: " + ", ".join(f"{k[4:]}={v:.6g}" for k, v in refs.items()))
    tests = {k[len("test_"):]: v for k, v in row.items() if k.startswith("test_")}
    test_refs = {k[len("ref_test_"):]: v for k, v in row.items() if k.startswith("ref_test_")}
    if tests:
        print("test split (best weights): " + ", ".join(f"{k}={v:.6g}" for k, v in tests.items())
              + ("; trivial reference: " + ", ".join(f"{k}={v:.6g}" for k, v in test_refs.items()) if test_refs else ""))
    if args.json:
        # strict JSON: a diverged trial's NaN metrics are null, as in the sweep's results; lists
        # (priorities, blocks) and dicts as they are
        print(json.dumps({k: _json_value(v) for k, v in row.items()}, default=str, allow_nan=False), file=json_out,
              flush=True)
    return 0 if row["status"] == "ok" else 1


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` (where tqdm draws: stderr) is a terminal; a stream without ``isatty``, or closed, is not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _json_value(value: Any) -> Any:
    """``value`` with every non-finite float (nested too) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def cmd_data(args: argparse.Namespace) -> int:
    from ablate.data import download

    for path in download(args.task, args.data_dir, force=args.force):
        print(f"ready: {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ablate.sweep import run_command

    return run_command(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from ablate.tune import tune_command

    return tune_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from ablate.report import report_command

    report_command(args.results_dir, args.out)  # prints its progress and the report's path
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablate", description="MetaAdamW ablation studies on Ray Tune.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="registered tasks and components")
    s.add_argument("--keys", action="store_true", help="also list every trial-config key (with --task: the task's own keys too)")
    s.add_argument("--task", help="instead: TASK's trial config (its paper settings on real data, and on the "
                                  "embedded data)")
    s.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import a module that registers components or tasks first (repeatable)")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("train", help="run one trial and print its metrics")
    s.add_argument("--task", required=True, help="the task to train (`ablate list` shows them)")
    s.add_argument("--optimizer", default="metaadamw", choices=["adamw", "metaadamw"],
                   help="default: metaadamw (adamw: the reference, with the same lr, weight decay and betas)")
    s.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and dropout (default: 0)")
    s.add_argument("--data", choices=["embedded", "real"], help="embedded (default) or real")
    s.add_argument("--data-dir", help="directory of the real dataset (else $ABLATE_DATA_DIR)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any trial-config key (repeatable, each key once)")
    s.add_argument("--checkpoint", help="save a checkpoint to this file after every epoch")
    s.add_argument("--resume", help="resume from a checkpoint file")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn only where stderr is a terminal, not into a file or a pipe)")
    s.add_argument("--json", action="store_true",
                   help="print the result row as JSON at the end, alone on stdout (the progress goes to stderr)")
    s.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import a module that registers components or tasks first, as a study file's plugins: "
                        "list does (repeatable; modules in the working directory are found)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("run", help="run a study file on Ray Tune")
    s.add_argument("spec")
    s.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    s.add_argument("--list", action="store_true",
                   help="with --dry-run: one line per trial also in studies of more than 500 trials (else the "
                        "counts per arm and task only)")
    s.add_argument("--resume", action="store_true",
                   help="also continue unfinished trials from their last per-epoch checkpoint (finished trials "
                        "are reused either way)")
    s.add_argument("--out", default="results", help="parent directory of the study's results (default: results)")
    s.add_argument("--address", help="join a running Ray cluster (e.g. 127.0.0.1:6379, or auto: the one $RAY_ADDRESS "
                                     "names, else the one started on this machine); without it, Ray starts here")
    s.add_argument("--storage", help="Ray Tune storage path or URI shared by every node")
    s.add_argument("--max-concurrent", type=_positive_int, help="at most this many trials at once (>= 1)")
    s.add_argument("--extra-seeds", type=_positive_int, help="add N more seeds to the study")
    s.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished trial's checkpoint (model, optimizer, best weights) in "
                        "OUT/<study name>/checkpoints/, and Ray's copies of them (default: a trial's is deleted once "
                        "its results are stored, Ray's in OUT/<study name>/ray/ or in a local --storage path once "
                        "every trial is recorded)")
    s.add_argument("--rerun", action="append", metavar="TASK|ARM|all",
                   help="run these stored trials again (repeatable: a task, an arm, or all), e.g. after a fix to "
                        "a plugin or to ablate itself: stored trials are reused by their configuration, which does "
                        "not see code. Their current results are copied to OUT/<study name>/replaced/ first; a run "
                        "cut off is continued by any later `ablate run` of the study")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("tune", help="Optuna search of the uncertainty-weighting priorities (or, with tune: {arm: "
                                    "adamw} in SPEC, of AdamW's own settings)")
    s.add_argument("spec")
    s.add_argument("--trials", type=int, help="suggestions to evaluate for each target, i.e. each task (or the one "
                                              "cross-task target); they add to its stored study")
    s.add_argument("--out", default="results", help="parent directory of the results (default: results)")
    s.add_argument("--address", help="join a running Ray cluster (as for `ablate run`)")
    s.add_argument("--storage", help="Ray Tune storage path or URI")
    s.add_argument("--study-storage", help="Optuna storage: a journal file path or a database URL")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("report", help="Markdown/HTML report with figures from stored results")
    s.add_argument("results_dir")
    s.add_argument("--out", help="output directory (default: RESULTS_DIR/report)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("data", help="datasets")
    # (not required=True: argparse then said "the following arguments are required: data_command", a name of its own)
    dsub = s.add_subparsers(dest="data_command")
    s.set_defaults(func=lambda args, data=s: data.error(
        f"say what to do with the datasets: {', '.join(dsub.choices)} (`ablate data download TASK` downloads TASK's "
        f"real dataset; `ablate data --help`)"))
    d = dsub.add_parser("download", help="download and verify a task's real dataset (needs the network)")
    d.add_argument("task")
    d.add_argument("--data-dir", help="where to put it (default: $ABLATE_DATA_DIR or ./data); the dataset's own "
                   "folder (e.g. data/ETT-small) is filled as it is, not given a folder of that name inside")
    d.add_argument("--force", action="store_true",
                   help="fetch every file again, over those in place (files the loader calls damaged)")
    d.set_defaults(func=cmd_data)
    return p


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"ablate: warning: {message}\n"


def _parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option (``ablate run SPEC --dry-rn``) is refused
    by the subcommand's parser, with its usage and the closest option it has: argparse refused it
    with the top-level usage, which lists no option of the subcommand, and no suggestion. An option
    the subcommand has, given before it (``ablate --dry-run run SPEC``) or after ``--``, is said to
    be misplaced, not "did you mean" itself (``ablate --out r run SPEC`` too: there the top-level
    parser took ``r`` for the subcommand, "invalid choice: 'r'", and said nothing of ``--out``)."""
    given = list(sys.argv[1:] if argv is None else argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    first = next((i for i, g in enumerate(given) if g in commands or g == "--"), len(given))
    before = given[:first] if first < len(given) and given[first] in commands else []
    if before and not {"-h", "--help"} & set(before):
        # the top-level parser has no option but -h: what stands before the subcommand is misplaced, and parsed as the
        # top-level's, an option's value became the subcommand: parsed from the subcommand on, and refused with it
        args, extra = parser.parse_known_args(given[first:])
        extra = before + extra
    else:
        args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = parser
    for dest in ("command", "data_command"):  # (`ablate data download`: two levels)
        action = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or getattr(args, dest, None) not in action.choices:
            break
        sub = action.choices[getattr(args, dest)]
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    unknown = [e.split("=", 1)[0] for e in extra if e.startswith("-") and e != "--"]
    after_separator = given[given.index("--") + 1:] if "--" in given else []
    # an option of the subcommand itself is unknown only where it stands: before the subcommand (the top-level parser's
    # place: `ablate --dry-run run SPEC`) or after "--" (an argument there): "did you mean --dry-run?" for --dry-run
    # would say nothing
    close = {u: ("after `--` it is an argument, not an option" if e in after_separator
                 else f"it is an option of `{sub.prog}`: give it after `{sub.prog}`") if u in options
             else f"did you mean {m[0]}?"
             for e, u in zip((e for e in extra if e.startswith("-") and e != "--"), unknown)
             if u in options or (m := difflib.get_close_matches(u, options, n=1))}
    hint = "; ".join(f"{'' if len(unknown) == 1 else u + ': '}{m}" for u, m in close.items())
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({hint})" if hint else "")
              + f" (`{sub.prog} --help` lists its options)")
    raise AssertionError("unreachable: ArgumentParser.error exits")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(build_parser(), argv)
    saved_format = warnings.formatwarning
    warnings.formatwarning = _warning_line  # one line, as the errors: no source file and line
    try:
        return args.func(args)
    except KeyboardInterrupt:
        checkpoint = getattr(args, "checkpoint", None) if args.func is cmd_train else None
        if checkpoint and not getattr(args, "checkpoint_written", False) and not (
                args.resume and Path(args.resume).resolve() == Path(checkpoint).resolve()):
            checkpoint = None  # (a file an earlier run left: this one finished no epoch to continue from)
        print("interrupted" + (f": the last finished epoch is in {checkpoint}; continue with the same command and "
                               f"--resume {checkpoint}" if checkpoint and Path(checkpoint).is_file() else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # user-facing errors: one clear line, no traceback
        from ablate.config import ConfigError
        from ablate.tasks import DatasetNotFoundError
        from metaadamw import UnknownComponentError

        from ablate.data import DownloadError
        from ablate.results import ResultsError

        if isinstance(exc, (NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)) and exc.filename:
            # a path the user gave (--out on a file, a read-only folder): one line, not a traceback
            hint = {NotADirectoryError: " (a file is in the way where a folder is needed)",
                    IsADirectoryError: " (a folder where a file is expected)"}.get(type(exc), "")
            print(f"ablate: error: {exc.strerror or exc}: {exc.filename}{hint}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            # (a full disk while the results are combined at the end, say: what is stored is kept)
            print(f"ablate: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''} (free space or "
                  f"make the folder writable, then run the same command again; what was stored before is kept)",
                  file=sys.stderr)
            return 2
        if isinstance(exc, (ConfigError, DatasetNotFoundError, UnknownComponentError, FileNotFoundError, DownloadError,
                            ResultsError)):
            said = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename and exc.strerror else exc
            for problem in getattr(exc, "problems", None) or [said]:  # (a study file's problems: one line each)
                print(f"ablate: error: {problem}", file=sys.stderr)
            return 2
        raise
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
