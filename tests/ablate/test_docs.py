"""The YAML examples of search_spaces/README.md parse as the format reference says they do."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ablate.study import parse_study
from ablate.tune import parse_tune_spec

DOC = Path(__file__).resolve().parents[2] / "search_spaces" / "README.md"


def _yaml_blocks() -> list:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4, "search_spaces/README.md's YAML examples changed: update this test"
    return [yaml.safe_load(b) for b in blocks]


def test_the_complete_example_is_a_valid_study(tmp_path):
    example = _yaml_blocks()[0]
    (tmp_path / "my_features.py").write_text("# the example's plugin module\n")
    study = parse_study(example, "README example", base_dir=tmp_path)
    assert study.name == "my_study" and sorted({t.task for t in study.trials}) == ["etth1", "imdb"]
    assert sorted({t.seed for t in study.trials}) == [0, 1, 2]
    arms = study.arms()
    for arm in ("baseline", "adamw", "grouping=original", "features=basic_plus", "features=enhanced",
                "weighting=none", "weighting=huw_priority_111", "modulator_size=small", "modulator_size=large"):
        assert arm in arms, (arm, arms)
    assert sum(a.startswith("factorial") or "gating=" in a for a in arms) == 4, arms  # the 2 x 2 grid


def test_the_factorial_example_has_eight_cells():
    factorial = _yaml_blocks()[1]
    study = parse_study({"name": "f", "tasks": ["etth1"], "seeds": 1, **factorial}, "README factorial example")
    cells = [a for a in study.arms() if a not in ("baseline", "adamw")]
    assert len(cells) == 8, cells


def test_the_tune_example_shows_the_defaults():
    tune = _yaml_blocks()[2]
    shown = parse_tune_spec({"name": "t", "tasks": ["etth1"], "seeds": 1, **tune}, "README tune example").settings
    assert shown.trials == 20 and shown.sampler == "tpe" and shown.max_concurrent == 2
    defaults = parse_tune_spec({"name": "t", "tasks": ["etth1"], "seeds": 1, "tune": {}}, "defaults").settings
    for key in ("trials", "sampler", "sampler_seed", "aggregate", "cross_task", "max_concurrent", "enqueue_baseline",
                "storage", "priorities"):
        assert getattr(shown, key) == getattr(defaults, key), key  # "the values shown are the defaults"
    # "except params, which defaults to {}, and the scheduler's grace_period" (warmup_epochs + 1)
    assert shown.params and not defaults.params
    assert {**shown.scheduler, "grace_period": None} == defaults.scheduler and defaults.scheduler["grace_period"] is None


def _code_block_lines(text: str) -> list[str]:
    """The lines inside the fenced code blocks of a Markdown text."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def _documented_commands() -> list[str]:
    """The `ablate ...` command lines in the code blocks of the two READMEs (the commands meant to
    be run as written; inline mentions in prose are names, and synopses with placeholders such as
    SPEC or [--trials N] are not commands)."""
    readme = DOC.parent.parent / "README.md"
    commands = []
    for text in (readme.read_text(), DOC.read_text()):
        for line in _code_block_lines(text):
            line = line.split("#")[0].strip()
            if line.startswith("ablate ") and not re.search(r"\b[A-Z]{2,}\b|\[-|\.\.\.|<", line):
                commands.append(line)
    return sorted(set(commands))


def test_every_documented_ablate_command_line_parses():
    import shlex

    from ablate.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 5, commands
    parser = build_parser()
    for command in commands:
        args = shlex.split(command)[1:]
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"the documented command does not parse: {command}") from exc


def test_the_shipped_study_files_state_the_k_meta_the_tasks_have():
    # quick.yaml and tune_priorities.yaml once said the tasks' K_meta would never trigger a
    # meta-update on their budgets; on embedded data it gives about two per epoch (quick) and one or
    # two (tune_priorities' 20 batches): the comments name the values, checked here against the tasks
    from ablate.config import resolve_config

    def meta_every(task: str, data: str) -> int:
        return resolve_config({"task": task, "data": data})["meta_every"]

    quick = (DOC.parent / "quick.yaml").read_text()
    real_etth1 = re.search(r"K_meta \((\d+) steps on\s+# ETTh1's real data, which an embedded epoch of (\d+) steps",
                           quick)
    assert real_etth1, "quick.yaml's comment on K_meta changed: update this test"
    assert int(real_etth1[1]) == meta_every("etth1", "real") > int(real_etth1[2]) == 2 * meta_every("etth1", "embedded")
    tune = (DOC.parent / "tune_priorities.yaml").read_text()
    embedded = re.search(r"embedded K_meta \((\d+) steps on etth1, (\d+) on wikitext2\)", tune)
    assert embedded, "tune_priorities.yaml's comment on K_meta changed: update this test"
    assert (int(embedded[1]), int(embedded[2])) == (meta_every("etth1", "embedded"), meta_every("wikitext2", "embedded"))
    batches = yaml.safe_load(tune)["budget"]["max_train_batches"]
    assert all(batches // k in (1, 2) for k in (int(embedded[1]), int(embedded[2])))  # "one or two per epoch"


def test_quick_yaml_counts_its_trials_as_the_parser_does():
    from ablate.study import load_study

    study = load_study(DOC.parent / "quick.yaml")
    count = re.search(r"(\d+) tasks x (\d+) seeds x (\d+) arms = (\d+) trials", (DOC.parent / "quick.yaml").read_text())
    assert count, "quick.yaml's trial count changed: update this test"
    tasks, seeds, arms, total = map(int, count.groups())
    assert (tasks, seeds, arms) == (len(study.tasks), len(study.seeds), len(study.arms()))
    assert total == tasks * seeds * arms >= len(study.trials)  # "fewer where an arm equals a task's baseline"


def test_factorial_yaml_s_commented_variants_work_when_uncommented_as_it_says(tmp_path):
    # factorial.yaml says to uncomment either of its commented lines (not both) for the half fraction;
    # with `fraction: null` left above them, uncommenting `# fraction: 2` made a duplicate key (invalid YAML)
    from ablate.study import load_study

    text = (DOC.parent / "factorial.yaml").read_text()
    assert "Uncomment\n# either line below (not both)" in text, "factorial.yaml's instructions changed: update this test"
    variants = re.findall(r"^  # ((?:fraction|generators): .*)$", text, flags=re.M)
    assert len(variants) == 2, "factorial.yaml's commented variants changed: update this test"
    for variant in variants:
        path = tmp_path / "factorial.yaml"
        path.write_text(text.replace(f"  # {variant}\n", f"  {variant}\n"))
        cells = [a for a in load_study(path).arms() if a.startswith("factorial:")]
        assert len(cells) == 4, (variant, cells)  # the 2^(3-1) half fraction
    full = [a for a in load_study(DOC.parent / "factorial.yaml").arms() if a.startswith("factorial:")]
    assert len(full) == 8  # as shipped: the full grid


def test_the_format_reference_says_what_best_adamw_yaml_records():
    # best_adamw.yaml's tuned_with records early stopping, the data and the task's own keys besides AdamW's
    # settings and the budget (a study that runs the AdamW arm with another model is warned); the format
    # reference once named AdamW's settings and the budget alone
    from ablate.config import resolve_config
    from ablate.study import tuning_context

    recorded = tuning_context(resolve_config({"task": "etth1", "optimizer": "adamw"}), "adamw", ["lr"])
    assert {"weight_decay", "epochs", "patience", "min_delta", "data", "d_model"} <= set(recorded)
    assert "lr" not in recorded  # "less the searched ones"
    said = re.search(r"`tuned_with` holds AdamW's (.*?)\),\n", DOC.read_text(), flags=re.S)
    assert said, "search_spaces/README.md's description of best_adamw.yaml changed: update this test"
    for words in ("the budget", "early stopping", "the data", "the task's own keys"):
        assert words in " ".join(said[1].split()), words
