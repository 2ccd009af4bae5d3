"""state_dict / load_state_dict: round trip, no aliasing, bit-identical resume."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch

from metaadamw import MetaAdamW
from tests.metaadamw.helpers import (TinyTransformer, lm_batches, lm_loss, mlp, mse, regression_batches,
                                     save_and_load, small_kwargs)

KW = small_kwargs(weighting="huw_priority", priorities=[2, 5, 1], gating=True, features="basic",
                  meta_optimizer="adam")


def _train(model, opt, batches, steps, start=0, meta_every=3, loss_fn=lm_loss):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, batches[t % len(batches)]).backward()
        opt.step()
        if (t + 1) % meta_every == 0:
            opt.meta_step(model, loss_fn, batches[t % 3], batches[(t + 1) % 3], batches[(t + 2) % 3])


def test_resumed_training_is_bit_identical_to_uninterrupted_training():
    batches = lm_batches()
    torch.manual_seed(0)
    model_a = TinyTransformer()
    init = copy.deepcopy(model_a.state_dict())
    opt_a = MetaAdamW(model_a.named_parameters(), **KW)
    init_opt = copy.deepcopy(opt_a.state_dict())
    _train(model_a, opt_a, batches, 7)
    ckpt = save_and_load({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    _train(model_a, opt_a, batches, 8, start=7)

    model_b = TinyTransformer()
    model_b.load_state_dict(init)
    opt_b = MetaAdamW(model_b.named_parameters(), **KW)
    opt_b.load_state_dict(init_opt)
    _train(model_b, opt_b, batches, 3)  # this optimizer has already stepped: loading replaces everything
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    _train(model_b, opt_b, batches, 8, start=7)

    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt_a.meta_parameters(), opt_b.meta_parameters()):
        assert torch.equal(a, b)
    assert opt_a.global_step == opt_b.global_step == 15 and opt_a.meta_updates == opt_b.meta_updates


def test_state_dict_round_trips_every_part():
    batches = lm_batches()
    model = TinyTransformer()
    opt = MetaAdamW(model.named_parameters(), **KW)
    _train(model, opt, batches, 6)
    sd = opt.state_dict()
    meta = sd["metaadamw"]
    assert set(meta["weighting"]) == {"log_vars", "priorities"}
    assert "gate.logits" in meta["modulator"] and meta["meta_optimizer"]["state"], "Adam moments of the modulator"
    first = next(iter(sd["state"].values()))
    assert first["step"] == 6 and {"exp_avg", "exp_avg_sq"} <= set(first)
    other = MetaAdamW(TinyTransformer().named_parameters(), **KW)
    other.load_state_dict(sd)
    sd2 = other.state_dict()
    for key in ("modulator", "weighting"):
        for k, v in meta[key].items():
            assert torch.equal(v, sd2["metaadamw"][key][k]), k
    assert torch.equal(meta["carry"]["exp_avg_norm_sq"], sd2["metaadamw"]["carry"]["exp_avg_norm_sq"])


def test_loading_never_mutates_or_aliases_the_callers_dict():
    batches = regression_batches()
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **KW)
    _train(model, opt, batches, 4, loss_fn=mse)
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    model_t = mlp(1)
    target = MetaAdamW(model_t.named_parameters(), **KW)
    target.load_state_dict(sd)
    _train(model_t, target, batches, 3, loss_fn=mse)  # steps update the loaded state in place
    assert sd.keys() == frozen.keys() and "metaadamw" in sd

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    assert same(sd, frozen)


def test_loading_a_checkpoint_of_another_layout_is_a_clear_error():
    opt = MetaAdamW(mlp(0).named_parameters(), **KW)
    other = MetaAdamW(TinyTransformer().named_parameters(), **KW)
    try:
        other.load_state_dict(opt.state_dict())
    except ValueError as e:
        assert "modulator groups" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    model = mlp(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, regression_batches(), 1, meta_every=10**9, loss_fn=mse)
    with pytest.raises(ValueError, match="saved neither by MetaAdamW .* nor by torch.optim.AdamW"):
        opt.load_state_dict(sgd.state_dict())
    # other optimizers' checkpoints said "a MetaAdamW state dict that lost its meta state": NAdam's moments come
    # with its mu_product, RAdam's groups with torch's flags but no amsgrad, momentum-free SGD's with no state at all
    expected = {torch.optim.NAdam: r"its per-parameter state also has \['mu_product'\], another optimizer's",
                torch.optim.RAdam: r"torch.optim's param-group flags but not AdamW's amsgrad",
                torch.optim.SGD: r"nor by torch.optim.AdamW \(every parameter's state needs exp_avg, exp_avg_sq and "
                                 r"step, every param group betas\)\. Nothing was loaded"}
    for cls, match in expected.items():
        other = cls(model.parameters(), lr=0.1)
        _train(model, other, regression_batches(), 1, meta_every=10**9, loss_fn=mse)
        with pytest.raises(ValueError, match=match) as info:
            opt.load_state_dict(other.state_dict())
        assert "lost its meta state" not in str(info.value)
    amsgrad = torch.optim.AdamW(model.parameters(), amsgrad=True)
    _train(model, amsgrad, regression_batches(), 1, meta_every=10**9, loss_fn=mse)
    with pytest.raises(ValueError, match="uses amsgrad, which MetaAdamW does not support"):
        opt.load_state_dict(amsgrad.state_dict())


def test_a_checkpoint_of_an_optimizer_built_with_model_or_without_it_says_so_when_its_groups_differ():
    # the groups of fine_grained differ with and without model= (layer types from the modules): the error said
    # "same model, same param groups and same grouping needed", all of which were the same
    models = [TinyTransformer() for _ in range(4)]
    named = [MetaAdamW(m.named_parameters(), **small_kwargs()) for m in models[:2]]
    given = [MetaAdamW(m.parameters(), model=m, **small_kwargs()) for m in models[2:]]
    for source, target, saved, mine in ((named[0], given[0], "without", "with"), (given[1], named[1], "with", "without")):
        with pytest.raises(ValueError, match=rf"The checkpoint's optimizer was built {saved} model=.* and this one "
                                             rf"{mine} model="):
            target.load_state_dict(source.state_dict())
    # the same construction, another layout: nothing said of model=
    with pytest.raises(ValueError, match="modulator groups") as info:
        named[0].load_state_dict(MetaAdamW(mlp(0).named_parameters(), **small_kwargs()).state_dict())
    assert "model=" not in str(info.value)
    assert copy.deepcopy(given[0]).state_dict()["metaadamw"]["grouped_with_model"] is True  # (a copy has no model)


@pytest.mark.parametrize("source", ["MetaAdamW", "AdamW"])
def test_moments_of_another_models_shapes_are_refused_before_anything_loads(source):
    # same layout (4 tensors, same groups) but other widths: torch.optim checks only the group sizes
    batches = regression_batches()
    small, wide = mlp(0, widths=(6, 16, 1)), mlp(0, widths=(6, 32, 1))
    saved = (MetaAdamW(small.named_parameters(), **KW) if source == "MetaAdamW"
             else torch.optim.AdamW(small.parameters()))
    _train(small, saved, batches, 2, meta_every=10**9, loss_fn=mse)
    opt = MetaAdamW(wide.named_parameters(), **KW)
    _train(wide, opt, batches, 1, meta_every=10**9, loss_fn=mse)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"moments do not fit .* 0\.weight: exp_avg \(16, 6\), parameter \(32, 6\); "
                                         r"0\.bias: exp_avg \(16,\), parameter \(32,\); 2\.weight"):
        opt.load_state_dict(saved.state_dict())
    after = opt.state_dict()
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(before["state"].values(), after["state"].values()))
    assert opt._steps == [1, 1, 1, 1]


def test_an_adamw_checkpoint_switches_a_run_to_metaadamw_with_its_moments_and_step_counts():
    # with alpha_range = beta_range = 0 the switched run must continue exactly as AdamW would: the
    # bias corrections continue from AdamW's step counts (loading the moments "by hand" restarted them)
    batches = regression_batches()
    model, twin = mlp(0), mlp(0)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    _train(model, adamw, batches, 5, meta_every=10**9, loss_fn=mse)
    twin.load_state_dict(model.state_dict())
    meta = MetaAdamW(twin.named_parameters(), lr=1.0, alpha_range=0.0, beta_range=0.0, **small_kwargs())
    meta.load_state_dict(adamw.state_dict())
    assert meta.param_groups[0]["lr"] == 1e-2 and meta._steps == [5] * len(meta._steps) and meta.global_step == 5
    _train(model, adamw, batches, 5, start=5, meta_every=10**9, loss_fn=mse)
    _train(twin, meta, batches, 5, start=5, meta_every=10**9, loss_fn=mse)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the live state's "step" is AdamW's, counted on (it was absent: code written for AdamW read it)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(meta.state[b]["step"], adamw.state[a]["step"]) and meta.state[b]["step"] == 10


def test_an_adamw_checkpoint_loaded_after_steps_restarts_the_tensors_it_has_no_state_for():
    # a tensor frozen in the AdamW run has no state in its checkpoint: its moments are dropped on
    # load (torch.optim replaces all state), and so must be its step count (bias corrections)
    batches = regression_batches()
    model, used, fresh_model = mlp(0), mlp(0), mlp(0)
    model[0].weight.requires_grad_(False)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, adamw, batches, 3, meta_every=10**9, loss_fn=mse)
    model[0].weight.requires_grad_(True)
    kw = dict(lr=1.0, alpha_range=0.0, beta_range=0.0, **small_kwargs())
    meta = MetaAdamW(used.named_parameters(), **kw)
    _train(used, meta, batches, 5, meta_every=10**9, loss_fn=mse)  # steps 5 of its own before the load
    fresh = MetaAdamW(fresh_model.named_parameters(), **kw)
    for opt, net in ((meta, used), (fresh, fresh_model)):
        net.load_state_dict(model.state_dict())
        opt.load_state_dict(adamw.state_dict())
        assert opt._steps == [0, 3, 3, 3, 3, 3]
        assert not opt._stats
    for opt, net in ((adamw, model), (meta, used), (fresh, fresh_model)):
        _train(net, opt, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    for a, b, c in zip(model.parameters(), used.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, c)


def test_an_adamw_checkpoint_with_an_empty_state_entry_of_a_frozen_tensor_loads():
    # torch.optim's state is a defaultdict: code that only reads adamw.state[p] of a frozen tensor
    # leaves an empty entry, which AdamW saves and loads as "no state"; MetaAdamW refused the checkpoint
    batches = regression_batches()
    model, twin = mlp(0), mlp(0)
    model[0].weight.requires_grad_(False)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, adamw, batches, 3, meta_every=10**9, loss_fn=mse)
    assert [adamw.state[p].get("step") is None for p in model.parameters()][0]  # (the read leaves {})
    ckpt = save_and_load(adamw.state_dict())
    assert ckpt["state"][0] == {}
    model[0].weight.requires_grad_(True)
    twin.load_state_dict(model.state_dict())
    meta = MetaAdamW(twin.named_parameters(), lr=1.0, alpha_range=0.0, beta_range=0.0, **small_kwargs())
    meta.load_state_dict(ckpt)
    assert meta._steps == [0, 3, 3, 3, 3, 3] and meta.param_groups[0]["lr"] == 1e-2
    adamw.load_state_dict(ckpt)
    _train(model, adamw, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    _train(twin, meta, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _adapt_state_dict_ids(optimizer, state_dict):
    """torch.optim's documented load pre-hook that loads a state dict by parameter names."""
    adapted = copy.deepcopy(optimizer.state_dict())
    for k, v in state_dict["param_groups"][0].items():
        if k not in ["params", "param_names"]:
            adapted["param_groups"][0][k] = v
    lookup = dict(zip(state_dict["param_groups"][0]["param_names"], state_dict["param_groups"][0]["params"]))
    for param_id, name in zip(adapted["param_groups"][0]["params"], adapted["param_groups"][0]["param_names"]):
        if name in lookup:
            adapted["state"][param_id] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                          for k, v in state_dict["state"][lookup[name]].items()}
    return adapted


def test_step_counts_go_with_the_moments_a_load_pre_hook_moves():
    # the per-tensor "step" that state_dict() saves with the moments is the one a remapping hook moves
    # along; the load kept the meta state's list instead (zeros of the fresh optimizer): bias corrections
    # restarted on moments of 6 steps, and the run left AdamW's
    batches = regression_batches()
    model, twin = mlp(0), mlp(0)
    kw = dict(lr=1e-2, alpha_range=0.0, beta_range=0.0, **small_kwargs())
    adamw = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    meta = MetaAdamW(twin.named_parameters(), **kw)
    for net, opt in ((model, adamw), (twin, meta)):
        _train(net, opt, batches, 6, meta_every=10**9, loss_fn=mse)
    saved_adamw, saved_meta = save_and_load(adamw.state_dict()), save_and_load(meta.state_dict())
    adamw = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    meta = MetaAdamW(twin.named_parameters(), **kw)
    for opt, saved in ((adamw, saved_adamw), (meta, saved_meta)):
        opt.register_load_state_dict_pre_hook(_adapt_state_dict_ids)
        opt.load_state_dict(saved)
    assert meta._steps == [6] * len(meta._steps) and meta.global_step == 6
    for net, opt in ((model, adamw), (twin, meta)):
        _train(net, opt, batches, 4, start=6, meta_every=10**9, loss_fn=mse)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_state_dict_hooks_run_before_and_after_all_of_metaadamws_own_work():
    """As in torch.optim: load pre-hooks see (and may replace) the dict first, load post-hooks
    see the loaded optimizer, state_dict post-hooks see (and may replace) the whole dict."""
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **KW)
    _train(model, opt, regression_batches(3), 4, loss_fn=mse)
    seen = {}
    opt.register_state_dict_pre_hook(lambda o: seen.setdefault("pre", o.global_step))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": sorted(sd)})
    sd = opt.state_dict()
    assert seen["pre"] == 4 and sd["note"] == ["metaadamw", "param_groups", "state"]
    # a checkpoint whose parameter keys became strings, repaired by a load pre-hook
    saved = {**sd, "state": {str(k): v for k, v in sd["state"].items()}}
    saved.pop("note")
    target = MetaAdamW(mlp(1).named_parameters(), **KW)

    def repair(o, state_dict):
        seen["keys"] = sorted(state_dict)
        return {**state_dict, "state": {int(k): v for k, v in state_dict["state"].items()}}

    target.register_load_state_dict_pre_hook(repair)
    target.register_load_state_dict_post_hook(lambda o: seen.setdefault("post", (o.global_step, o.meta_updates)))
    target.load_state_dict(saved)
    assert seen["keys"] == ["metaadamw", "param_groups", "state"]
    assert seen["post"] == (4, 1) and target.global_step == 4
    for k, v in opt.modulator.state_dict().items():
        assert torch.equal(target.modulator.state_dict()[k], v)


def _stepped(**over):
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **{**KW, **over})
    _train(model, opt, regression_batches(3), 3, loss_fn=mse)
    return opt


def _fresh_state(opt):
    return (len([p for p in opt._params if "exp_avg" in opt.state.get(p, {})]), opt.global_step,
            [t.clone() for t in opt.modulator.state_dict().values()])


@pytest.mark.parametrize("over, names", [
    ({"modulator_layers": 2}, ["modulator_layers=1 (this optimizer: 2)"]),
    ({"features": "basic_plus"}, ["features='basic'"]),
    ({"meta_optimizer": "sgd"}, ["meta_optimizer Adam (this optimizer: SGD)"]),
    ({"weighting": "sum", "gating": False}, ["gating=True", "weighting='huw_priority'"]),
    # the multipliers' ranges and the weighting's form give the trained modulator its meaning (an
    # AdamW-equivalent run, alpha_range = beta_range = 0, resumed as a modulated one without a word)
    ({"alpha_range": 0.0, "beta_range": 0.5}, ["alpha_range=1.0 (this optimizer: 0.0)", "beta_range=1.0"]),
    ({"weighting_form": "classification"}, ["weighting_form='regression' (this optimizer: 'classification')"]),
])
def test_loading_a_checkpoint_of_other_options_names_them_and_loads_nothing(over, names):
    sd = _stepped().state_dict()
    target = MetaAdamW(mlp(0).named_parameters(), **{**KW, **over})
    before = _fresh_state(target)
    with pytest.raises(ValueError, match="built with other options, and nothing was loaded") as info:
        target.load_state_dict(sd)
    for name in names:
        assert name in str(info.value)
    after = _fresh_state(target)
    assert after[:2] == before[:2] == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))


@pytest.mark.parametrize("saved, target", [
    # sum and fixed have no log-variances: their form is moot, not a reason to refuse the checkpoint
    (dict(weighting="sum", weighting_form="classification"), dict(weighting="sum")),
    (dict(weighting="fixed", weighting_form="classification", fixed_weights=[1, 2, 3]),
     dict(weighting="fixed", fixed_weights=[1, 2, 3])),
    # settings the configuration ignores are not warned about either
    (dict(gating=False, gate_l1=0.5), dict(gating=False)),
    (dict(weighting="sum", priorities=[2, 1, 1]), dict(weighting="sum")),
    (dict(weighting="huw", priorities=[2, 1, 1], fixed_weights=[2, 1, 1]), dict(weighting="huw")),
])
def test_options_the_configuration_does_not_use_neither_refuse_nor_warn(saved, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the constructor's own warning about ignored priorities)
        sd = _stepped(**saved).state_dict()
        opt = MetaAdamW(mlp(0).named_parameters(), **{**KW, **target})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sd)
    assert opt.global_step == sd["metaadamw"]["global_step"] > 0
    # (where gating is on, or the weighting uses them, they still count)
    if "gate_l1" in saved:
        sd = _stepped(gating=True, gate_l1=0.5).state_dict()
        with pytest.warns(UserWarning, match="gate_l1 0.5 -> 0.001"):
            MetaAdamW(mlp(0).named_parameters(), **{**KW, "gating": True}).load_state_dict(sd)


def test_a_checkpoint_without_saved_options_is_checked_by_its_tensors():
    sd = _stepped().state_dict()
    del sd["metaadamw"]["config"], sd["metaadamw"]["meta_optimizer_class"]  # as saved by earlier versions
    with pytest.raises(ValueError, match="the modulator's tensors differ"):
        MetaAdamW(mlp(0).named_parameters(), **{**KW, "features": "basic_plus"}).load_state_dict(sd)
    with pytest.raises(ValueError, match="the meta-optimizer's hyperparameters differ"):
        MetaAdamW(mlp(0).named_parameters(), **{**KW, "meta_optimizer": "sgd"}).load_state_dict(sd)
    MetaAdamW(mlp(0).named_parameters(), **KW).load_state_dict(sd)  # the same options load


def test_loaded_priorities_and_meta_lr_show_in_config_with_a_warning():
    sd = _stepped().state_dict()
    target = MetaAdamW(mlp(0).named_parameters(), **{**KW, "priorities": [1, 1, 1], "meta_lr": 0.5})
    with pytest.warns(UserWarning, match=r"priorities \[1.0, 1.0, 1.0\] -> \[2.0, 5.0, 1.0\]"):
        target.load_state_dict(sd)
    assert target.config["priorities"] == [2, 5, 1] and target.config["meta_lr"] == KW.get("meta_lr", 1e-4)
    assert target.weighting.priorities.tolist() == [2.0, 5.0, 1.0]
    assert target.meta_optimizer.param_groups[0]["lr"] == target.config["meta_lr"]


def test_run_options_that_differ_from_the_checkpoints_are_kept_with_a_warning():
    sd = _stepped().state_dict()
    target = MetaAdamW(mlp(0).named_parameters(), **{**KW, "refresh_every": 3, "total_steps": 500,
                                                     "meta_gradient": "exact"})
    with pytest.warns(UserWarning, match=r"constructor's settings, not the checkpoint's .*: meta_gradient "
                                         r"'finite_difference' -> 'exact', refresh_every 1 -> 3, total_steps None -> 500"):
        target.load_state_dict(sd)
    assert (target.refresh_every, target.total_steps, target.meta_gradient) == (3, 500, "exact")
    assert target.global_step == sd["metaadamw"]["global_step"] > 0  # (and the rest loaded)


def test_load_warnings_point_at_the_users_load_state_dict_line():
    # they pointed into MetaAdamW.load_state_dict (stacklevel 3 from a method two calls down)
    sd = _stepped().state_dict()
    target = MetaAdamW(mlp(0).named_parameters(), **{**KW, "priorities": [1, 1, 1], "refresh_every": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(sd)
    said = [w for w in caught if "MetaAdamW.load_state_dict" in str(w.message)]
    assert len(said) == 2 and all(w.filename == __file__ for w in said), [(w.filename, w.lineno) for w in said]


def test_run_options_set_after_construction_are_checked_used_and_saved():
    # they were plain attributes beside `config`: a changed refresh_every was used but not saved, so
    # its checkpoint claimed the old value, and a bad value failed only inside a later step
    opt = _stepped()
    opt.refresh_every, opt.total_steps, opt.meta_gradient = 3, 500, "exact"
    for name, bad, message in (("refresh_every", 0, "refresh_every must be an integer >= 1, got 0"),
                               ("total_steps", 1.5, "total_steps must be None or an integer >= 1, got 1.5"),
                               ("meta_gradient", "exakt", "meta_gradient must be one of")):
        with pytest.raises(ValueError, match=re.escape(message)):
            setattr(opt, name, bad)
    assert (opt.refresh_every, opt.total_steps, opt.meta_gradient) == (3, 500, "exact")
    infer, refreshed = opt.modulator.infer, []
    opt.modulator.infer = lambda *a: refreshed.append(opt.global_step) or infer(*a)
    start = opt.global_step
    for p in opt._params:
        p.grad = torch.ones_like(p)
    for _ in range(6):
        opt.step()
    assert refreshed == [s for s in range(start + 1, start + 7) if (s - 1) % 3 == 0]
    sd = opt.state_dict()
    assert {k: sd["metaadamw"]["config"][k] for k in ("refresh_every", "total_steps", "meta_gradient")} == {
        "refresh_every": 3, "total_steps": 500, "meta_gradient": "exact"}
    with pytest.warns(UserWarning, match=r"meta_gradient 'exact' -> 'finite_difference', refresh_every 3 -> 1"):
        MetaAdamW(mlp(0).named_parameters(), **KW).load_state_dict(sd)
    # an optimizer pickled when they were attributes (set after construction): they move into config
    old = copy.deepcopy(_stepped()).__getstate__()
    old.update(refresh_every=4, total_steps=200, meta_gradient="exact")
    unpickled = MetaAdamW.__new__(MetaAdamW)
    unpickled.__setstate__(old)
    assert (unpickled.refresh_every, unpickled.total_steps, unpickled.meta_gradient) == (4, 200, "exact")
    assert unpickled.state_dict()["metaadamw"]["config"]["refresh_every"] == 4


def test_a_torch_adam_checkpoint_with_l2_weight_decay_is_refused():
    # torch.optim.Adam's weight_decay is an L2 term in the gradient, not AdamW's decoupled decay
    model = mlp(0)
    for wd, refused in ((0.1, True), (0.0, False)):
        adam = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=wd)
        _train(model, adam, regression_batches(), 2, meta_every=10**9, loss_fn=mse)
        meta = MetaAdamW(mlp(0).named_parameters(), **small_kwargs())
        if refused:
            with pytest.raises(ValueError, match=r"torch.optim.Adam checkpoint with weight_decay=0.1 .* L2 penalty.*"
                                                 r"Nothing was loaded"):
                meta.load_state_dict(adam.state_dict())
            assert meta.global_step == 0
        else:
            meta.load_state_dict(adam.state_dict())
            assert meta.global_step == 2
            # torch.optim's own flags do not become MetaAdamW's (they were saved again and again), nor
            # stay in a MetaAdamW checkpoint of an earlier version that kept them
            assert set(meta.param_groups[0]) == {"params", "param_names", "lr", "betas", "eps", "weight_decay"}
            old = meta.state_dict()
            old["param_groups"][0].update(amsgrad=False, foreach=None, decoupled_weight_decay=True)
            meta.load_state_dict(old)
            assert set(meta.param_groups[0]) == {"params", "param_names", "lr", "betas", "eps", "weight_decay"}


def test_state_dict_returns_the_live_moments_and_leaves_the_live_state_alone():
    # as torch.optim: no copy of the moments (a checkpoint would double the optimizer's memory); the
    # live state's "step" is AdamW's, kept current by step(), and the saved one stays as it was saved
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **KW)
    _train(model, opt, regression_batches(3), 3, loss_fn=mse)
    sd = opt.state_dict()
    first = next(iter(model.parameters()))
    assert sd["state"][0]["exp_avg"] is opt.state[first]["exp_avg"] and sd["state"][0]["step"] == 3
    assert all(torch.equal(st["step"], torch.tensor(3.0)) for st in opt.state.values())
    _train(model, opt, regression_batches(3), 1, start=3, loss_fn=mse)
    assert opt.state_dict()["state"][0]["step"] == 4 and sd["state"][0]["step"] == 3
    assert all(torch.equal(st["step"], torch.tensor(4.0)) for st in opt.state.values())


def test_state_dicts_that_lost_meta_state_in_torch_distributed_checkpoint_are_refused_loading_nothing(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    batches = lm_batches()

    def make():
        torch.manual_seed(0)
        model = TinyTransformer()
        return model, MetaAdamW(model.named_parameters(), **KW)

    model, opt = make()
    _train(model, opt, batches, 4)
    other_model, other = make()
    _train(other_model, other, batches, 1)
    before = copy.deepcopy(other.state_dict())

    def unchanged(moments=True):
        after = other.state_dict()
        assert all(isinstance(k, torch.Tensor) for k in other.state)
        if moments:
            torch.testing.assert_close(after["state"], before["state"])
        torch.testing.assert_close(after["metaadamw"]["modulator"], before["metaadamw"]["modulator"])
        assert after["metaadamw"]["steps"] == before["metaadamw"]["steps"]

    # get_optimizer_state_dict keeps only "state" and "param_groups": loading it would silently
    # start a fresh modulator with the saved moments
    lost = get_optimizer_state_dict(model, opt)
    assert "metaadamw" not in lost
    with pytest.raises(ValueError, match="lost its meta state.*get_optimizer_state_dict"):
        set_optimizer_state_dict(other_model, other, lost)
    unchanged()
    junk = copy.deepcopy(opt.state_dict())
    junk["metaadamw"]["meta_optimizer"]["state"]["0"] = junk["metaadamw"]["meta_optimizer"]["state"].pop(0)
    with pytest.raises(ValueError, match="the meta-optimizer's state dict has per-parameter entries under"):
        other.load_state_dict(junk)
    unchanged()
    # dcp.save / dcp.load of state_dict() itself: the load leaves string-keyed copies of the integer
    # keys of non-tensor values (step counts) and of entries the target lacks (the meta-optimizer's
    # moments before its first meta-update), which torch.optim would keep as junk (and it has
    # already written the moments into the live tensors that state_dict() returned)
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    state = {"optim": other.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match="not the parameters of its param_groups.*torch.save"):
        other.load_state_dict(state["optim"])
    unchanged(moments=False)
    moments = [(st["exp_avg"], st["exp_avg_sq"]) for st in other.state_dict()["state"].values()]
    torch.testing.assert_close(moments, [(st["exp_avg"], st["exp_avg_sq"]) for st in opt.state_dict()["state"].values()])


def test_a_group_added_after_resuming_is_grouped_with_the_model_given_at_construction():
    # torch.optim's load_state_dict ends with __setstate__, which dropped the model= reference (meant
    # for unpickled copies): tensors unfrozen after a resume were grouped without module types (other
    # groups, another training), and tensors given without names were refused, asking for names
    batches = lm_batches()

    def build(seed, named):
        torch.manual_seed(seed)
        model = TinyTransformer()
        later = [(n, p) for n, p in model.named_parameters() if n.startswith("encoder.layers.1.")]
        first = [(n, p) if named else p for n, p in model.named_parameters() if not n.startswith("encoder.layers.1.")]
        return model, MetaAdamW(first, model=model, **small_kwargs(modulator_heads=1)), later

    def train(model, opt, later, start, stop):
        for t in range(start, stop):
            if t == 3:  # layers unfrozen during training
                names = {"param_names": [n for n, _ in later]} if "param_names" in opt.param_groups[0] else {}
                opt.add_param_group({"params": [p for _, p in later], **names})
            opt.zero_grad()
            lm_loss(model, batches[t % 3]).backward()
            opt.step()

    for named in (True, False):
        model_a, opt_a, later_a = build(0, named)
        train(model_a, opt_a, later_a, 0, 2)
        ckpt = save_and_load({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
        train(model_a, opt_a, later_a, 2, 6)
        model_b, opt_b, later_b = build(1, named)
        model_b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        train(model_b, opt_b, later_b, 2, 6)
        assert opt_b.group_names == opt_a.group_names
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(a, b)
    assert copy.deepcopy(opt_b)._model_ref is None  # (a copy still has no model)


def test_a_meta_optimizer_with_other_param_groups_is_refused_before_anything_loads():
    # torch.optim's own check of the meta-optimizer's groups came after the model's moments and the
    # modulator were loaded, and in words that blamed the model's param groups
    def one_group(params, lr, weight_decay):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def two_groups(params, lr, weight_decay):
        params = list(params)
        return torch.optim.Adam([{"params": params[:-1]}, {"params": params[-1:], "lr": lr / 10}], lr=lr,
                                weight_decay=weight_decay)

    sd = _stepped(meta_optimizer=one_group).state_dict()
    target = MetaAdamW(mlp(0).named_parameters(), **{**KW, "meta_optimizer": two_groups})
    before = _fresh_state(target)
    with pytest.raises(ValueError, match=r"nothing was loaded: the meta-optimizer's param groups hold \[\d+\] tensors "
                                         r"\(this optimizer's: \[\d+, 1\]\)"):
        target.load_state_dict(sd)
    after = _fresh_state(target)
    assert after[:2] == before[:2] == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))


def test_a_load_whose_warning_is_made_an_error_loads_nothing():
    # the warnings about settings that differ came after the moments, the modulator and the
    # meta-optimizer were loaded: under -W error the load raised with the optimizer half loaded
    sd = _stepped().state_dict()
    target = MetaAdamW(mlp(0).named_parameters(), **{**KW, "total_steps": 500})
    before = _fresh_state(target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="total_steps None -> 500"):
            target.load_state_dict(sd)
    after = _fresh_state(target)
    assert after[:2] == before[:2] == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    with pytest.warns(UserWarning, match="total_steps None -> 500"):
        target.load_state_dict(sd)  # (and as a warning it loads everything)
    assert target.global_step == 3 and target.total_steps == 500


def test_an_adamw_checkpoint_of_tensor_hyperparameters_loads_them_as_floats():
    # torch.optim.AdamW(lr=torch.tensor(...)) (as compiled or capturable training builds it) saves
    # tensors in its param groups: MetaAdamW steps with floats and refuses a tensor lr or betas set
    # later, so the load takes their values (read once), and the run goes on as AdamW's does
    batches = regression_batches()
    model, twin = mlp(0), mlp(0)
    adamw = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2), betas=(torch.tensor(0.8), torch.tensor(0.99)),
                              weight_decay=torch.tensor(0.1))
    _train(model, adamw, batches, 3, meta_every=10**9, loss_fn=mse)
    twin.load_state_dict(model.state_dict())
    meta = MetaAdamW(twin.named_parameters(), alpha_range=0.0, beta_range=0.0, **small_kwargs())
    meta.load_state_dict(save_and_load(adamw.state_dict()))
    group = meta.param_groups[0]
    assert [type(v) for v in (group["lr"], *group["betas"], group["weight_decay"])] == [float] * 4
    assert (group["lr"], *group["betas"], group["weight_decay"]) == pytest.approx((1e-2, 0.8, 0.99, 0.1))
    _train(model, adamw, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    _train(twin, meta, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_total_steps_without_the_time_step_feature_is_not_warned_about():
    # total_steps only normalises the time-step feature: with time_step=False a checkpoint saved with
    # another total_steps continues exactly as the saved run would have, yet loading it warned that it
    # would not (as for gate_l1 without gating, an option the configuration does not use)
    saved = _stepped(time_step=False, total_steps=100).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the modulator's padding of the 5 features)
        target = MetaAdamW(mlp(0).named_parameters(), **{**KW, "time_step": False, "total_steps": 10_000})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(saved)
    assert target.total_steps == 10_000  # (the constructor's, as for every run option)
    # with the time-step feature it changes the features: still warned about
    saved = _stepped(total_steps=100).state_dict()
    with pytest.warns(UserWarning, match="total_steps 100 -> 10000"):
        MetaAdamW(mlp(0).named_parameters(), **{**KW, "total_steps": 10_000}).load_state_dict(saved)


@pytest.mark.parametrize("saved, target", [(None, [1, 1, 1]), ([1, 1, 1], None), (None, [1.0, 1.0, 1.0])])
def test_fixed_weights_none_and_all_ones_are_the_same_weights_on_load(saved, target):
    # a checkpoint of weighting="fixed", fixed_weights=None loaded into fixed_weights=[1, 1, 1] (the same
    # weights) warned "the checkpoint's settings replace the constructor's: fixed_weights [1.0, 1.0, 1.0] -> None"
    sd = _stepped(weighting="fixed", fixed_weights=saved).state_dict()
    opt = MetaAdamW(mlp(0).named_parameters(), **{**KW, "weighting": "fixed", "fixed_weights": target})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sd)
    assert opt.weighting.weights.tolist() == [1.0, 1.0, 1.0]
    # other weights are still a change, said
    sd = _stepped(weighting="fixed", fixed_weights=[2, 1, 1]).state_dict()
    with pytest.warns(UserWarning, match=r"fixed_weights .* -> \[2\.0, 1\.0, 1\.0\]"):
        MetaAdamW(mlp(0).named_parameters(), **{**KW, "weighting": "fixed", "fixed_weights": target}).load_state_dict(sd)


def _adamw_and_meta_checkpoints():
    """An AdamW and a MetaAdamW checkpoint of mlp(0) after two steps, and a MetaAdamW of mlp(0) that stepped once."""
    batches = regression_batches()
    saved = {}
    for source in ("AdamW", "MetaAdamW"):
        model = mlp(0)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if source == "AdamW"
               else MetaAdamW(model.named_parameters(), lr=1e-2, **KW))
        _train(model, opt, batches, 2, meta_every=10**9, loss_fn=mse)
        saved[source] = opt.state_dict()
    target_model = mlp(0)
    target = MetaAdamW(target_model.named_parameters(), lr=1e-2, **KW)
    _train(target_model, target, batches, 1, meta_every=10**9, loss_fn=mse)
    return saved, target


@pytest.mark.parametrize("source", ["AdamW", "MetaAdamW"])
@pytest.mark.parametrize("key, change, said", [
    ("exp_avg", lambda t: t.to(torch.complex64), r"exp_avg is of dtype torch\.complex64 \(moments are real floating"),
    ("exp_avg_sq", lambda t: t.to(torch.int64), r"exp_avg_sq is of dtype torch\.int64"),
    ("exp_avg", lambda t: t > 0, r"exp_avg is of dtype torch\.bool"),
    ("exp_avg", lambda t: 0.0, r"exp_avg is 0\.0, not a tensor"),
    ("exp_avg_sq", lambda t: None, r"exp_avg_sq is None, not a tensor"),
    ("exp_avg_sq", lambda t: t.numpy(), r"exp_avg_sq is a ndarray, not a tensor"),
    ("exp_avg_sq", lambda t: t.to_sparse(), r"exp_avg_sq is a torch\.sparse_coo tensor"),
    ("exp_avg", lambda t: torch.empty_like(t, device="meta"), r"exp_avg is on the 'meta' device"),
    ("step", lambda t: "3", r"step '3' \(expected a step count, an integer >= 0\)"),
    ("step", lambda t: torch.tensor(-1.0), r"step -1\.0 \(expected a step count"),
    ("step", lambda t: torch.tensor(2.5), r"step 2\.5 \(expected a step count"),
])
def test_moments_or_step_counts_of_a_wrong_kind_are_refused_naming_them_before_anything_loads(source, key, change, said):
    # torch.optim casts what it loads to the parameter's dtype (a complex moment lost its imaginary part, a bool one
    # became 0/1) and keeps anything else as it is: a float, None or a numpy array failed with "cannot create weak
    # reference to 'float' object" or in torch's cast, a sparse or meta moment at the next step, a negative step count
    # there with a ZeroDivisionError, and 2.5 steps were silently taken as 2
    saved, target = _adamw_and_meta_checkpoints()
    sd = saved[source]
    sd["state"][0][key] = change(sd["state"][0][key])
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"moments do not fit this optimizer's parameters, and nothing was loaded: "
                                         r"0\.weight: " + said):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(before["state"].values(), after["state"].values()))
    assert target._steps == [1] * 6 and target.global_step == 1


@pytest.mark.parametrize("source", ["AdamW", "MetaAdamW"])
@pytest.mark.parametrize("key, value, said", [
    ("lr", "0.01", r"Invalid learning rate: lr='0\.01'"),
    ("lr", -1.0, r"Invalid learning rate: lr=-1\.0"),
    ("eps", float("nan"), r"Invalid epsilon value: eps=nan"),
    ("weight_decay", [0.1], r"Invalid weight_decay value: \[0\.1\]"),
    ("betas", (0.9, 1.5), r"Invalid beta parameter at index 1: 1\.5"),
    ("lr", None, r"it has no lr, and nothing was loaded"),
])
def test_param_group_hyperparameters_that_cannot_be_stepped_with_are_refused_on_load(source, key, value, said):
    # torch.optim loads a param group's values as they are: a string lr failed at the next step with "can't multiply
    # sequence by non-int", a negative lr was stepped with (the constructor refuses it), a missing one was a KeyError
    saved, target = _adamw_and_meta_checkpoints()
    group = saved[source]["param_groups"][0]
    if value is None:
        del group[key]
    else:
        group[key] = value
    with pytest.raises(ValueError, match=r"the checkpoint's param group 0: " + said):
        target.load_state_dict(saved[source])
    assert target.param_groups[0]["lr"] == 1e-2 and target._steps == [1] * 6


def test_float64_moments_and_float_step_counts_of_an_adamw_checkpoint_load_as_adamw_loads_them():
    # what torch.optim.AdamW itself loads (moments of another floating dtype, cast; a step count as a float) still
    # loads, and the run goes on as AdamW's
    batches = regression_batches()
    model, twin = mlp(0), mlp(0)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, adamw, batches, 3, meta_every=10**9, loss_fn=mse)
    sd = copy.deepcopy(adamw.state_dict())
    for st in sd["state"].values():
        st.update(exp_avg=st["exp_avg"].double(), exp_avg_sq=st["exp_avg_sq"].double(), step=float(st["step"]))
    twin.load_state_dict(model.state_dict())
    meta = MetaAdamW(twin.named_parameters(), alpha_range=0.0, beta_range=0.0, **small_kwargs())
    meta.load_state_dict(sd)
    assert meta._steps == [3] * 6 and all(st["exp_avg"].dtype == torch.float32 for st in meta.state.values())
    _train(model, adamw, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    _train(twin, meta, batches, 3, start=3, meta_every=10**9, loss_fn=mse)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value, shown", [(None, "None"), ("3", "'3'"), (2.5, "2.5"), (-1, "-1"), (True, "True"),
                                          (torch.tensor(2.5), r"tensor\(2\.5000\)"),
                                          (torch.tensor([3, 3]), r"tensor\(\[3, 3\]\)")])
def test_meta_state_step_counts_of_a_wrong_kind_are_refused_naming_index_and_value(value, shown):
    # the meta state's per-tensor step counts were checked for their number alone: a tensor without moments takes
    # its count from there, and None failed the next meta_step with a bare "unsupported operand type(s) for +:
    # 'NoneType' and 'int'" (its bias correction), while a string or a float was kept as the count
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    b1, b2, val = regression_batches(3)
    opt.zero_grad()
    mse(model, b1).backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = {}  # (0.weight without moments: its count is the meta state's)
    sd["metaadamw"]["steps"][0] = value
    target = MetaAdamW(model.named_parameters(), **small_kwargs())
    with pytest.raises(ValueError, match=r"does not fit this optimizer, and nothing was loaded: steps\[0\] " + shown
                                         + r" for 0\.weight \(expected its AdamW step count, an integer >= 0\)"):
        target.load_state_dict(sd)
    assert target._steps == [0] * 6 and target.global_step == 0
    sd["metaadamw"]["steps"][0] = 0  # (a valid count loads, and the meta-update runs from it)
    target.load_state_dict(sd)
    assert target._steps == [0, 1, 1, 1, 1, 1]
    assert not target.meta_step(model, mse, b1, b2, val).skipped


def _checkpoint_with_a_tensor_without_moments() -> tuple[torch.nn.Module, dict]:
    """A MetaAdamW checkpoint after one step whose tensor 0 has no moments (its count is the meta state's)."""
    model = mlp(0)
    opt = MetaAdamW(model.named_parameters(), **small_kwargs())
    opt.zero_grad()
    mse(model, regression_batches(3)[0]).backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = {}
    return model, sd


@pytest.mark.parametrize("value", [3.0, np.int64(3), np.float64(3.0), torch.tensor(3), torch.tensor(3.0),
                                   torch.tensor([3.0])])
def test_meta_state_step_counts_in_the_forms_a_tensors_step_takes_load_as_integers(value):
    # the per-entry check of the meta state's step counts took integers alone, refusing checkpoints that loaded
    # before it and that a tensor's own "step" is accepted in (an integral float, a one-element tensor as AdamW saves
    # it): they load, as ints
    model, sd = _checkpoint_with_a_tensor_without_moments()
    sd["metaadamw"]["steps"] = [value] + sd["metaadamw"]["steps"][1:]
    target = MetaAdamW(model.named_parameters(), **small_kwargs())
    target.load_state_dict(sd)
    assert target._steps == [3, 1, 1, 1, 1, 1] and all(type(s) is int for s in target._steps)
    target.zero_grad()
    mse(model, regression_batches(3)[1]).backward()
    target.step()
    assert target._steps == [1, 2, 2, 2, 2, 2] and target.global_step == 2


@pytest.mark.parametrize("value, shown", [(None, "None"), ("no", "'no'"), (2, "2"), ({}, r"\{\}"),
                                          (torch.tensor([True, False]), r"tensor\(\[ True, False\]\)")])
def test_meta_state_statistics_flags_of_a_wrong_kind_are_refused_naming_index_and_value(value, shown):
    # the meta state's has_stats flags were checked for their number alone: None failed the next step() with a bare
    # "float() argument must be a string or a real number, not 'NoneType'", a tensor of several values with "Boolean
    # value of Tensor with more than one value is ambiguous", and a string counted as True
    model, sd = _checkpoint_with_a_tensor_without_moments()
    sd["metaadamw"]["has_stats"][1] = value
    target = MetaAdamW(model.named_parameters(), **small_kwargs())
    with pytest.raises(ValueError, match=r"does not fit this optimizer, and nothing was loaded: has_stats\[1\] "
                                         + shown + r" for 0\.bias \(expected True or False"):
        target.load_state_dict(sd)
    assert target._has_stats == [False] * 6 and target.global_step == 0


@pytest.mark.parametrize("value", [np.bool_(True), torch.tensor(True), 1])
def test_meta_state_statistics_flags_in_other_bool_forms_load_as_bools(value):
    model, sd = _checkpoint_with_a_tensor_without_moments()
    sd["metaadamw"]["has_stats"][1] = value
    target = MetaAdamW(model.named_parameters(), **small_kwargs())
    target.load_state_dict(sd)
    assert target._has_stats == [True] * 6 and all(type(h) is bool for h in target._has_stats)
    target.zero_grad()
    mse(model, regression_batches(3)[1]).backward()
    target.step()
    assert target.global_step == 2
