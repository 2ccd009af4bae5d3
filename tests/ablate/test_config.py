"""The flat trial config: defaults in order, validation messages, idempotent resolution, identity."""

from __future__ import annotations

import pytest

from ablate.config import ConfigError, identity_config, resolve_config, trial_id
from ablate.tasks import get_task


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


def test_equal_numbers_give_equal_ids_and_adamw_ignores_metaadamw_keys():
    assert trial_id(resolve_config({"task": "etth1", "lr": 1})) == trial_id(resolve_config({"task": "etth1", "lr": 1.0}))
    a = resolve_config({"task": "etth1", "optimizer": "adamw"})
    b = resolve_config({"task": "etth1", "optimizer": "adamw", "features": "enhanced"})
    assert trial_id(a) == trial_id(b) and "features" not in identity_config(a)
    assert trial_id(resolve_config({"task": "etth1", "device": "auto"})) == trial_id(resolve_config({"task": "etth1"}))


@pytest.mark.parametrize("config, fragment", [
    ({}, "'task' is required; choose one of:"),
    ({"task": "mnist"}, "task='mnist' is not allowed; choose one of: cifar10"),
    ({"task": "etth1", "lrr": 0.1}, "unknown key(s) 'lrr' (did you mean 'lr'?)"),
    ({"task": "etth1", "max_epochs": 2, "sede": 1}, "unknown key(s) 'max_epochs' (did you mean 'epochs'?), 'sede' (did"),
    ({"task": "etth1", "grouping": "fine_graned"}, "grouping='fine_graned' is not allowed (did you mean 'fine_grained'?)"),
    ({"task": "cifar"}, "task='cifar' is not allowed (did you mean 'cifar10'?); choose one of:"),
    ({"task": "etth1", "lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"task": "etth1", "epochs": 2.5}, "epochs must be an integer, got 2.5"),
    ({"task": "etth1", "seed": True}, "seed must be an integer"),
    ({"task": "etth1", "beta2": 1.0}, "beta2=1.0 must be in [0, 1)"),
    ({"task": "etth1", "features": "fancy"}, "features='fancy' is not allowed; choose one of: basic, basic_plus"),
    ({"task": "etth1", "priorities": [1, 2]}, "a list of three non-negative numbers"),
    ({"task": "etth1", "priorities": "1,2,3"}, "priorities must be a list, got '1,2,3' (write it as [1,2,3])"),
    ({"task": "etth1", "modulator_width": 7, "modulator_heads": 2}, "not a multiple of modulator_heads=2"),
    ({"task": "etth1", "data_dir": "/x"}, "data_dir is given but data='embedded'"),
    ({"task": "etth1", "d_model": "big"}, "d_model must be like"),
])
def test_bad_configs_name_the_key_and_the_fix(config, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_config(config)
    assert fragment in str(err.value)
