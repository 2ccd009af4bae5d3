"""Build the optimizer a trial config asks for: ``torch.optim.AdamW`` or ``MetaAdamW``."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from metaadamw import MetaAdamW
from metaadamw.weighting import IGNORE_FIXED_WEIGHTS, IGNORE_FORM, IGNORE_PRIORITIES

#: trial-config keys passed to MetaAdamW under the same name
METAADAMW_ARGS = (
    "alpha_range", "beta_range", "features", "time_step", "second_moment", "gating", "gate_l1", "grouping",
    "modulator_layers", "modulator_heads", "modulator_ff", "modulator_width", "modulator_init", "objective", "weighting",
    "weighting_form", "priorities", "fixed_weights", "meta_lr", "meta_weight_decay", "meta_optimizer",
    "meta_gradient", "refresh_every",
)


def build_optimizer(config: Mapping[str, Any], model: nn.Module, total_steps: int | None = None) -> torch.optim.Optimizer:
    common = dict(lr=config["lr"], betas=(config["beta1"], config["beta2"]), eps=config["eps"],
                  weight_decay=config["weight_decay"])
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), foreach=True, **common)
    kwargs = {key: config[key] for key in METAADAMW_ARGS}
    # a trial config always carries the task's priorities, fixed weights and weighting form; MetaAdamW
    # warns when a built-in weighting that does not use them is given them, so they are passed only to
    # the one that does - and to a weighting a user registered, which may use any
    if kwargs["weighting"] in IGNORE_PRIORITIES:
        kwargs.pop("priorities")
    if kwargs["weighting"] in IGNORE_FORM:
        kwargs.pop("weighting_form")
    if kwargs["weighting"] in IGNORE_FIXED_WEIGHTS:
        kwargs["fixed_weights"] = None
    return MetaAdamW(model.named_parameters(), model=model, total_steps=total_steps, **common, **kwargs)
