"""The flat trial config: defaults in order, validation messages, idempotent resolution, identity."""

from __future__ import annotations

import pytest
import yaml

from ablate.config import ConfigError, identity_config, resolve_config, task_fields, trial_id
from ablate.tasks import TASKS, get_task, register_task


@pytest.mark.parametrize("config", [
    {"task": "etth1"},
    {"task": "imdb", "meta_per_epoch": 2},
    {"task": "cifar10", "optimizer": "adamw", "lr": 1},
    {"task": "wikitext2", "data": "real", "data_dir": "/nowhere", "priorities": [3, 5, 1]},
])
def test_resolution_is_idempotent(config):
    once = resolve_config(config)
    assert resolve_config(once) == once
    assert trial_id(resolve_config(once)) == trial_id(once)


def test_defaults_come_from_common_then_task_then_embedded_then_user():
    spec = get_task("imdb")
    real = resolve_config({"task": "imdb", "data": "real"})
    assert real["meta_every"] == spec.defaults["meta_every"] == 39 and real["features"] == "basic_plus"
    assert real["lr"] == 5e-4 and real["beta2"] == 0.999  # common (paper Table 1)
    embedded = resolve_config({"task": "imdb"})
    for key, value in spec.embedded_defaults.items():
        assert embedded[key] == value
    assert resolve_config({"task": "imdb", "lr": 0.01})["lr"] == 0.01


def test_meta_per_epoch_replaces_meta_every():
    c = resolve_config({"task": "etth1", "meta_per_epoch": 2})
    assert c["meta_every"] is None and c["meta_per_epoch"] == 2.0
    with pytest.raises(ConfigError, match="both set the meta-update frequency"):
        resolve_config({"task": "etth1", "meta_per_epoch": 2, "meta_every": 5})


def test_the_keys_help_says_how_a_meta_per_epoch_that_is_not_whole_is_taken():
    # `ablate list --keys` said "that many in every epoch": meta_per_epoch 2.5 made 2 per epoch, and a user
    # who asked for 2.5 (or a search that suggested 2.7) could not know that 2, 2.5 and 2.7 run alike
    import warnings

    from ablate.config import COMMON_FIELDS, describe_fields
    from ablate.trial import Trial

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trials = {per: Trial({"task": "etth1", "meta_per_epoch": per, "epochs": 3, "warmup_epochs": 0,
                              "max_train_batches": 5, "modulator_layers": 1}) for per in (2, 2.5, 0.5)}
    assert [trials[per].planned_meta_updates() for per in (2, 2.5, 0.5)] == [6, 6, 1]  # 2 per epoch; one in 2 epochs
    doc = COMMON_FIELDS["meta_per_epoch"].doc
    assert "rounded down to a whole number (2.5: 2 per epoch)" in doc and "below 1, one every 1/this epochs" in doc
    assert doc in describe_fields()


def test_a_callers_meta_every_drops_a_tasks_meta_per_epoch_default(monkeypatch):
    # a task whose defaults set meta_per_epoch: the caller's meta_every was silently replaced by it
    # (and its trials had the id of the default's: ablations of meta_every were merged into one)
    from ablate.tasks import get_task

    monkeypatch.setitem(get_task("etth1").defaults, "meta_per_epoch", 2.0)
    default = resolve_config({"task": "etth1"})
    assert (default["meta_every"], default["meta_per_epoch"]) == (None, 2.0)
    mine = resolve_config({"task": "etth1", "meta_every": 5})
    assert (mine["meta_every"], mine["meta_per_epoch"]) == (5, None)
    assert resolve_config(mine) == mine and resolve_config(default) == default  # (idempotent)
    assert len({trial_id(c) for c in (default, mine, resolve_config({"task": "etth1", "meta_every": 20}))}) == 3


def test_equal_numbers_give_equal_ids_and_adamw_ignores_metaadamw_keys():
    assert trial_id(resolve_config({"task": "etth1", "lr": 1})) == trial_id(resolve_config({"task": "etth1", "lr": 1.0}))
    # so for a task's own float keys (two named levels dropout: 0 and dropout: 0.0 made two trials); the factory
    # gets the float its default is
    zero = resolve_config({"task": "etth1", "dropout": 0})
    assert trial_id(zero) == trial_id(resolve_config({"task": "etth1", "dropout": 0.0})) and type(zero["dropout"]) is float
    a = resolve_config({"task": "etth1", "optimizer": "adamw"})
    b = resolve_config({"task": "etth1", "optimizer": "adamw", "features": "enhanced"})
    assert trial_id(a) == trial_id(b) and "features" not in identity_config(a)
    assert trial_id(resolve_config({"task": "etth1", "device": "auto"})) == trial_id(resolve_config({"task": "etth1"}))


def test_every_key_that_shapes_the_result_is_in_the_trial_id_and_only_the_four_run_settings_are_not():
    # a key left out of the id would let `ablate run --resume` reuse a result computed with another value
    from ablate.config import METAADAMW_KEYS
    for optimizer in ("metaadamw", "adamw"):
        config = resolve_config({"task": "etth1", "optimizer": optimizer})
        ignored = {k for k in config if trial_id({**config, k: "<another value>"}) == trial_id(config)}
        expected = {"data_dir", "num_threads", "device", "cpu_malloc"}
        assert ignored == (expected | set(METAADAMW_KEYS) if optimizer == "adamw" else expected), optimizer


@pytest.mark.parametrize("config, fragment", [
    ({}, "'task' is required; choose one of:"),
    ({"task": "mnist"}, "task='mnist' is not allowed (a task a plugin registers: in a study file, list its module "
                        "under plugins:; with ablate train or ablate list, give --plugin MODULE); choose one of: cifar10"),
    ({"task": "etth1", "lrr": 0.1}, "unknown key(s) 'lrr' (did you mean 'lr'?)"),
    ({"task": "etth1", "device": "gpu"}, "device='gpu' is not allowed (did you mean 'cuda'?); choose one of: cpu, cuda, auto"),
    ({"task": "etth1", "max_epochs": 2, "sede": 1}, "unknown key(s) 'max_epochs' (did you mean 'epochs'?), 'sede' (did"),
    ({"task": "etth1", "grouping": "fine_graned"}, "grouping='fine_graned' is not allowed (did you mean 'fine_grained'?)"),
    ({"task": "cifar"}, "task='cifar' is not allowed (did you mean 'cifar10'?) (a task a plugin registers"),
    # (names as close as the closest are all suggested: 'etth' suggested 'etth2' alone)
    ({"task": "etth"}, "task='etth' is not allowed (did you mean 'etth1' or 'etth2'?) (a task a plugin registers"),
    ({"task": "etth1", "features": "my_feats"}, "features='my_feats' is not allowed (a feature extractor a plugin "
                                                "registers: in a study file, list its module under plugins:; with"),
    ({"task": "etth1", "weighting": "mine"}, "weighting='mine' is not allowed (a weighting a plugin registers: in"),
    ({"task": "etth1", "lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"task": "etth1", "epochs": 2.5}, "epochs must be an integer, got 2.5"),
    ({"task": "etth1", "seed": True}, "seed must be an integer"),
    ({"task": "etth1", "beta2": 1.0}, "beta2=1.0 must be in [0, 1)"),
    ({"task": "etth1", "alpha_range": 3.0}, "alpha_range=3.0 must be in [0, 2], so that the multiplier stays positive"),
    ({"task": "etth1", "beta_range": -0.5}, "beta_range=-0.5 must be in [0, 2]"),
    ({"task": "etth1", "features": "fancy"}, "give --plugin MODULE); choose one of: basic, basic_plus"),
    ({"task": "etth1", "priorities": [1, 2]}, "a list of three non-negative numbers"),
    ({"task": "etth1", "priorities": "1,2,3"}, "priorities must be a list, got '1,2,3' (write it as [1,2,3])"),
    # (the keys' help said "None: no clipping", and None is text in YAML and --set)
    ({"task": "etth1", "grad_clip": "None"}, "grad_clip must be a number, got 'None' (for none, write null: YAML and "
                                             "--set read None as text) (clip the gradient norm to this value (null: no "
                                             "clipping))"),
    ({"task": "etth1", "modulator_width": 7, "modulator_heads": 2}, "not a multiple of modulator_heads=2"),
    ({"task": "etth1", "data_dir": "/x"}, "data_dir is given but data='embedded'"),
    ({"task": "etth1", "d_model": "big"}, "d_model must be an integer, like 32 (task etth1), got 'big'"),
    # (a number out of float range, `lr: 1e999`, reads as inf: "must be a number, got inf" said it was not one)
    ({"task": "etth1", "lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"task": "etth1", "grad_clip": float("nan")}, "grad_clip must be a finite number, got nan"),
    ({"task": "etth1", "dropout": float("inf")}, "dropout must be a finite number, like 0.2 (task etth1), got inf"),
])
def test_bad_configs_name_the_key_and_the_fix(config, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_config(config)
    assert fragment in str(err.value)


@pytest.mark.parametrize("key", ["alpha_range", "beta_range"])
def test_the_ranges_a_config_accepts_are_those_metaadamw_accepts(key):
    import torch

    from ablate.optim import build_optimizer
    from metaadamw import MetaAdamW

    model = torch.nn.Linear(3, 2)
    for value in (0.0, 2.0):  # the edges: accepted by both
        opt = build_optimizer(resolve_config({"task": "etth1", key: value}), model, total_steps=10)
        assert isinstance(opt, MetaAdamW) and opt.config[key] == value
    for value in (-0.01, 2.01):  # refused by both
        with pytest.raises(ConfigError):
            resolve_config({"task": "etth1", key: value})
        with pytest.raises(ValueError, match=f"{key} must be a number in \\[0, 2\\]"):
            MetaAdamW(model.parameters(), grouping="original", **{key: value})


def test_a_weighting_of_ones_own_is_given_the_priorities_and_fixed_weights():
    # build_optimizer passed the priorities to huw_priority alone and the fixed weights to fixed alone:
    # a registered weighting always got (1, 1, 1), while the trial id (and a priority search) varied them
    import warnings

    import torch

    from ablate.optim import build_optimizer
    from metaadamw import WEIGHTINGS
    from metaadamw.weighting import Sum

    seen = []

    @WEIGHTINGS.register("test_own_weighting")
    class Own(Sum):  # (the sum's arithmetic, recording what it is given)
        def __init__(self, terms, signed_terms=(), *, priorities=None, weights=None, form="regression"):
            super().__init__(terms, signed_terms, form=form)
            seen.append((priorities, weights))

    model = torch.nn.Linear(3, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (nor a warning that they are ignored)
            build_optimizer(resolve_config({"task": "etth1", "weighting": "test_own_weighting", "priorities": [1, 3, 5],
                                            "fixed_weights": [2, 1, 1]}), model, total_steps=10)
            assert seen == [([1.0, 3.0, 5.0], [2.0, 1.0, 1.0])]
            for weighting in ("sum", "huw", "fixed", "huw_priority"):  # the built-ins get what they use, silently
                opt = build_optimizer(resolve_config({"task": "etth1", "weighting": weighting, "priorities": [1, 3, 5],
                                                      "fixed_weights": [2, 1, 1]}), model, total_steps=10)
                assert opt.config["priorities"] == ([1.0, 3.0, 5.0] if weighting == "huw_priority" else [1.0, 1.0, 1.0])
                assert opt.config["fixed_weights"] == ([2.0, 1.0, 1.0] if weighting == "fixed" else None)
    finally:
        WEIGHTINGS.remove("test_own_weighting")


# -- the tasks' own keys (TaskSpec.check) ---------------------------------------------------------

ETT_TASKS = ("etth1", "etth2", "ettm1", "ettm2")
BUILTIN_TASKS = (*ETT_TASKS, "wikitext2", "multi30k", "cifar10", "imdb")
_POSITIVE = "must be an integer >= 1"
_PROBABILITY = "must be a number in [0, 1)"
# task -> (overrides, the key they break, what the message must say besides "key=value"); every
# task key of every built-in task is in here (test_every_task_key_has_a_bad_value_case).
_ETT_BAD = [
    ({"seq_len": 0}, "seq_len", _POSITIVE),
    ({"seq_len": None}, "seq_len", _POSITIVE),
    ({"seq_len": 731}, "seq_len", "too long for the 80/20 split (the embedded series has 732 steps): choose seq_len <= 730"),
    ({"seq_len": 432, "split": "12/4/4"}, "seq_len", "choose seq_len <= 431"),
    ({"d_model": 0}, "d_model", _POSITIVE),
    ({"d_model": 7}, "d_model", "is not a multiple of n_heads=4: choose d_model divisible by n_heads"),
    ({"n_layers": 0}, "n_layers", _POSITIVE),
    ({"n_heads": 0}, "n_heads", "must be an integer >= 1 (attention heads of the Transformer)"),
    ({"n_heads": -2}, "n_heads", _POSITIVE),
    ({"dropout": 2}, "dropout", _PROBABILITY),
    ({"dropout": 1.0}, "dropout", _PROBABILITY),
    ({"dropout": -0.1}, "dropout", _PROBABILITY),
    ({"pooling": "max"}, "pooling", "is not allowed; choose one of: last, mean"),
    ({"split": "70/30"}, "split", "is not allowed; choose one of: 80/20, 12/4/4"),
    ({"scaling": "robust"}, "scaling", "is not allowed; choose one of: standard, standard_full, minmax"),
    ({"multivariate": None}, "multivariate", "must be true or false"),
]
BAD_TASK_VALUES = {
    **{task: _ETT_BAD for task in ETT_TASKS},
    "wikitext2": [
        ({"d_model": 0}, "d_model", _POSITIVE),
        ({"d_model": 66}, "d_model", "is not a multiple of n_heads=4"),
        ({"n_heads": 3}, "d_model", "is not a multiple of n_heads=3"),  # the embedded default d_model=64
        ({"n_heads": 0}, "n_heads", _POSITIVE),
        ({"n_layers": 0}, "n_layers", _POSITIVE),
        ({"dropout": 1.5}, "dropout", _PROBABILITY),
        ({"block_size": 0}, "block_size", _POSITIVE),
        ({"block_size": 5277}, "block_size", "choose block_size <= 5276"),
        ({"vocab_size": 0}, "vocab_size", _POSITIVE),
    ],
    "multi30k": [
        ({"d_model": 0}, "d_model", _POSITIVE),
        ({"d_model": 30}, "d_model", "is not a multiple of n_heads=4"),
        ({"n_heads": 0}, "n_heads", _POSITIVE),
        ({"n_encoder_layers": 0}, "n_encoder_layers", _POSITIVE),
        ({"n_decoder_layers": 0}, "n_decoder_layers", _POSITIVE),
        ({"dim_feedforward": 0}, "dim_feedforward", _POSITIVE),
        ({"dropout": -1}, "dropout", _PROBABILITY),
        ({"vocab_size": 0}, "vocab_size", _POSITIVE),
        ({"max_len": 2}, "max_len", "must be an integer >= 3"),
    ],
    "cifar10": [
        ({"width": 0}, "width", _POSITIVE),
        ({"blocks": []}, "blocks", "must be a non-empty list of integers >= 1"),
        ({"blocks": [2, 0]}, "blocks", "must be a non-empty list of integers >= 1"),
        ({"blocks": [1, 1.5]}, "blocks", "must be a non-empty list of integers >= 1"),
        ({"crop_padding": -1}, "crop_padding", "must be an integer >= 0"),
        ({"hflip": None}, "hflip", "must be true or false"),
        ({"split": "test"}, "split", "choose one of: holdout, paper"),
    ],
    "imdb": [
        ({"embed_dim": 0}, "embed_dim", _POSITIVE),
        ({"hidden_size": 0}, "hidden_size", _POSITIVE),
        ({"num_layers": 0}, "num_layers", _POSITIVE),
        ({"dropout": 1}, "dropout", _PROBABILITY),
        ({"vocab_size": -5}, "vocab_size", _POSITIVE),
        ({"max_len": 0}, "max_len", _POSITIVE),
        ({"split_seed": None}, "split_seed", "must be an integer"),
        ({"csv_file": 5}, "csv_file", "must be a file name or null"),
    ],
}


@pytest.mark.parametrize("task, overrides, key, fragment", [
    (task, overrides, key, fragment) for task, cases in BAD_TASK_VALUES.items() for overrides, key, fragment in cases
])
def test_task_keys_out_of_range_are_refused_naming_the_key_and_the_value(task, overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_config({"task": task, **overrides}, where="s.yaml: overrides")
    message = str(err.value)
    value = overrides.get(key, resolve_config({"task": task})[key])  # n_heads=3 names the default d_model
    assert message.startswith(f"s.yaml: overrides: {task}: ") and "\n" not in message, message
    assert f"{key}={value!r}" in message and fragment in message, message


def test_every_task_key_has_a_bad_value_case():
    for task in BUILTIN_TASKS:
        assert {key for _, key, _ in BAD_TASK_VALUES[task]} == set(task_fields(task)), task


@pytest.mark.parametrize("task", BUILTIN_TASKS)
@pytest.mark.parametrize("data", ["embedded", "real"])
def test_builtin_defaults_pass_their_own_check(task, data):
    spec = get_task(task)
    assert spec.check is not None
    resolved = resolve_config({"task": task, "data": data})
    spec.check(resolved)  # raises on a default the task refuses
    for key in task_fields(task):
        expected = (spec.embedded_defaults if data == "embedded" else {}).get(key, spec.defaults.get(key))
        assert resolved[key] == expected


@pytest.mark.parametrize("task, overrides", [
    ("etth1", {"seq_len": 730, "d_model": 6, "n_heads": 3, "n_layers": 1, "dropout": 0, "pooling": "mean"}),
    ("ettm2", {"seq_len": 431, "split": "12/4/4", "scaling": "minmax"}),
    ("etth1", {"data": "real", "seq_len": 5000, "multivariate": True}),  # the file's length is not known here
    ("etth1", {"data": "real", "seq_len": 8639, "split": "12/4/4"}),
    ("wikitext2", {"block_size": 5276, "vocab_size": 1, "d_model": 3, "n_heads": 3}),
    ("wikitext2", {"data": "real", "block_size": 10000}),  # the real files are checked when read
    ("multi30k", {"max_len": 3, "dim_feedforward": 1, "dropout": 0.0}),
    ("cifar10", {"blocks": [1], "width": 1, "crop_padding": 0, "hflip": True}),
    ("imdb", {"split_seed": -1, "csv_file": "reviews.csv", "data": "real", "max_len": 1}),
])
def test_task_keys_at_the_edge_of_their_range_pass(task, overrides):
    resolved = resolve_config({"task": task, **overrides})
    assert all(resolved[k] == v for k, v in overrides.items())


def test_a_plugin_task_check_gets_the_resolved_config_and_its_errors_get_the_where_prefix():
    seen = []

    def check(config):
        seen.append(dict(config))
        if config["hidden"] > config["epochs"]:
            raise ValueError(f"plug: hidden={config['hidden']} must be <= epochs={config['epochs']}")

    register_task("plug_check", metrics=[("loss", "min")], defaults={"epochs": 3, "hidden": 2}, check=check)(lambda c: None)
    try:
        assert resolve_config({"task": "plug_check", "lr": 1})["hidden"] == 2
        assert seen[-1]["lr"] == 1 and seen[-1]["epochs"] == 3 and seen[-1]["beta2"] == 0.999
        with pytest.raises(ConfigError, match=r"^trial config: plug: hidden=4 must be <= epochs=3$"):
            resolve_config({"task": "plug_check", "hidden": 4})
    finally:
        TASKS.remove("plug_check")


def test_ablate_train_refuses_a_bad_task_key_with_one_line_and_exit_code_2(capsys):
    from ablate.cli import main

    assert main(["train", "--task", "etth1", "--set", "n_heads=0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "ablate: error: trial config: etth1: n_heads=0 must be an integer >= 1 (attention heads of the Transformer)\n"
    )


def test_ablate_train_refuses_metaadamw_settings_for_adamw_as_a_study_does(capsys):
    from ablate.cli import main

    assert main(["train", "--task", "etth1", "--optimizer", "adamw", "--set", "meta_lr=1e-3", "--set", "gating=true",
                 "--set", "epochs=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "ablate: error: --set gating, meta_lr: MetaAdamW setting(s), which --optimizer adamw does not use; drop them, "
        "or train with --optimizer metaadamw\n")


def test_a_set_value_yaml_cannot_read_is_kept_as_text_and_named(capsys):
    # PyYAML raises a bare ValueError for an escape beyond Unicode: it was a traceback
    from ablate.cli import main

    assert main(["train", "--task", "etth1", "--set", 'lr="\\U01000000"', "--set", "epochs=1"]) == 2
    assert "lr must be a number, got '\"\\\\U01000000\"'" in capsys.readouterr().err


def test_set_values_are_read_as_a_study_file_reads_them():
    # "--set priorities=[1e-3,1,1]" was refused ("['1e-3', 1, 1] must be a list of three non-negative
    # numbers"): YAML 1.1 reads 1e-3 as a string, which --set turned into a number only at the top level
    from ablate.cli import _parse_sets

    assert _parse_sets(["priorities=[1e-3,1,2E+1]", "lr=1e-3", "name=on_time", "x=[a, 1.5]"]) == {
        "priorities": [1e-3, 1, 20.0], "lr": 1e-3, "name": "on_time", "x": ["a", 1.5]}
    assert resolve_config({"task": "etth1", **_parse_sets(["priorities=[1e-3,1,1]"])})["priorities"] == [1e-3, 1.0, 1.0]


def test_a_set_value_with_leading_zeros_is_read_as_decimal_as_a_study_file_reads_it(tmp_path):
    # --set epochs=010 trained 8 epochs, and seeds: [010] in a study file ran seed 8: YAML 1.1 reads a leading zero
    # as octal; decimal, as YAML 1.2 and a reader take it
    from ablate.cli import _parse_sets
    from ablate.study import _Loader

    assert _parse_sets(["epochs=010", "seed=-010", "x=[010, 0_10]", "lr=010.5", "k=0x10", "s='010'"]) == {
        "epochs": 10, "seed": -10, "x": [10, 10], "lr": 10.5, "k": 16, "s": "010"}
    assert yaml.load("seeds: [010, 011]\nbudget: {epochs: 007}", Loader=_Loader) == {"seeds": [10, 11],
                                                                                     "budget": {"epochs": 7}}


def test_a_set_value_with_colons_is_no_base_60_number(capsys):
    # --set epochs=1:30 trained up to 90 epochs: YAML 1.1 reads 1:30 as base 60; a string, which the key refuses
    from ablate.cli import _parse_sets, main
    from ablate.study import _Loader

    assert _parse_sets(["epochs=1:30", "lr=1:30.5", "x=[1:30, 2]"]) == {"epochs": "1:30", "lr": "1:30.5",
                                                                        "x": ["1:30", 2]}
    assert yaml.load("budget: {epochs: 1:30}", Loader=_Loader) == {"budget": {"epochs": "1:30"}}
    assert main(["train", "--task", "etth1", "--set", "epochs=1:30"]) == 2
    assert "ablate: error: trial config: epochs must be an integer, got '1:30'" in capsys.readouterr().err


def test_a_quoted_set_value_that_looks_like_a_number_stays_a_string():
    # --set 'csv_file="1.5"' gave the float 1.5 (and the key refused it): a study file reads a quoted
    # YAML scalar as a string, and quoting is the only way to give such a string on the command line
    from ablate.cli import _parse_sets

    assert _parse_sets(['csv_file="1.5"', "name='2e3'", "tag=!!str 1.0", "k=.5e3", "lr=1e-3"]) == {
        "csv_file": "1.5", "name": "2e3", "tag": "1.0", "k": 500.0, "lr": 1e-3}
    assert resolve_config({"task": "imdb", "data": "real", **_parse_sets(['csv_file="1.5"'])})["csv_file"] == "1.5"


def test_extra_seeds_on_the_command_line_is_refused_as_a_flag(capsys):
    # --extra-seeds 0 was refused as "search_spaces/quick.yaml: extra_seeds: must be ...": a field of the file
    from pathlib import Path

    from ablate.cli import main

    quick = Path(__file__).resolve().parents[2] / "search_spaces" / "quick.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(quick), "--extra-seeds", "0", "--dry-run"])
    assert exit_.value.code == 2
    assert "argument --extra-seeds: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "usage", "said"), [
    (["run", "study.yaml", "--dry-rn"], "usage: ablate run ",
     "ablate run: error: unrecognized arguments: --dry-rn (did you mean --dry-run?) (`ablate run --help` lists its "
     "options)"),
    (["list", "--kyes"], "usage: ablate list ",
     "ablate list: error: unrecognized arguments: --kyes (did you mean --keys?) (`ablate list --help` lists its options)"),
    (["train", "--task", "etth1", "--chekpoint=ck.pt", "--zzz"], "usage: ablate train ",
     "ablate train: error: unrecognized arguments: --chekpoint=ck.pt --zzz (--chekpoint: did you mean --checkpoint?) "
     "(`ablate train --help` lists its options)"),
    (["data", "download", "etth1", "--forse"], "usage: ablate data download ",
     "ablate data download: error: unrecognized arguments: --forse (did you mean --force?) (`ablate data download "
     "--help` lists its options)"),
    (["report", "results/a", "results/b"], "usage: ablate report ",
     "ablate report: error: unrecognized arguments: results/b (`ablate report --help` lists its options)"),
    # an option of the subcommand given before it, or after "--": not "did you mean --dry-run?" for --dry-run
    (["--dry-run", "run", "study.yaml"], "usage: ablate run ",
     "ablate run: error: unrecognized arguments: --dry-run (it is an option of `ablate run`: give it after `ablate run`) "
     "(`ablate run --help` lists its options)"),
    (["--out=r", "report", "results/a"], "usage: ablate report ",
     "ablate report: error: unrecognized arguments: --out=r (it is an option of `ablate report`: give it after "
     "`ablate report`) (`ablate report --help` lists its options)"),
    # one that takes a value: the top-level parser took the value for the subcommand ("invalid choice: '2'")
    (["--max-concurrent", "2", "run", "study.yaml"], "usage: ablate run ",
     "ablate run: error: unrecognized arguments: --max-concurrent 2 (it is an option of `ablate run`: give it after "
     "`ablate run`) (`ablate run --help` lists its options)"),
    (["--data-dir", "d", "--resme", "data", "download", "etth1", "--forse"], "usage: ablate data download ",
     "ablate data download: error: unrecognized arguments: --data-dir d --resme --forse (--data-dir: it is an option "
     "of `ablate data download`: give it after `ablate data download`; --forse: did you mean --force?) (`ablate data "
     "download --help` lists its options)"),
    (["run", "study.yaml", "--dry-run", "--", "--resume"], "usage: ablate run ",
     "ablate run: error: unrecognized arguments: -- --resume (after `--` it is an argument, not an option) "
     "(`ablate run --help` lists its options)"),
])
def test_an_unknown_option_is_refused_by_its_subcommand_with_the_closest_option(capsys, argv, usage, said):
    # argparse refused it with the top-level usage ("usage: ablate [-h] {list,train,...}", "ablate:
    # error: unrecognized arguments: --dry-rn"), which lists none of the subcommand's options
    from ablate.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and err.endswith(f"\n{said}\n"), err


@pytest.mark.parametrize("flag", ["--max-concurrent", "--extra-seeds"])
def test_a_count_flag_that_is_not_a_number_is_refused_without_naming_a_python_function(capsys, flag):
    # argparse said "argument --max-concurrent: invalid _positive_int value: 'two'"
    from ablate.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "study.yaml", flag, "two"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be an integer >= 1, got 'two'" in err and "_positive_int" not in err


def test_a_key_given_twice_with_set_is_an_error_naming_it(capsys):
    # `--set lr=1e-3 --set lr=1e-2` silently kept the last value (a study file refuses a duplicate key)
    from ablate.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--task", "etth1", "--set", "lr=1e-3", "--set", "epochs=1", "--set", " lr=1e-2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--set lr is given twice ('1e-3', then '1e-2'): give each key once" in err


def test_the_embedded_datas_version_is_part_of_the_trial_id_and_real_data_ids_do_not_see_it(monkeypatch):
    # new embedded data (wikitext2's generated-grammar-v1 -> v2) must not reuse, or --resume, trials made on the old
    from ablate.tasks import get_task
    from ablate.tasks import wikitext

    for task in ("etth1", "cifar10", "wikitext2", "multi30k", "imdb"):
        assert get_task(task).embedded_version, task  # every built-in task's embedded data carry their version
    assert get_task("wikitext2").embedded_version == wikitext.GENERATOR_VERSION
    embedded = resolve_config({"task": "wikitext2"})
    real = resolve_config({"task": "wikitext2", "data": "real", "data_dir": "/somewhere"})
    ids = trial_id(embedded), trial_id(real)
    assert identity_config(embedded)["data"] == f"embedded:{wikitext.GENERATOR_VERSION}"
    monkeypatch.setattr(get_task("wikitext2"), "embedded_version", "generated-grammar-v3")
    assert trial_id(embedded) != ids[0]
    assert trial_id(real) == ids[1] and identity_config(real)["data"] == "real"


def test_a_config_with_several_bad_values_names_them_all(capsys):
    # ablate train --set a=.. --set b=..: only the first bad value was named, one run per mistake
    from ablate.cli import main
    from ablate.config import ConfigError, resolve_config

    with pytest.raises(ConfigError) as info:
        resolve_config({"task": "etth1", "epochs": 0, "lr": "abc", "dropout": "x"})
    assert len(info.value.problems) == 3 and str(info.value) == "\n".join(info.value.problems)
    assert [p.split(" must")[0] for p in info.value.problems] == [
        "trial config: epochs=0", "trial config: lr", "trial config: dropout"]
    with pytest.raises(ConfigError) as info:  # one: as before
        resolve_config({"task": "etth1", "epochs": 0})
    assert not hasattr(info.value, "problems") and str(info.value).startswith("trial config: epochs=0 must be > 0")
    assert main(["train", "--task", "etth1", "--set", "epochs=0", "--set", "lr=abc", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ablate: error: trial config: epochs=0 must be > 0 (maximum number of epochs)",
        "ablate: error: trial config: lr must be a number, got 'abc' (learning rate)"]


def test_a_null_task_key_is_named_with_the_other_bad_values():
    # the null of a task key was dropped whenever another key was bad: named only on the next run
    from ablate.config import ConfigError, resolve_config

    with pytest.raises(ConfigError) as info:
        resolve_config({"task": "etth1", "data": "embedded", "lr": -1, "seq_len": None})
    problems = getattr(info.value, "problems", None) or [str(info.value)]
    assert len(problems) == 2
    assert problems[0].startswith("trial config: lr=-1 must be > 0")
    assert problems[1].startswith("trial config: seq_len must not be null")


def test_ablate_train_names_an_empty_set_key_and_an_empty_plugin_name(capsys):
    # "--set =3" said "unknown key(s) ''", "--plugin ''" said "ValueError: Empty module name. Fix the error it raises"
    from ablate.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--task", "etth1", "--set", "=3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("ablate: error: --set expects key=value, got '=3', which has no key before "
                                       "the '='\n")
    assert main(["train", "--task", "etth1", "--plugin", "", "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "--plugin[0]: is an empty module name" in err and "Empty module name" not in err, err


def test_did_you_mean_names_every_option_as_close_as_the_closest():
    # ('etth' is as close to etth1 as to etth2: difflib's first match, 'etth2', was suggested alone)
    from ablate.config import did_you_mean

    assert did_you_mean("etth", ["imdb", "etth2", "etth1"]) == " (did you mean 'etth1' or 'etth2'?)"
    assert did_you_mean("ettm", ["ettm2", "ettm1", "etth1", "etth2"]) == " (did you mean 'ettm1' or 'ettm2'?)"
    assert did_you_mean("ett", ["etta", "ettc", "ettb"]) == " (did you mean 'etta', 'ettb' or 'ettc'?)"
    assert did_you_mean("ETTh1", ["etth1", "etth2"]) == " (did you mean 'etth1'?)"  # (the closest alone)
    assert did_you_mean("lrr", ["lr", "seed"]) == " (did you mean 'lr'?)"
    assert did_you_mean("zzz", ["etth1"]) == "" and did_you_mean("etth", []) == ""


# -- component kinds come from metaadamw's table ------------------------------------------------
def test_every_component_kind_metaadamw_builds_is_a_config_key_listing_its_registry():
    # ablate.config validates the keys of metaadamw.optimizer.component_registries(): each must be a common key
    # whose choices are that registry's names, or a kind added there would be an unknown key in every trial config
    from ablate.config import COMMON_FIELDS
    from metaadamw.optimizer import component_registries

    for kind, registry in component_registries().items():
        assert kind in COMMON_FIELDS, f"component kind {kind!r} has no config key"
        assert COMMON_FIELDS[kind].allowed() == registry.list(), kind


@pytest.mark.parametrize("key, plugged", [("task", "task"), ("features", "feature extractor"), ("grouping", "grouping"),
                                          ("objective", "objective"), ("weighting", "weighting")])
def test_an_unknown_component_names_its_kind_as_before(key, plugged):
    # (the kinds now come from component_registries(); the words of the message are unchanged)
    with pytest.raises(ConfigError) as err:
        resolve_config({"task": "etth1", key: "zzz_nothing"})
    assert (f"trial config: {key}='zzz_nothing' is not allowed (a {plugged} a plugin registers: in a study file, list "
            f"its module under plugins:; with ablate train or ablate list, give --plugin MODULE); choose one of: ") \
        in str(err.value)


def test_a_component_kind_added_to_metaadamws_table_is_validated_without_editing_ablate_config(monkeypatch):
    # config.py spelled the four kinds out three times (registry lookup, the plugin hint, the signature check), so
    # a kind added to metaadamw.optimizer's table was neither looked up nor checked there; now they come from
    # component_registries()
    from ablate import config
    from metaadamw import optimizer
    from metaadamw.registry import Registry

    schedules = Registry("meta schedule")
    schedules.add("constant", lambda: None)
    schedules.add("needs_arg", lambda period: None)  # (MetaAdamW would call it with no argument)
    monkeypatch.setitem(optimizer._COMPONENT_CALLS, "schedule", (schedules, "fn() with no arguments", (), {}))
    monkeypatch.setitem(config.COMMON_FIELDS, "schedule",
                        config._f("schedule", str, "constant", "meta schedule", config._registry_names("schedule")))
    config.validate_value("schedule", "constant")
    with pytest.raises(ConfigError) as err:
        config.validate_value("schedule", "mine")
    assert str(err.value) == ("trial config: schedule='mine' is not allowed (a schedule a plugin registers: in a study "
                              "file, list its module under plugins:; with ablate train or ablate list, give --plugin "
                              "MODULE); choose one of: constant, needs_arg")
    with pytest.raises(ConfigError) as err:
        config.validate_value("schedule", "needs_arg")
    assert "trial config: schedule='needs_arg': the meta schedule 'needs_arg'" in str(err.value)
    assert "cannot be called as MetaAdamW calls it" in str(err.value)


def test_ablate_list_keys_gives_a_key_whose_default_is_null_a_kind():
    # imdb's csv_file (default null) had an empty kind column, which left its user to guess what it takes
    from ablate.config import describe_task_fields

    rows = {line.split()[0]: line for line in describe_task_fields("imdb").splitlines()}
    assert rows["csv_file"].endswith("null               a path or null")
    assert rows["split_seed"].endswith("an integer")
    register_task("plug_kinds", metrics=[("loss", "min")], path_keys=("table",),
                  defaults={"table": "t.csv", "tokenizer": None, "width": 4},
                  embedded_defaults={"width": None})(lambda c: None)
    try:
        kinds = {line.split()[0]: line.split(None, 3)[3] for line in describe_task_fields("plug_kinds").splitlines()[1:]}
        assert kinds == {"table": "a path", "tokenizer": "null or what the task accepts",
                         "width": "an integer or null"}
    finally:
        TASKS.remove("plug_kinds")
    # a path key that is none of the task's own keys (misspelt: it would be compared as text) is refused
    with pytest.raises(ValueError, match=r"task 'plug_bad': path_keys 'csv': not one of the task's own keys \(its "
                                         r"defaults' keys that are no trial key\): csv_file"):
        register_task("plug_bad", metrics=[("loss", "min")], path_keys=("csv",), defaults={"csv_file": None})(lambda c: None)
    with pytest.raises(ValueError, match=r"path_keys must be a tuple of key names, e.g. \('csv_file',\); got 'csv_file'"):
        register_task("plug_bad", metrics=[("loss", "min")], path_keys="csv_file", defaults={"csv_file": None})(lambda c: None)
    assert "plug_bad" not in TASKS.list()
