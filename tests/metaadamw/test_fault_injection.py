"""Failures inside step() and meta_step(): a refused call leaves the optimizer able to go on, and
going on gives what an optimizer that never saw the failure gives."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from metaadamw import MetaAdamW


def _setup(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = MetaAdamW(model.named_parameters(), modulator_layers=1, **kwargs)
    return model, opt


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _train_step(model, opt, seed):
    opt.zero_grad()
    _loss(model, _batch(seed)).backward()
    opt.step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bad", [(0.95, None), ("0.9", 0.999), (0.9, 1.5)])
def test_step_refused_for_bad_betas_leaves_the_optimizer_usable(foreach, bad):
    model, opt = _setup(foreach=foreach)
    _train_step(model, opt, 0)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    good = opt.param_groups[0]["betas"]
    opt.param_groups[0]["betas"] = bad
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 0: Invalid beta parameter"):
        _train_step(model, opt, 1)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert opt.global_step == 1
    opt.param_groups[0]["betas"] = good
    for seed in (1, 2):  # (the step after the fix failed with a TypeError: the plan kept the bad betas)
        _train_step(model, opt, seed)
        _train_step(twin_model, twin_opt, seed)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("meta_gradient", ["finite_difference", "exact"])
def test_an_infinite_validation_loss_at_theta_skips_the_meta_update(meta_gradient):
    # L(theta; val) = inf makes loss_decrease -inf; HUW's softplus of that signed term is a finite 0, so the
    # meta-loss was finite and the modulator was trained on the other terms without a word
    model, opt = _setup(meta_gradient=meta_gradient)
    _train_step(model, opt, 0)
    before = copy.deepcopy((opt.modulator.state_dict(), opt.weighting.state_dict(), opt.meta_optimizer.state_dict()))
    calls = []

    def loss_fn(m, batch):
        calls.append(batch)
        loss = _loss(m, batch)
        return loss * math.inf if len(calls) == 2 else loss  # call 2: the validation loss at theta

    record = opt.meta_step(model, loss_fn, _batch(10), _batch(11), _batch(12))
    assert calls[1] is not None and record.terms["loss_decrease"] == -math.inf
    assert record.skipped and "loss_decrease" in record.reason
    assert opt.meta_skipped == 1
    after = (opt.modulator.state_dict(), opt.weighting.state_dict(), opt.meta_optimizer.state_dict())
    for a, b in zip(before[:2], after[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert before[2]["state"].keys() == after[2]["state"].keys()


def _drop(*path):
    def damage(sd):
        for key in path[:-1]:
            sd = sd[key]
        del sd[path[-1]]
    return damage


def _set(value, *path):
    def damage(sd):
        for key in path[:-1]:
            sd = sd[key]
        sd[path[-1]] = value
    return damage


def _everything(opt):
    sd = opt.state_dict()
    return copy.deepcopy({**sd, "modulator": opt.modulator.state_dict(), "weighting": opt.weighting.state_dict()})


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("damage", [
    _drop("state", 0, "exp_avg_sq"),  # (loaded, then KeyError: every later step failed)
    _drop("metaadamw", "steps"),  # (the checkpoint's moments, modulator and meta-optimizer with the run's counters)
    _drop("metaadamw", "multipliers"),
    _set("7", "metaadamw", "global_step"),  # (every later step failed)
    _set({}, "metaadamw", "carry"),  # (loaded, then KeyError at the next step)
    _drop("metaadamw", "meta_optimizer", "state"),  # (torch.optim's KeyError, after the modulator was loaded)
], ids=["moment-without-pair", "no-steps", "no-multipliers", "global-step-str", "empty-carry", "meta-opt-no-state"])
def test_a_refused_load_of_a_damaged_checkpoint_leaves_the_optimizer_as_it_was(damage):
    model, opt = _setup(meta_optimizer="adam")
    for seed in range(3):
        _train_step(model, opt, seed)
    opt.meta_step(model, _loss, _batch(10), _batch(11), _batch(12))
    checkpoint = copy.deepcopy(opt.state_dict())
    model, opt = _setup(meta_optimizer="adam")  # another run, to load it into
    _train_step(model, opt, 5)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    before = _everything(opt)
    damage(checkpoint)
    with pytest.raises((ValueError, KeyError)):
        opt.load_state_dict(checkpoint)
    assert _same(before, _everything(opt))
    for seed in (6, 7):
        _train_step(model, opt, seed)
        _train_step(twin_model, twin_opt, seed)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
