"""MetaAdamW: AdamW with per-group multipliers from a meta-trained self-attentive modulator."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import math
import numbers
import operator
import re
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from metaadamw import FEATURES, GROUPINGS, OBJECTIVES, WEIGHTINGS
from metaadamw import distributed as D
from metaadamw import functional as F
from metaadamw.features import FeatureExtractor, GroupLayout, normalised_time
from metaadamw.grouping import EMBEDDING_TYPES, TensorInfo, assign_depths, is_bias, model_depths
from metaadamw.meta import (META_GRADIENTS, MetaRecord, _raised_on_every_rank, described, host_rng_states,
                            meta_update, project_weighting, set_host_rng_states)
from metaadamw.modulator import HEAD_INITS, Modulator, Multipliers
from metaadamw.objectives import TERM_ORDER
from metaadamw.registry import _caller_stacklevel
from metaadamw.weighting import FORMS, IGNORE_FIXED_WEIGHTS, IGNORE_FORM, IGNORE_PRIORITIES

META_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class MetaAdamW(torch.optim.Optimizer):
    r"""AdamW whose per-group learning rate and weight decay are scaled by a learned modulator.

    .. code-block:: text

        input: params theta, lr, (b1, b2), eps, weight decay wd, groups G (grouping strategy),
               modulator M (feature extractor -> Transformer encoder over groups -> head)
        for t = 1, 2, ...:
            g_t = grad of the loss                       (computed by the caller, as for AdamW)
            m_t = b1 m_{t-1} + (1 - b1) g_t ;  v_t = b2 v_{t-1} + (1 - b2) g_t^2
            x_G = features(g_t, m_t, v_t, theta_{t-1}, t)  for every group   (one token each)
            alpha_G, beta_G = M(x_G)    alpha = 1 + alpha_range (sigmoid(.) - 1/2), likewise beta
            theta_t = theta_{t-1} - lr alpha_g ( m_hat / (sqrt(v_hat) + eps) + beta_g wd theta_{t-1} )
        every K steps the caller runs meta_step(model, loss_fn, batch1, batch2, val_batch):
            g on batch1 at theta; theta' = one step as above (differentiable in alpha, beta);
            g' on batch2 at theta'; objective terms (gradient alignment, loss decrease,
            generalization gap) combined by a weighting; one step of the meta-optimizer on the
            modulator's parameters; the model is left exactly as it was.

    Args:
        params: what ``torch.optim.AdamW`` accepts - an iterable of parameters, of param-group
            dicts, or ``model.named_parameters()`` (names are needed by ``fine_grained``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults: the paper's Table 1).
        alpha_range, beta_range: ranges of the multipliers; 0 turns the modulation off (AdamW up
            to float rounding, about 1 ulp per step). In [0, 2], so that the multipliers stay positive.
        features: registered feature extractor (``metaadamw.FEATURES``).
        time_step, second_moment: add the normalised time step / second-moment norm features.
        gating, gate_l1: learnable sigmoid feature gates and their L1 penalty weight.
        grouping: registered grouping strategy (``metaadamw.GROUPINGS``).
        model: the model, for parameter names and module types when ``params`` has no names
            (held by a weak reference, also to name the tensors of groups added later).
        modulator_layers, modulator_heads, modulator_ff: encoder depth, heads, feed-forward width.
        modulator_width: model width; None = feature width zero-padded to a multiple of the heads.
        modulator_dropout: dropout inside the encoder during meta-updates.
        modulator_init: 'default' (PyTorch's init of the output head, as the paper's code: random
            multipliers of about 1 +- 0.2 from the start) or 'zero' (head at zero: alpha = beta = 1
            until the first meta-update, i.e. AdamW up to float rounding).
        objective: registered meta objective (``metaadamw.OBJECTIVES``).
        weighting, weighting_form: registered loss weighting and its HUW form
            ('regression' or 'classification'; 'sum' and 'fixed' have none, and warn when given
            'classification').
        priorities: HUW priorities [gradient alignment, loss decrease, generalization gap].
        fixed_weights: weights of the 'fixed' weighting, same order (None: 1.0 each).
        meta_lr, meta_weight_decay: the meta-optimizer's learning rate and weight decay.
        meta_optimizer: 'sgd' (the paper's Algorithm 2), 'adam', 'adamw', or a callable
            ``f(params, lr=..., weight_decay=...) -> torch.optim.Optimizer``.
        meta_gradient: how the meta-update differentiates through g' (the gradient-alignment
            term): 'finite_difference' (default; the Hessian-vector product as a difference of two
            first-order gradients, one extra forward and backward pass) or 'exact' (double
            backward through the model, as the paper; about 1.4x the meta-update's time).
        refresh_every: recompute the multipliers every k steps (1 = every step, the paper).
        total_steps: training length, used to normalise the time-step feature (else t/(t+1000)).
        foreach: use the fast foreach implementation (default) or the readable single-tensor one.
        sync_meta: under ``torch.distributed`` (a default process group of several ranks, e.g.
            with DistributedDataParallel): every rank starts from rank 0's modulator and every
            meta-update averages the meta-gradients over the ranks, so that the replicas keep
            one modulator and get the same multipliers (see :mod:`metaadamw.distributed`). On
            whenever a default process group of several ranks exists: make the optimizer on every
            rank. False: each rank keeps the modulator it built (nothing is broadcast) and trains
            its own, and under DDP the replicas then drift apart from the first step (their
            multipliers differ) unless every rank builds the optimizer from the same random seed
            and meta-steps on the same batches with the same random streams.

    AdamW's own flags ``amsgrad``, ``maximize``, ``capturable``, ``differentiable`` and ``fused``
    are accepted at their defaults (False, or None for ``fused``), so that AdamW call sites that
    spell them out work unchanged; other values are refused with an error that says why. Also
    not supported: sparse gradients, of any sparse layout (COO, as ``nn.Embedding(sparse=True)``
    makes them, or CSR, CSC, BSR, BSC): step() and meta_step() refuse the first one, before anything
    changes, and name its parameter (with ``model=``, also the sparse layer whose weight it is; such
    a layer is not refused when the optimizer is made, since a weight that is frozen, or also used
    densely - tied to an output projection, or called directly in forward - gets no gradient or a
    dense one), gradients of the other non-strided layouts (``torch._mkldnn``, ``torch.jagged``: those
    of a parameter of that layout; refused alike, worded by layout), complex parameters, and
    parameters spread over several devices.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        alpha_range: float = 1.0,
        beta_range: float = 1.0,
        features: str = "basic",
        time_step: bool = True,
        second_moment: bool = True,
        gating: bool = False,
        gate_l1: float = 1e-3,
        grouping: str = "fine_grained",
        model: nn.Module | None = None,
        modulator_layers: int = 8,
        modulator_heads: int = 6,
        modulator_ff: int = 16,
        modulator_width: int | None = None,
        modulator_dropout: float = 0.0,
        modulator_init: str = "default",
        objective: str = "combined",
        weighting: str = "huw_priority",
        weighting_form: str = "regression",
        priorities: Sequence[float] = (1.0, 1.0, 1.0),
        fixed_weights: Sequence[float] | None = None,
        meta_lr: float = 1e-4,
        meta_weight_decay: float = 0.0,
        meta_optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        meta_gradient: str = "finite_difference",
        refresh_every: int = 1,
        total_steps: int | None = None,
        foreach: bool | None = None,
        sync_meta: bool = True,
    ):
        lr, betas, eps, weight_decay = _check_adamw_args(lr, betas, eps, weight_decay)
        _check_adamw_flags("", amsgrad=amsgrad, maximize=maximize, capturable=capturable, differentiable=differentiable,
                           fused=fused)
        alpha_range = _number("alpha_range", alpha_range, 0.0, 2.0, "so that alpha stays positive")
        beta_range = _number("beta_range", beta_range, 0.0, 2.0, "so that beta stays positive")
        for name, value in (("modulator_layers", modulator_layers), ("modulator_heads", modulator_heads),
                            ("modulator_ff", modulator_ff)):
            _check(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(modulator_width is None or (_is_int(modulator_width) and modulator_width >= 1),
               f"modulator_width must be None or an integer >= 1, got {modulator_width!r}")
        # (numpy integers are integers: stored as Python ints, as the float options are stored as floats)
        modulator_layers, modulator_heads, modulator_ff = int(modulator_layers), int(modulator_heads), int(modulator_ff)
        modulator_width = None if modulator_width is None else int(modulator_width)
        refresh_every, total_steps, meta_gradient = (
            _check_run_setting(name, value) for name, value in (
                ("refresh_every", refresh_every), ("total_steps", total_steps), ("meta_gradient", meta_gradient)))
        modulator_dropout = _number("modulator_dropout", modulator_dropout, 0.0, 1.0, below_high=True)
        meta_lr = _number("meta_lr", meta_lr, 0.0, math.inf, above_low=True)
        _check(modulator_init in HEAD_INITS, f"modulator_init must be one of {HEAD_INITS}, got {modulator_init!r}")
        meta_weight_decay = _number("meta_weight_decay", meta_weight_decay, 0.0, math.inf)
        gate_l1 = _number("gate_l1", gate_l1, 0.0, math.inf)
        _check(weighting_form in FORMS, f"weighting_form must be one of {FORMS}, got {weighting_form!r}")
        for name, values in (("priorities", priorities), ("fixed_weights", fixed_weights)):
            if values is not None or name == "priorities":  # (fixed_weights=None: the weighting has none)
                ok = (not isinstance(values, (str, bytes, dict)) and hasattr(values, "__len__") and len(values) == 3
                      and all(_real(v) and math.isfinite(v) and v >= 0 for v in values))
                _check(ok, f"{name} must be three finite non-negative numbers [gradient alignment, loss decrease, "
                           f"generalization gap], got {values!r}")
        for name, value in (("time_step", time_step), ("second_moment", second_moment), ("gating", gating),
                            ("sync_meta", sync_meta)):
            _check(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        _check(foreach is None or isinstance(foreach, bool), f"foreach must be None, True or False, got {foreach!r}")
        _check(model is None or isinstance(model, nn.Module),
               f"model must be the torch.nn.Module whose parameters these are (for their names), got a "
               f"{type(model).__name__}")
        _check(callable(meta_optimizer) or meta_optimizer in META_OPTIMIZERS,
               f"meta_optimizer must be one of {sorted(META_OPTIMIZERS)} or a callable, got {meta_optimizer!r}")
        if weighting in IGNORE_FIXED_WEIGHTS and fixed_weights is not None:
            warnings.warn(f"MetaAdamW: fixed_weights={list(fixed_weights)} is ignored: only weighting='fixed' uses it "
                          f"(weighting={weighting!r})", stacklevel=2)
        if weighting in IGNORE_FORM and weighting_form != "regression":  # (the default: said by nobody)
            warnings.warn(f"MetaAdamW: weighting_form={weighting_form!r} is ignored: only the uncertainty weightings "
                          f"('huw', 'huw_priority') have a form (weighting={weighting!r})", stacklevel=2)
        if weighting in IGNORE_PRIORITIES and [float(p) for p in priorities] != [1.0, 1.0, 1.0]:
            warnings.warn(f"MetaAdamW: priorities={list(priorities)} are ignored: only weighting='huw_priority' uses "
                          f"them (weighting={weighting!r})", stacklevel=2)
        feature_cls = FEATURES.get(features)
        GROUPINGS.get(grouping)  # (an unknown name is refused here, before anything is built)
        OBJECTIVES.get(objective)
        weighting_cls = WEIGHTINGS.get(weighting)
        for kind, name in (("features", features), ("grouping", grouping), ("objective", objective),
                           ("weighting", weighting)):  # (a user's component: named, not a bare TypeError)
            problem = component_signature_problem(kind, name)
            if problem:
                raise TypeError(f"MetaAdamW: {problem}")
        objective_obj = _make_objective(objective)

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        _prepare_eager_step()

        self.config = dict(
            alpha_range=alpha_range, beta_range=beta_range, features=features, time_step=time_step,
            second_moment=second_moment, gating=gating, gate_l1=gate_l1, grouping=grouping,
            modulator_layers=modulator_layers, modulator_heads=modulator_heads, modulator_ff=modulator_ff,
            modulator_width=modulator_width, modulator_dropout=modulator_dropout, modulator_init=modulator_init,
            objective=objective,
            weighting=weighting, weighting_form=weighting_form, priorities=[float(x) for x in priorities],
            fixed_weights=None if fixed_weights is None else [float(x) for x in fixed_weights], meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay, meta_gradient=meta_gradient, refresh_every=refresh_every,
            total_steps=total_steps,
        )
        self.foreach = True if foreach is None else bool(foreach)

        self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._group_sizes = [len(g["params"]) for g in self.param_groups]  # (with _params: each tensor's group)
        self._check_params(self._params)
        self.device = self._params[0].device
        self._model_ref = None if model is None else weakref.ref(model)
        names = [n for g in self.param_groups for n in g.get("param_names") or ()]
        names += [n for n, _ in model.named_parameters()] if model is not None else []
        _check_not_sharded(["parameters of an FSDP-wrapped model"] if any(
            "_fsdp_wrapped_module" in n.split(".") for n in names) else [])
        self.tensor_info, self.group_names, self._group_of, self.layout = self._grouped(self._params, model)
        # the initial modulator comes from a fork of the global random stream: torch.manual_seed fixes it,
        # and the caller's stream (dropout masks, data order) is left as torch.optim leaves it
        with _forked_rng(self.device):
            extractor = feature_cls(self.layout, time_step=time_step, second_moment=second_moment)
            _check(isinstance(extractor, FeatureExtractor),
                   f"features {features!r} gave {extractor!r}, which is not a feature extractor: subclass "
                   f"metaadamw.features.FeatureExtractor and register the class")
            self.modulator = Modulator(
                extractor, layers=modulator_layers, heads=modulator_heads, ff=modulator_ff, width=modulator_width,
                dropout=modulator_dropout, gating=gating, gate_l1=gate_l1, alpha_range=alpha_range,
                beta_range=beta_range, head_init=modulator_init,
            ).to(device=self.device, dtype=torch.float32)  # float32 whatever the default dtype, like the statistics
            self.modulator.eval()  # train mode (dropout) only inside meta-updates
            self.objective = objective_obj
            made = weighting_cls(
                objective_obj.terms, objective_obj.signed_terms, priorities=priorities, weights=fixed_weights,
                form=weighting_form,
            )
            _check(isinstance(made, nn.Module), f"weighting {weighting!r} gave {made!r}, which is not a loss weighting: "
                                                f"subclass metaadamw.Weighting (an nn.Module: its log-variances are "
                                                f"meta-parameters) and register the class")
            self.weighting = made.to(device=self.device, dtype=torch.float32)
        if isinstance(meta_optimizer, str):  # the modulator has many small tensors: foreach also on the CPU
            make = functools.partial(META_OPTIMIZERS[meta_optimizer], foreach=True)
        else:
            make = meta_optimizer
        try:
            self.meta_optimizer = make(self.meta_parameters(), lr=meta_lr, weight_decay=meta_weight_decay)
        except TypeError as err:
            if isinstance(meta_optimizer, str):
                raise
            raise ValueError(f"meta_optimizer={meta_optimizer!r} could not be called as f(params, lr=meta_lr, "
                             f"weight_decay=meta_weight_decay) ({err}): give it those keyword arguments, e.g. "
                             f"lambda params, lr, weight_decay: torch.optim.RMSprop(params, lr=lr)") from err
        _check(isinstance(self.meta_optimizer, torch.optim.Optimizer),
               f"meta_optimizer={meta_optimizer!r} returned a {type(self.meta_optimizer).__name__}, not a "
               f"torch.optim.Optimizer: a callable meta_optimizer is called as f(params, lr=meta_lr, "
               f"weight_decay=meta_weight_decay) and must return the optimizer of those parameters")
        self.sync_meta = bool(sync_meta)

        n = len(self._params)
        self._steps = [0] * n  # AdamW step count of every tensor
        self.global_step = 0  # step() calls that updated at least one tensor
        self.meta_updates = 0
        self._synced_world = 1  # the world size whose ranks hold rank 0's modulator (see _ensure_meta_synced)
        self._unsynced_from = (0, 0)  # (global_step, meta_updates) when made, loaded or unpickled
        self._ensure_meta_synced()
        self.meta_skipped = 0
        self._time = torch.zeros((), dtype=torch.int64, device=self.device)  # (a float32 count stops at 2^24)
        self._carry = {  # ||m_{t-1}||^2 and sum(v_{t-1}) per tensor, valid when computed last step
            "exp_avg_norm_sq": torch.zeros(n, dtype=torch.float32, device=self.device),
            "v_sum": torch.zeros(n, dtype=torch.float32, device=self.device),
        }
        self._carry_valid = True  # zero moments: the zero carry is exact
        self._stats: dict[str, Tensor] = {}
        self._has_stats = [False] * n  # per tensor: _stats holds its statistics (not zeros standing in)
        self._carried: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # the moments the carry describes
        self._versions: list[tuple[int, int] | None] = [None] * n  # their version counters then (None: unknown)
        self._multipliers: Multipliers | None = None
        self._plan: _Plan | None = None
        self._live: tuple[bool, ...] | None = None  # the tensors the features average over (_set_live)

    # settings a run may change between steps; kept in ``config``, which checkpoints save
    refresh_every = property(lambda self: self.config["refresh_every"],
                             lambda self, value: self._set_run_setting("refresh_every", value),
                             doc="Recompute the multipliers every k steps (1: every step, as the paper).")
    total_steps = property(lambda self: self.config["total_steps"],
                           lambda self, value: self._set_run_setting("total_steps", value),
                           doc="Training length, which normalises the time-step feature (None: t / (t + 1000)).")
    meta_gradient = property(lambda self: self.config["meta_gradient"],
                             lambda self, value: self._set_run_setting("meta_gradient", value),
                             doc="'finite_difference' or 'exact': how meta_step differentiates through g'.")

    def _set_run_setting(self, name: str, value: Any) -> None:
        self.config[name] = _check_run_setting(name, value)

    # ------------------------------------------------------------------------------------------
    # construction helpers

    def _check_params(self, params: list[Tensor]) -> None:
        _check_not_sharded(["a shard of the parameters from ZeroRedundancyOptimizer"]
                           if D.made_by_zero_redundancy_optimizer() else [])
        _check(bool(params), "MetaAdamW got no parameters (its param groups are all empty): the modulator's groups come "
                             "from the parameters, so build the optimizer once there are parameters to train (frozen "
                             "ones may be included: they are not updated while they have no gradient)")
        _check(len({id(p) for p in params}) == len(params),
               "a parameter tensor appears more than once in the optimizer's param groups (e.g. from "
               "named_parameters(remove_duplicate=False) with tied weights): give each tensor once, as torch.optim "
               "will require (AdamW would step it twice per step)")
        devices = {p.device for p in params}
        _check(len(devices) == 1, f"MetaAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        _check(next(iter(devices)).type != "meta",
               "MetaAdamW got parameters on the 'meta' device, which have no values: its modulator and statistics "
               "need real tensors. Materialise the model first (model.to_empty(device=...) and initialise its "
               "weights, or load them), then build the optimizer")
        # (FSDP's use_orig_params=True hands out views of its flat parameter, marked _fsdp_flattened)
        _check_not_sharded(sorted({"DTensor" if type(p).__name__ == "DTensor" else "FSDP's flat parameter"
                                   if getattr(p, "_is_flat_param", False) else "parameters of an FSDP-wrapped model"
                                   for p in params if type(p).__name__ == "DTensor" or getattr(p, "_is_flat_param", False)
                                   or getattr(p, "_fsdp_flattened", False)}))
        for p in params:
            _check(not p.is_complex(), "MetaAdamW does not support complex parameters; view them as real "
                                       "(torch.view_as_real) first")
            _check(p.is_floating_point(), f"MetaAdamW can only optimize floating-point tensors, got {p.dtype}")

    def _grouped(self, params: list[Tensor], model: nn.Module | None
                 ) -> tuple[list[TensorInfo], list[str], list[int], GroupLayout]:
        """The tensors' infos, the group names (in order of first appearance), every tensor's group
        index (a host copy: step() reads nothing back) and the layout the extractor reads."""
        infos = self._tensor_info(model)
        grouping = self.config["grouping"]
        group_of_tensor = GROUPINGS.get(grouping)(infos)
        _check(isinstance(group_of_tensor, (list, tuple)) and len(group_of_tensor) == len(infos)
               and all(isinstance(n, str) for n in group_of_tensor),
               f"grouping {grouping!r} must return one group name (a str) per parameter tensor, {len(infos)} in "
               f"all, got {described(group_of_tensor)}")
        names = list(dict.fromkeys(group_of_tensor))
        group_of = [names.index(n) for n in group_of_tensor]
        layout = GroupLayout(
            names=names,
            tensor_group=torch.tensor(group_of, device=self.device),
            numel=torch.tensor([float(p.numel()) for p in params], dtype=torch.float32, device=self.device),
            is_bias=torch.tensor([float(is_bias(t)) for t in infos], dtype=torch.float32, device=self.device),
            depth=torch.tensor([t.depth for t in assign_depths(infos)], dtype=torch.float32, device=self.device),
        )
        return infos, names, group_of, layout

    def _tensor_info(self, model: nn.Module | None) -> list[TensorInfo]:
        held = [(gi, p, name) for gi, group in enumerate(self.param_groups)
                for p, name in zip(group["params"], group.get("param_names") or [None] * len(group["params"]))]
        by_id: dict[int, tuple[str, type]] = {}  # in registration order: the first name of each parameter
        depths: dict[int, float] = {}
        if model is not None:
            types: dict[str, type] = {}
            owners: dict[int, tuple[int, str, type]] = {}  # (the place in registration order, the name, the type)
            places = itertools.count()
            for mod_name, module in model.named_modules(remove_duplicate=False):
                types.setdefault(mod_name, type(module))
                for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
                    # a tensor two modules share keeps the name of the first that holds it (named_parameters' and
                    # the state dict's), but an embedding's weight tied to an output Linear is of the embedding's type
                    # and place, wherever the Linear stands (a head registered before the embedding made the tied
                    # weight feed_forward/deep and moved the other tensors' depths)
                    name, owner = _grouping_name(mod_name, pname, types)
                    place, first = next(places), owners.get(id(p))
                    if first is None:
                        owners[id(p)] = (place, name, owner)
                    elif issubclass(owner, EMBEDDING_TYPES) and not issubclass(first[2], EMBEDDING_TYPES):
                        owners[id(p)] = (place, first[1], owner)
            by_id = {k: (name, owner) for k, (_, name, owner) in sorted(owners.items(), key=lambda kv: kv[1][0])}
            if not any(id(p) in by_id for _, p, _ in held):
                raise ValueError(
                    f"model= is a {type(model).__name__} that holds none of the optimizer's parameters (a copy of the "
                    f"model, such as an EMA model, or another instance of it?): pass the module whose parameters "
                    f"these are, or leave model= out")
            # the model's parameters in registration order; the optimizer's tensors that the model does
            # not hold (a learnable temperature, a separate head) among themselves, in its order, so
            # that they cannot move the model's tensors to other buckets
            depths = model_depths({k: name for k, (name, _) in by_id.items()})
            depths.update(model_depths({id(p): name for _, p, name in held if id(p) not in by_id}))
        infos = []
        for i, (gi, p, name) in enumerate(held):
            known = by_id.get(id(p))
            # the model's full dotted name where it has one: names in a param group may be
            # relative to a submodule (a group of model.encoder.named_parameters())
            infos.append(TensorInfo(
                index=i, param_group=gi, name=known[0] if known else _unparametrized(name), shape=tuple(p.shape),
                module_type=known[1] if known else None,
                depth=depths.get(id(p)),  # None without model=: relative to the optimizer's tensors
            ))
        return infos

    def _described_tensor(self, i: int) -> str:
        """Tensor ``i`` (in the optimizer's flat order), named for an error about its gradient: its
        name, and with ``model=`` the layers that make it sparse gradients, whatever name it is also
        registered under (``self.w = self.emb.weight`` names it 'w'). An unnamed one (params given as
        a plain list, or dict groups without names) by its index, param group, position in that group
        and shape: the flat index alone does not point at a tensor of a plain list of groups."""
        info = self.tensor_info[i]
        position = i - sum(self._group_sizes[:info.param_group])
        named = (f"parameter {info.name!r}" if info.name else
                 f"parameter {i} (param group {info.param_group}, position {position}, shape {info.shape})")
        model = self._model_ref() if self._model_ref is not None else None
        layers = _sparse_layers_of(self._params[i], model)
        return named + (f", the weight of the model's layer {', '.join(layers)}," if layers else "")

    def _grouped_with_model(self) -> bool:
        """Whether the groups were made with ``model=`` (its module types; kept by copies, which have no model)."""
        return any(t.module_type is not None for t in self.tensor_info)

    def meta_parameters(self) -> list[nn.Parameter]:
        """Everything the meta-optimizer trains: the modulator (encoder, head, gates, group
        embeddings) and the weighting's log-variances."""
        return list(self.modulator.parameters()) + list(self.weighting.parameters())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group`` (e.g. layers unfrozen while fine-tuning), also
        after construction: the new tensors join the modulator's groups as the grouping strategy
        places them (new groups are new tokens), start with zero moments and step count, and the
        next ``step()`` recomputes the multipliers. Names for ``fine_grained`` come from the group
        (``named_parameters()``) or from the ``model=`` given at construction (with which the depth
        buckets are the whole model's: existing tensors keep their groups). Refused, leaving the
        optimizer as it was, when the extractor cannot follow a change of the groups (``enhanced``
        learns an embedding per group). To resume from a checkpoint, add the same groups in the same
        order before ``load_state_dict``, as with any torch optimizer."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        # (during construction torch.optim hands every group over as a dict)
        where = f"param group {len(self.param_groups)}: "
        # AdamW honours its flags per group too: here they are refused in a group as in the arguments
        _check_adamw_flags(where, **{k: v for k, v in param_group.items() if k in _ADAMW_FLAGS})
        _check_decoupled(where, {"weight_decay": self.defaults["weight_decay"], **param_group})
        for key in _TORCH_FLAGS:  # (at their defaults: not MetaAdamW's options, and torch.compile on CUDA sets a
            param_group.pop(key, None)  # group's capturable key to True, which step() would refuse)
        if any(k in param_group for k in ("lr", "betas", "eps", "weight_decay")):
            # the group's own hyperparameters, checked as the arguments are (AdamW checks only the defaults)
            values = {k: param_group.get(k, self.defaults[k]) for k in ("lr", "betas", "eps", "weight_decay")}
            lr, betas, eps, weight_decay = _check_adamw_args(**values, where=where)
            # in the caller's dict, as torch.optim keeps it: a script that edits its group dicts reaches the optimizer
            param_group.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if not hasattr(self, "layout"):  # during construction
            super().add_param_group(param_group)
            return
        n_before = len(self._params)
        super().add_param_group(param_group)
        try:
            self._adopt_added_tensors(n_before)
        except BaseException:
            self.param_groups.pop()  # as it was
            raise

    def _adopt_added_tensors(self, n_before: int) -> None:
        """Regroup with the tensors of the param group just added (after ``n_before`` others)."""
        params = [p for g in self.param_groups for p in g["params"]]
        self._check_params(params)
        model = self._model_ref() if self._model_ref is not None else None
        infos, names, group_of, layout = self._grouped(params, model)
        extractor = self.modulator.extractor
        width = extractor.width
        extractor.set_layout(layout)  # the last check: it may refuse
        new_width = extractor.width
        if new_width != width:  # (columns that follow the groups: the next step failed, its error contradicting itself)
            extractor.set_layout(self.layout)
            raise ValueError(
                f"features={self.config['features']!r} ({type(extractor).__name__}) is {width} features wide with the "
                f"groups {self.group_names} and {new_width} with {names}, but the modulator's input width is "
                f"fixed when the optimizer is made: keep its columns() independent of the groups, have its set_layout "
                f"refuse the change with a ValueError, or create the optimizer with every param group")
        self._params, self.tensor_info, self.group_names, self._group_of, self.layout = (
            params, infos, names, group_of, layout)
        self._group_sizes = [len(g["params"]) for g in self.param_groups]
        added = len(params) - n_before
        self._steps += [0] * added
        zeros = torch.zeros(added, dtype=torch.float32, device=self.device)
        # zero moments: the carried norms of the new tensors are exactly zero; so are their last statistics
        self._carry = {k: torch.cat([v, zeros]) for k, v in self._carry.items()}
        self._stats = {k: torch.cat([v, zeros]) for k, v in self._stats.items()}
        self._has_stats += [False] * added
        self._versions += [None] * added
        self._multipliers = None  # the groups may have changed: the next step recomputes them
        self._plan = None
        self._live = None  # (the features' live tensors: recomputed with the plan)

    # ------------------------------------------------------------------------------------------
    # the step

    @property
    def multipliers(self) -> Multipliers | None:
        """The per-group multipliers used by the last step (None before the first step)."""
        return self._multipliers

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MetaAdamW step. Never reads a value back to the host.

        Runs eagerly inside ``torch.compile``d code (a graph break): Dynamo drops assignments to
        an optimizer's attributes, so a compiled step would lose its step count, multipliers and
        statistics without an error. (Only there: ``torch.compiler.disable``'s wrapper would cost
        every eager step ~6 us.) Runs in full precision inside ``torch.autocast`` (the closure, if
        any, in the caller's autocast)."""
        if torch.compiler.is_compiling():
            return _EAGER_STEP(self, closure)
        return self._step_with_closure(closure)

    @torch.no_grad()
    def _step_with_closure(self, closure: Callable[[], Any] | None) -> Any:
        self._check_device()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        states = F.autocast_states(self.device)
        if states:
            with F.autocast(states, enabled=False):
                self._step()
        else:
            self._step()
        return loss

    def _check_device(self) -> None:
        """Refuse a model moved to another device since the optimizer was built (``model.to(device)``
        moves its tensors in place): the modulator, statistics and layout live on the first one."""
        if self._params[0].device != self.device:
            raise RuntimeError(
                f"the parameters are on {self._params[0].device}, but MetaAdamW was built when they were on "
                f"{self.device}, where its modulator, statistics and layout live: the model was moved after the "
                f"optimizer was built. Build the optimizer after model.to(device), as torch.optim advises for every "
                f"optimizer")

    def _check_tensors_unchanged(self) -> None:
        """Refuse tensors put into, replaced in or moved between ``param_groups[i]["params"]`` by
        hand: MetaAdamW groups, names and tracks its tensors when they are given (``torch.optim.AdamW``
        would step them as they are now, so silently stepping them as they were is no option). One identity test per tensor, on
        the host: about as cheap as reading the tensors' ``.grad``."""
        sizes = [len(g["params"]) for g in self.param_groups]
        if sizes == self._group_sizes and all(map(operator.is_, itertools.chain.from_iterable(
                g["params"] for g in self.param_groups), self._params)):
            return
        held = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        if sum(sizes) == len(self._params) and all(map(operator.is_, held, self._params)):
            raise RuntimeError(
                f"the tensors were moved between the optimizer's param_groups by hand (their sizes were "
                f"{self._group_sizes}, now {sizes}): MetaAdamW fixes each tensor's group when it is given - the lr, "
                f"betas, eps and weight decay it steps with, and with grouping='original' its modulator group. Build a "
                f"new optimizer with the new groups (torch.optim.AdamW would step each tensor with its new group's "
                f"values; MetaAdamW refuses rather than keep the old ones)")
        raise RuntimeError(
            "the tensors in the optimizer's param_groups are no longer those MetaAdamW was given: tensors were "
            "added to, removed from or replaced in param_groups[i]['params'] by hand. Add tensors with "
            "optimizer.add_param_group({'params': ...}) (which groups them for the modulator and starts their "
            "moments), or build a new optimizer")

    def _step(self) -> None:
        """The step. The one-time modulator broadcast (``_ensure_meta_synced``, under ``torch.distributed``)
        runs before ``check_dense`` on purpose, and is harmless to a rank that then refuses a gradient: it is a
        collective every rank must enter alike (a rank that raised before it left the others waiting in it until
        the process group failed), and all it changes there is what any first step there changes - the
        modulator becomes rank 0's, recorded as synced - while the step count, moments and parameters stay as they
        were; a retry with dense gradients then steps without a second broadcast, as the other ranks do."""
        self._check_tensors_unchanged()
        self._ensure_meta_synced()  # (an optimizer made before the process group: at its first step there)
        grads = [p.grad for p in self._params]
        active = tuple(g is not None for g in grads)
        if not any(active):
            return
        F.check_dense(grads, self._described_tensor)  # every step: a host attribute per tensor, no sync
        for k, group in enumerate(self.param_groups):  # (set on a group after it was checked: AdamW honours them)
            if any(map(group.get, _ADAMW_FLAGS)) or group.get("decoupled_weight_decay") is False:
                _check_adamw_flags(f"param group {k}: ", **{name: group.get(name) for name in _ADAMW_FLAGS})
                _check_decoupled(f"param group {k}: ", group)
            # an lr or betas set as tensors: refused as in a param group given to the constructor (the betas
            # failed with "Expected packed scalar Tensor to be of dimension 1", a tensor lr was read back)
            if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
                _check_adamw_args(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                  where=f"param group {k}: ")
        plan = self._plan
        # a scheduler may change them (the plan caches them), also in place (a list): compared as copies
        betas = [tuple(g["betas"]) for g in self.param_groups]
        if plan is None or plan.betas != betas:  # (new betas: checked before anything changes, as AdamW's args)
            for k, pair in enumerate(betas):
                _check_betas(pair, where=f"param group {k}: ")
        if plan is not None and not self._plan_state_current(plan):
            self._carry_valid = False  # the moments' norms carried from the last step are not those of the state
            plan = None
        if plan is None or plan.active != active or not plan.blocking.valid():
            plan = self._make_plan(active)
        elif plan.betas != betas:
            self._update_plan_betas(plan)
        for i in plan.indices:
            self._steps[i] += 1
        plan.step_counts.add_(1.0)  # the tensors' state[p]["step"] (on the CPU, as AdamW's: no sync)
        plan.step_version = _version_of(plan.step_counts)  # (any later change to them is the caller's)
        for b in plan.buckets:
            b.step = self._steps[b.indices[0]]
            group = self.param_groups[b.param_group]
            b.lr, b.weight_decay, b.eps = group["lr"], group["weight_decay"], group["eps"]
        self.global_step += 1
        self._time += 1
        grads = [grads[i] for i in plan.indices] if not plan.all_active else grads

        refresh = self._multipliers is None or (self.global_step - 1) % self.refresh_every == 0
        if refresh and self.foreach and self._carry_valid and self._moments_edited(plan):
            self._carry_valid = False
        if refresh and self.foreach and not self._carry_valid:
            self._recompute_carry()
        norms = None
        if self.foreach:  # run by run (cache blocking on the CPU; else one run per param_group)
            groups, bl = self.param_groups, plan.blocking
            with_params = "param_norm" in self.modulator.extractor.required_stats
            runs = [(sl, *groups[pg]["betas"]) for pg, sl in bl.runs]
            norms = F.foreach_moments_and_norms(runs, bl.pieces(grads), bl.exp_avgs, bl.exp_avg_sqs,
                                                bl.params if with_params else None, refresh, plan.narrow)
            if norms is not None:
                norms = bl.combine_norms(norms, 3 if with_params else 2)
        else:
            for pg, sl in plan.param_group_slices:
                group = self.param_groups[pg]
                F.single_tensor_moments(grads[sl], plan.exp_avgs[sl], plan.exp_avg_sqs[sl], *group["betas"])
        if refresh:
            self._update_stats(plan, grads, norms)
            if F.takes_cpu_routes(self.device):  # the same value from the host's step count, in one op
                time = torch.tensor(normalised_time(self.global_step, self.total_steps), dtype=torch.float32,
                                    device="cpu")
            else:  # no host-to-device copy in step()
                time = normalised_time(self._time, self.total_steps)
            self._multipliers = self.modulator.infer(self._stats, time)
            self._carry_valid = True
            if self.foreach:
                self._record_versions(plan)
        else:
            self._carry_valid = False
        if self.foreach:
            F.foreach_update(plan.buckets, self._multipliers.alpha, self._multipliers.beta, plan.bucket_groups,
                             plan.scalar_dtype)
        else:
            F.single_tensor_update(plan.buckets, self._multipliers.alpha, self._multipliers.beta)

    def _plan_state_current(self, plan: "_Plan") -> bool:
        """Whether ``self.state`` still holds the moments (and ``"step"`` views) the plan steps: as
        ``torch.optim.AdamW`` reads its state at every step, a state reset by the caller (``optimizer.state.clear()``, a
        new ``optimizer.state``, ``del optimizer.state[p]``, a replaced ``exp_avg``) takes effect
        at the next step, instead of the plan stepping tensors that no checkpoint saves. Identity
        tests on the host, about 0.2 us per tensor (AdamW looks up its state per tensor too). A
        ``"step"`` changed in place (``state[p]["step"].zero_()``, as code written for AdamW resets a
        count) is caught by the views' shared version counter, one host attribute: the plan is made
        afresh, which puts the count back, as for a replaced one (else the view, counted on from the
        edited value, told another count than the one the step and a checkpoint use)."""
        state = self.state
        return (state is plan.state and len(state) == plan.state_len
                and _version_of(plan.step_counts) == plan.step_version
                and all(map(operator.is_, map(state.get, plan.params), plan.state_dicts))
                and all(map(operator.is_, map(dict.get, plan.state_dicts, itertools.repeat("exp_avg")), plan.exp_avgs))
                and all(map(operator.is_, map(dict.get, plan.state_dicts, itertools.repeat("exp_avg_sq")),
                            plan.exp_avg_sqs))
                and all(map(operator.is_, map(dict.get, plan.state_dicts, itertools.repeat("step")),
                            plan.step_tensors)))

    def _moments_edited(self, plan: "_Plan") -> bool:
        """Whether the caller changed in place (``state[p]["exp_avg_sq"].zero_()``, a masked reset of
        pruned weights' moments) moments whose norms the last step carried: their version counters
        moved since then (a load or a copy records those of its new tensors). Host attributes, no
        sync. Unknown counters (inference tensors have none) are trusted."""
        now = F.versions(plan.exp_avgs, plan.exp_avg_sqs)
        if now is None:
            return False
        seen = self._versions if plan.all_active else [self._versions[i] for i in plan.indices]
        return seen != now and any(s is not None and s != c for s, c in zip(seen, now))

    def _carry_holds(self) -> bool:
        """Whether the carried norms describe the moments as they are now (what a checkpoint or a copy
        records: the moments it holds are new tensors, whose later changes are watched afresh)."""
        if not self._carry_valid:
            return False
        now = self._versions_now()
        return not any(s is not None and c is not None and s != c for s, c in zip(self._versions, now))

    def _versions_now(self) -> list[tuple[int, int] | None]:
        """Per tensor, the version counters of its moments now (None without moments, or for inference tensors)."""
        out: list[tuple[int, int] | None] = []
        for st in map(self.state.get, self._params):
            got = F.versions([st["exp_avg"]], [st["exp_avg_sq"]]) if st and "exp_avg" in st else None
            out.append(got[0] if got else None)
        return out

    def _record_versions(self, plan: "_Plan") -> None:
        """The version counters of the moments whose norms this step carries (see :meth:`_moments_edited`)."""
        now = F.versions(plan.exp_avgs, plan.exp_avg_sqs)
        if now is None:
            return
        if plan.all_active:
            self._versions = now
        else:
            for i, c in zip(plan.indices, now):
                self._versions[i] = c

    def _update_stats(self, plan: "_Plan", grads: list[Tensor], norms: Tensor | None) -> None:
        carry = self._carry
        idx = plan.index_tensor
        m_sq_old = carry["exp_avg_norm_sq"] if idx is None else carry["exp_avg_norm_sq"][idx]
        v_sum_old = carry["v_sum"] if idx is None else carry["v_sum"][idx]
        args = (self.modulator.extractor.required_stats, grads, m_sq_old, v_sum_old, plan.exp_avgs, plan.exp_avg_sqs,
                plan.params, plan.beta1, plan.beta2)
        if self.foreach:
            measured = F.measured_v_sum(plan.exp_avg_sqs) if plan.measure_v_sum else None
            stats, m_sq, v_sum = F.foreach_stats(*args, norms=norms, coefs=plan.stat_coefs, v_sum=measured,
                                                 narrow=plan.narrow)
        else:
            stats, m_sq, v_sum = F.single_tensor_stats(*args)
        if idx is None:
            carry["exp_avg_norm_sq"], carry["v_sum"] = m_sq, v_sum
            self._stats = stats
        else:
            carry["exp_avg_norm_sq"] = carry["exp_avg_norm_sq"].index_copy(0, idx, m_sq)
            carry["v_sum"] = carry["v_sum"].index_copy(0, idx, v_sum)
            self._stats = self.full_stats(stats, idx)
        if not plan.has_stats:  # once per plan: its tensors have statistics now (and so count in the features)
            plan.has_stats = True
            if not all(self._has_stats[i] for i in plan.indices):
                for i in plan.indices:
                    self._has_stats[i] = True
                self._set_live()

    def full_stats(self, stats: dict[str, Tensor], index: Tensor | None) -> dict[str, Tensor]:
        """Per-tensor statistics of all N tensors from those of the tensors at ``index`` (None: all of
        them): the others keep their values of the last step (zero before they had one)."""
        if index is None:
            return stats
        n = len(self._params)
        return {k: (self._stats[k] if k in self._stats else torch.zeros(n, dtype=torch.float32, device=self.device))
                .index_copy(0, index, v) for k, v in stats.items()}

    def _recompute_carry(self) -> None:
        """||m||^2 and sum(v) directly, when the previous step did not carry them. Tensors without
        moments yet count as zero (an empty stand-in: no moments are allocated for them, just as
        AdamW allocates none for frozen parameters); no host-to-device copy."""
        states = [self.state.get(p, {}) for p in self._params]  # (no empty entries for tensors without state)
        empty = self._params[0].new_zeros(0)
        m = [st["exp_avg"] if "exp_avg" in st else empty for st in states]
        v = [st["exp_avg_sq"] if "exp_avg_sq" in st else empty for st in states]
        self._carry = dict(zip(("exp_avg_norm_sq", "v_sum"), F.carried_norms(m, v)))

    def _init_state(self, p: Tensor) -> None:
        st = self.state[p]
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _mirror_steps(self) -> None:
        """Give every tensor with moments its AdamW ``"step"`` in ``self.state`` (after a load or an
        unpickling, whose counts live in ``self._steps``): code written for torch.optim.AdamW reads
        ``optimizer.state[p]["step"]`` (bias corrections, EMA warm-ups, logging)."""
        for p, n in zip(self._params, self._steps):
            st = self.state.get(p)
            if st and "exp_avg" in st:
                st["step"] = _step_tensor(n)

    def _ensure_meta_synced(self) -> None:
        """Under ``torch.distributed`` with ``sync_meta``: every rank takes rank 0's modulator and
        weighting, once - when the optimizer is made, or, when it was made before the process group
        existed, at its first ``step()`` or ``meta_step``, whichever comes first (before any
        multiplier is used). An optimizer that already stepped without the group (since it was made,
        loaded or unpickled) cannot be brought in line (its replicas may differ already): refused."""
        world = D.world_size(self.sync_meta)
        if world <= 1 and self._synced_world != 1:  # synced in a process group that is gone (or unpickled from one):
            # from here on it steps without one, as if made now (a later group refuses it once it has stepped)
            self._synced_world, self._unsynced_from = 1, (self.global_step, self.meta_updates)
        if world <= 1 or self._synced_world == world:
            return
        # (a checkpoint loaded on every rank is fine: the counters are those of the load)
        stepped = (self.global_step, self.meta_updates) != self._unsynced_from
        meta_state = [*self.modulator.parameters(), *self.modulator.buffers(), *self.weighting.parameters(),
                      *self.weighting.buffers()]
        D.check_same_layout(meta_state, "modulators", self.distributed_layout(), stepped=stepped)  # (on every rank alike)
        D.broadcast_(meta_state)
        self._synced_world = world

    def distributed_layout(self) -> list[int]:
        """``[tensors, elements, groups, fingerprint of the tensors' names, shapes, dtypes and groups
        and of the options]``: what the ranks compare (when the optimizer is made, and at every
        meta-update, which catches an ``add_param_group`` that not every rank made alike). Options
        that differ between ranks would give them other multipliers, or other meta-optimizer steps
        from the same mean meta-gradient (a component given as an object counts by its type): also
        the param groups' AdamW hyperparameters, ``foreach`` (the two paths round differently) and the
        meta-optimizer's class and hyperparameters, which ``config`` does not hold."""
        options = repr([(k, _portable(v)) for k, v in self.config.items() if k != "modulator_init"]
                       + [("foreach", self.foreach),
                          ("param_groups", [[_portable(g.get(k)) for k in ("lr", "betas", "eps", "weight_decay")]
                                            for g in self.param_groups]),
                          ("meta_optimizer", f"{type(self.meta_optimizer).__module__}."
                                             f"{type(self.meta_optimizer).__qualname__}",
                           [sorted((k, _portable(v)) for k, v in g.items() if k != "params")
                            for g in self.meta_optimizer.param_groups])])
        cached = self.__dict__.get("_distributed_layout")
        if cached is not None and cached[0] is self.layout and cached[1] == options:
            return cached[2]
        fingerprint = D.layout_fingerprint(
            [(t.name, tuple(p.shape), str(p.dtype), g, t.param_group) for p, g, t in zip(self._params, self._group_of,
                                                                                          self.tensor_info)]
            + list(self.group_names) + [options])
        value = [len(self._params), sum(p.numel() for p in self._params), len(self.group_names), fingerprint]
        self._distributed_layout = (self.layout, options, value)
        return value

    def _make_plan(self, active: tuple[bool, ...]) -> "_Plan":
        """Group the active tensors into buckets (param_group x modulator group x step count)."""
        indices = [i for i, a in enumerate(active) if a]
        self._restart_reset_moments(indices)
        carried = self._carried
        for i in indices:
            st = self.state[self._params[i]]
            if "exp_avg" not in st:
                self._init_state(self._params[i])
            m, v, refs = st["exp_avg"], st["exp_avg_sq"], carried.get(i)
            if refs is not None and (refs[0]() is not m or refs[1]() is not v):
                self._carry_valid = False  # moments the caller replaced while the tensor had no gradient
            carried[i] = (weakref.ref(m), weakref.ref(v))
        self._set_live()
        group_of = self._group_of
        pg_of = [t.param_group for t in self.tensor_info]
        buckets: dict[tuple[int, int, int], F.Bucket] = {}
        slices, start = [], 0
        for pos, i in enumerate(indices):
            if pos + 1 == len(indices) or pg_of[indices[pos + 1]] != pg_of[i]:
                slices.append((pg_of[i], slice(start, pos + 1)))
                start = pos + 1
            p, st = self._params[i], self.state[self._params[i]]
            group = self.param_groups[pg_of[i]]
            key = (pg_of[i], group_of[i], self._steps[i])
            if key not in buckets:
                buckets[key] = F.Bucket(
                    group=group_of[i], indices=[], params=[], exp_avgs=[], exp_avg_sqs=[], lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], beta1=group["betas"][0],
                    beta2=group["betas"][1], step=self._steps[i], param_group=pg_of[i],
                )
            b = buckets[key]
            b.indices.append(i)
            b.params.append(p)
            b.exp_avgs.append(st["exp_avg"])
            b.exp_avg_sqs.append(st["exp_avg_sq"])
        all_active = len(indices) == len(active)
        params = [self._params[i] for i in indices]
        blocked = F.takes_cpu_routes(self.device) and sum(p.numel() for p in params) >= F.CPU_BLOCKING_MIN_NUMEL
        limit = F.CPU_CHUNK_NUMEL if blocked else None  # cache blocking: on the CPU, for large models
        for b in buckets.values():
            b.split(limit)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        # AdamW's "step" in each state, which code written for AdamW reads: 0-dim views of one CPU vector
        # of the counts, which step() counts up in one op (a tensor each, as AdamW's, costs ~1 us per tensor).
        # Made afresh from the counts (self._steps), so that one replaced or removed by the caller is put right
        step_counts = _step_tensor([self._steps[i] for i in indices])
        step_tensors = list(step_counts.unbind())
        for p, t in zip(params, step_tensors):
            self.state[p]["step"] = t
        step_version = _version_of(step_counts)
        scalar_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else None
        beta1, beta2 = self._beta_vectors(indices)
        noise, numel = F.cos_noise(exp_avgs), F.numel_vector(params)
        measure_v_sum = F.measures_v_sum(self.modulator.extractor.required_stats, exp_avg_sqs)
        self._plan = _Plan(
            active=active,
            state=self.state,
            state_dicts=[self.state[p] for p in params],
            state_len=len(self.state),
            betas=[tuple(g["betas"]) for g in self.param_groups],
            indices=indices,
            all_active=all_active,
            index_tensor=None if all_active else F.to_device(indices, self.device),
            params=params,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            step_counts=step_counts,
            step_tensors=step_tensors,
            step_version=step_version,
            param_group_slices=slices,
            blocking=F.Blocking(params, exp_avgs, exp_avg_sqs, slices, limit),
            buckets=list(buckets.values()),
            bucket_groups=F.to_device([b.group for b in buckets.values()], self.device),
            beta1=beta1,
            beta2=beta2,
            stat_coefs=F.stat_coefficients(beta1, beta2, noise, numel),
            scalar_dtype=scalar_dtype,
            narrow=any(t.dtype in F.NARROW_DTYPES for t in itertools.chain(params, exp_avgs)),  # (moments set by hand)
            cos_noise=noise,
            numel=numel,
            measure_v_sum=measure_v_sum,
        )
        return self._plan

    def _restart_reset_moments(self, indices: Iterable[int]) -> None:
        """Tensors at ``indices`` whose moments the caller reset (the state cleared, an entry deleted)
        count from step 0 again, as AdamW's fresh state does, and their carried norms are recomputed."""
        for i in indices:
            if self._steps[i] and "exp_avg" not in self.state.get(self._params[i], ()):
                self._steps[i], self._carry_valid = 0, False

    def _carried_now(self) -> dict[int, tuple[weakref.ref, weakref.ref]]:
        """Weak references to every tensor's moments as they are now, which the carried norms
        describe (after a load or a copy: a later replacement of them is then noticed)."""
        return {i: (weakref.ref(st["exp_avg"]), weakref.ref(st["exp_avg_sq"]))
                for i, st in enumerate(map(self.state.get, self._params)) if st and "exp_avg" in st}

    def _set_live(self, also: Sequence[int] = ()) -> None:
        """The features average the statistics over the tensors that have moments and statistics
        (and those at ``also``: the meta-update's, before their first step); frozen tensors are left
        out (also those frozen after an AdamW checkpoint gave them moments). Host bookkeeping and,
        when the set changes, one copy to the device (no sync)."""
        live = [False] * len(self._params) if not self.state else [
            has and "exp_avg" in self.state.get(p, ()) for p, has in zip(self._params, self._has_stats)]
        for i in also:
            live[i] = True
        live = tuple(live)
        if live != self._live:
            self.modulator.extractor.layout.set_live(live, self._group_of)
            self._live = live

    def _beta_vectors(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Beta1 and beta2 of the tensors at ``indices`` (their param groups' current values) as
        vectors on the device, staged on the CPU and copied without blocking (a scheduler may
        change the betas at every step)."""
        betas = [self.param_groups[self.tensor_info[i].param_group]["betas"] for i in indices]
        both = F.to_device([[b[0] for b in betas], [b[1] for b in betas]], self.device, torch.float32)
        return both[0], both[1]

    def _update_plan_betas(self, plan: "_Plan") -> None:
        """New betas from a scheduler (OneCycleLR's momentum cycling changes beta1 at every step):
        the buckets' bias corrections and the statistics' per-tensor constants, without
        rebuilding the layout."""
        groups = self.param_groups
        # (the vectors first: a failure leaves the plan as it was, not with buckets of the new betas and a
        # record of the old ones, which the next step, with the old betas back, would never update)
        beta1, beta2 = self._beta_vectors(plan.indices)
        stat_coefs = F.stat_coefficients(beta1, beta2, plan.cos_noise, plan.numel)
        for b in plan.buckets:
            b.beta1, b.beta2 = groups[b.param_group]["betas"]
        plan.beta1, plan.beta2, plan.stat_coefs = beta1, beta2, stat_coefs
        plan.betas = [tuple(g["betas"]) for g in groups]

    # ------------------------------------------------------------------------------------------
    # the meta-update

    def meta_step(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch1: Any, batch2: Any,
                  val_batch: Any = None) -> MetaRecord:
        """Train the modulator on one meta-update; the model is left exactly as it was.

        ``loss_fn(model, batch)`` returns the scalar training loss of ``batch``. ``batch1`` gives
        g at theta, ``batch2`` gives g' (and L_train) at theta', ``val_batch`` the validation
        loss at theta and theta' (needed by loss_decrease, gen_gap and combined).
        ``batch1=None`` takes g from the parameters' ``.grad`` instead: call it right after the
        training step's ``loss.backward()`` and before ``step()``, and the meta-update reuses that
        gradient (one forward and backward pass fewer; ``.grad`` is left as it was)::

            loss_fn(model, batch).backward()
            if step % k == 0:
                optimizer.meta_step(model, loss_fn, None, batch2, val_batch)
            optimizer.step()

        With mixed precision and a ``GradScaler``, call ``scaler.unscale_(optimizer)`` before
        ``meta_step(..., None, ...)``: ``.grad`` holds the scaled gradients until then.

        A ``DistributedDataParallel`` or ``DataParallel`` model is unwrapped: its ``module`` runs
        the meta-update's passes, outside DDP's forward (no buffer broadcasts or reducer
        bookkeeping for them); with ``sync_meta`` every rank calls ``meta_step`` (on its own
        batches) and the meta-gradients are averaged.

        The passes draw their dropout masks from a fork of the global random streams (torch's on the
        CPU and the parameters' device, Python's ``random`` and NumPy's), which the call leaves as it
        found them: adding meta-updates to a training loop changes neither the masks nor anything
        else random in its training steps.

        Returns a :class:`MetaRecord` of plain floats (this call reads values back; step() never does).
        """
        if not isinstance(model, nn.Module) or not callable(loss_fn):
            raise TypeError(f"meta_step(model, loss_fn, batch1, batch2, val_batch) takes the torch.nn.Module being "
                            f"trained and a function loss_fn(model, batch) -> scalar loss; got model="
                            f"{type(model).__name__}, loss_fn={type(loss_fn).__name__}")
        if isinstance(loss_fn, nn.modules.loss._Loss):
            raise TypeError(f"meta_step's loss_fn is called as loss_fn(model, batch) -> scalar loss; got the criterion "
                            f"{loss_fn!r}, which takes (output, target): wrap it, e.g. loss_fn=lambda model, batch: "
                            f"criterion(model(batch[0]), batch[1])")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("meta_step cannot run under torch.inference_mode(): it differentiates the model's "
                               "losses. Call it outside (under torch.no_grad() it works: it enables gradients itself)")
        # (the checks above are raised on this rank alone: they see the call itself - the types of model and
        # loss_fn, the grad mode - which is the same on every rank by construction, as the training script is)
        # the one-time synchronisation under torch.distributed first: its collectives raise their refusals on every
        # rank alike, and a rank that failed a check below before them would meet the others in them
        self._ensure_meta_synced()
        # the checks below can fail on some ranks only (a val_batch that this rank's loader no longer gives, a model
        # moved or param_groups edited on this rank): announced in the all-reduce the other ranks wait in at the end
        # of their meta-update, so that they raise too rather than wait there until the process group's timeout
        with _raised_on_every_rank(self, D.world_size(self.sync_meta)):
            if self.objective.needs_val and val_batch is None:
                raise ValueError(f"objective {self.config['objective']!r} needs a validation batch: "
                                 f"call meta_step(model, loss_fn, batch1, batch2, val_batch)")
            self._check_device()
            self._check_tensors_unchanged()
        self._restart_reset_moments(range(len(self._params)))  # as step() does
        model = D.unwrap(model)
        was_training = self.modulator.training
        try:
            with _forked_rng(self.device):  # the training steps' random stream is left as it was
                record = meta_update(self, model, loss_fn, batch1, batch2, val_batch)
        finally:
            self.modulator.set_training(was_training)
        self.meta_updates += 1
        self.meta_skipped += int(record.skipped)
        return record

    # ------------------------------------------------------------------------------------------
    # checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly from here. As in torch.optim, the AdamW moments are the live
        tensors (no copy: a checkpoint does not double the optimizer's memory; ``torch.save`` or
        ``copy.deepcopy`` makes a snapshot); the rest is copied. Hooks registered with
        ``register_state_dict_pre_hook`` run first, and those of ``register_state_dict_post_hook`` see
        (and may replace) the whole dict, meta state included."""
        self._check_tensors_unchanged()  # (else torch.optim's indexing fails with a bare KeyError)
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        with self._base_class_hooks_off("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
            sd = super().state_dict()
        # per-parameter entries as new dicts with AdamW's "step" (the live state keeps the counts in
        # self._steps); torch.optim numbers the parameters in param_groups order, as self._params
        sd["state"] = {i: {**st, "step": self._steps[i]} if "exp_avg" in st else dict(st)
                       for i, st in sd["state"].items()}
        extra = {
            "group_names": list(self.group_names),
            "modulator": self.modulator.state_dict(),
            "weighting": self.weighting.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "carry": {k: v.clone() for k, v in self._carry.items()},
            "carry_valid": self._carry_holds(),
            "stats": {k: v.clone() for k, v in self._stats.items()},
            "has_stats": list(self._has_stats),
            "multipliers": None if self._multipliers is None else dataclasses.asdict(self._multipliers),
            "steps": list(self._steps),
            "global_step": self.global_step,
            "meta_updates": self.meta_updates,
            "meta_skipped": self.meta_skipped,
            "config": dict(self.config),
            "meta_optimizer_class": type(self.meta_optimizer).__name__,
            # (whether the groups were made with model=, for the error of a load into an optimizer made otherwise)
            "grouped_with_model": self._grouped_with_model(),
        }
        sd["metaadamw"] = copy.deepcopy(extra)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @contextlib.contextmanager
    def _base_class_hooks_off(self, *names: str) -> Iterator[None]:
        """Run ``torch.optim.Optimizer``'s own (de)serialisation without the hooks ``names``: MetaAdamW
        runs them itself, before and after the whole of its own work."""
        saved = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, collections.OrderedDict())
        try:
            yield
        finally:
            for name, hooks in saved.items():
                setattr(self, name, hooks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a MetaAdamW checkpoint, or a ``torch.optim.AdamW`` one (switching an AdamW run to
        MetaAdamW): its moments, step counts and per-group hyperparameters; the modulator and the
        rest of the meta state stay as they are. Hooks registered with
        ``register_load_state_dict_pre_hook`` see (and may replace) the dict before anything else is
        done with it, and those of ``register_load_state_dict_post_hook`` run once all is loaded."""
        state_dict = copy.deepcopy(state_dict)  # never alias or mutate the caller's tensors
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        with self._base_class_hooks_off("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            with self._undone_on_error():
                self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @contextlib.contextmanager
    def _undone_on_error(self) -> Iterator[None]:
        """A load that fails part way (a damaged checkpoint: a meta-state entry missing, a moment
        without its pair, a step count that is no number) leaves the optimizer as it was, not half
        loaded (the moments of the checkpoint with the step counts of the run, or a state that fails
        every later step): its attributes, its meta-optimizer's and the values of the modulator's and
        the weighting's tensors (loaded in place) are put back."""
        saved, config = dict(self.__dict__), dict(self.config)
        meta_optimizer = self.meta_optimizer
        meta_saved = dict(meta_optimizer.__dict__)
        values = [(t, t.detach().clone()) for module in (self.modulator, self.weighting)
                  for t in module.state_dict(keep_vars=True).values() if isinstance(t, Tensor)]
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            self.config.clear()
            self.config.update(config)
            meta_optimizer.__dict__.clear()
            meta_optimizer.__dict__.update(meta_saved)
            with torch.no_grad():
                for t, value in values:
                    t.copy_(value)
            raise

    #: what a MetaAdamW checkpoint's meta state holds (``has_stats``, ``config`` and ``meta_optimizer_class``
    #: may be missing: checkpoints of earlier versions)
    _META_STATE_KEYS = ("group_names", "modulator", "weighting", "meta_optimizer", "carry", "carry_valid", "stats",
                        "multipliers", "steps", "global_step", "meta_updates", "meta_skipped")

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_tensors_unchanged()  # (torch.optim would give the moments to a tensor put in by hand)
        extra = state_dict.pop("metaadamw", None)
        if extra is not None:
            missing = [k for k in self._META_STATE_KEYS if not isinstance(extra, dict) or k not in extra]
            if missing:
                raise ValueError(f"this state dict's MetaAdamW meta state ('metaadamw') lacks {missing}: a damaged "
                                 f"checkpoint, or not one of optimizer.state_dict(). Nothing was loaded")
            self._check_meta_state_shapes(extra)
        _check_state_keys(state_dict, "")
        if isinstance(extra, dict) and isinstance(extra.get("meta_optimizer"), dict):
            _check_state_keys(extra["meta_optimizer"], "the meta-optimizer's ")
        self._check_moment_shapes(state_dict)
        if extra is None:
            self._load_adamw_state_dict(state_dict)
            return
        if extra["group_names"] != self.group_names:
            saved, mine = extra.get("grouped_with_model"), self._grouped_with_model()
            how = {True: "with model=", False: "without model= (the parameter names alone, model.named_parameters())"}
            built = ("" if not isinstance(saved, bool) or saved == mine else
                     f". The checkpoint's optimizer was built {how[saved]} and this one {how[mine]}: with model=, "
                     f"the grouping takes layer types and depths from the model's modules, which changes the groups "
                     f"- build this optimizer as the checkpoint's was")
            raise ValueError(f"the checkpoint's modulator groups {extra['group_names']} differ from this "
                             f"optimizer's {self.group_names}: same model, same param groups (also those added "
                             f"with add_param_group, in the same order) and same grouping needed{built}")
        self._check_loadable(extra)  # before anything is loaded: a failed load leaves the optimizer as it was
        _check_loaded_hyperparameters(state_dict)
        adopted = self._adopt_loaded_settings(extra.get("config"))  # (warnings made errors: nothing loaded yet)
        super().load_state_dict(state_dict)
        self._drop_torch_flags()  # (a checkpoint of an earlier version that kept an AdamW checkpoint's)
        # each tensor's AdamW "step" is saved with its moments, as torch.optim saves it: a load pre-hook that
        # moves the per-tensor entries (torch.optim's recipe of loading by parameter names) moves it along,
        # so it, not the list of step counts in the meta state, goes with the moments
        saved_steps = [int(s.item() if isinstance(s, Tensor) else s) for s in extra["steps"]]  # (checked above)
        steps = []
        for i, p in enumerate(self._params):
            st = self.state.get(p, {})
            step = st.pop("step", None)
            steps.append(int(step.item() if isinstance(step, Tensor) else step) if step is not None and "exp_avg" in st
                         else saved_steps[i])
        self.modulator.load_state_dict(extra["modulator"])
        self.weighting.load_state_dict(extra["weighting"])
        project_weighting(self)  # (a checkpoint of a version that let s leave its bounds)
        self.meta_optimizer.load_state_dict(extra["meta_optimizer"])
        self.config.update(adopted)
        self._carry = {k: v.to(self.device) for k, v in extra["carry"].items()}
        self._carry_valid = extra["carry_valid"]
        self._stats = {k: v.to(self.device) for k, v in extra["stats"].items()}
        # (a checkpoint of a version that did not save the flags: the tensors with moments)
        self._has_stats = [bool(h) for h in extra.get("has_stats")
                           or ["exp_avg" in self.state.get(p, ()) for p in self._params]]
        m = extra["multipliers"]
        self._multipliers = None if m is None else Multipliers(**{k: v.to(self.device) for k, v in m.items()})
        if steps != saved_steps:  # per-tensor entries edited after saving: the meta state's norms are not theirs
            self._carry_valid = False
        self._set_step_counts(steps, max(extra["global_step"], *steps) if steps != saved_steps else extra["global_step"])
        self.meta_updates = extra["meta_updates"]
        self.meta_skipped = extra["meta_skipped"]
        self._unsynced_from = (self.global_step, self.meta_updates)  # the same checkpoint on every rank

    def _check_meta_state_shapes(self, extra: dict[str, Any]) -> None:
        """Refuse, before anything is loaded, per-tensor and per-group entries of the meta state that
        do not fit this optimizer (loaded, they failed the next step, or were used as they were)."""
        n, groups = len(self._params), len(self.group_names)
        if not isinstance(extra["group_names"], list) or len(extra["group_names"]) != groups:
            return  # (the group names' own check says what differs)
        bad = []
        carry, stats, multipliers = extra["carry"], extra["stats"], extra["multipliers"]
        wanted = [(f"carry[{k!r}]", (carry or {}).get(k) if isinstance(carry, dict) else None, n)
                  for k in ("exp_avg_norm_sq", "v_sum")]
        wanted += [(f"stats[{k!r}]", v, n) for k, v in (stats.items() if isinstance(stats, dict) else [("", None)])]
        if multipliers is not None:
            wanted += [(f"multipliers[{k!r}]", multipliers.get(k) if isinstance(multipliers, dict) else None, groups)
                       for k in ("alpha", "beta", "lambda1", "lambda2")]
        bad += [f"{what} {tuple(t.shape) if isinstance(t, Tensor) else described(t)} (expected ({size},))"
                for what, t, size in wanted if not (isinstance(t, Tensor) and tuple(t.shape) == (size,))]
        for key, size in (("steps", n), ("has_stats", n)):
            value = extra.get(key)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != size):
                bad.append(f"{key} {described(value)} (expected {size} entries, one per tensor)")
        # each step count itself: one that is no integer >= 0 (None, a string, 2.5) was kept as it was and
        # failed the next meta_step or step() with a bare TypeError, or counted the bias correction from it.
        # Taken in the forms a tensor's own "step" is (an integral float, a one-element tensor, as AdamW
        # saves it; made an int when loaded): a checkpoint converted to them loaded before this check
        steps = extra.get("steps")
        if isinstance(steps, (list, tuple)) and len(steps) == n:
            bad += [f"steps[{i}] {s!r} for {self.tensor_info[i].name or f'tensor {i}'} (expected its AdamW step "
                    f"count, an integer >= 0)" for i, s in enumerate(steps) if s is None or not _is_step_count(s)]
        # each statistics flag: one that is no bool failed the next step() with a bare TypeError (None: "float()
        # argument must be ... not 'NoneType'") or RuntimeError (a tensor of several values), or, a string,
        # counted as True
        has_stats = extra.get("has_stats")
        if isinstance(has_stats, (list, tuple)) and len(has_stats) == n:
            bad += [f"has_stats[{i}] {h!r} for {self.tensor_info[i].name or f'tensor {i}'} (expected True or False: "
                    f"whether it has statistics yet)" for i, h in enumerate(has_stats) if not _is_flag(h)]
        for key in ("global_step", "meta_updates", "meta_skipped"):
            if not _is_int(extra[key]):
                bad.append(f"{key} {extra[key]!r} (expected an integer)")
        if bad:
            raise ValueError("this state dict's MetaAdamW meta state does not fit this optimizer, and nothing was "
                             "loaded: " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
                             + ". Load the checkpoint of this model and optimizer, as optimizer.state_dict() saved it")

    def _check_moment_shapes(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything is loaded, moments that cannot be those of the parameters they would
        belong to: of another shape (a checkpoint of another model; torch.optim checks only the group
        sizes), or no real floating-point values to cast to the parameter's dtype - not a tensor, a
        complex, integer or boolean one (torch.optim casts them silently, the imaginary part and all
        precision lost), a sparse one or one on the 'meta' device (which failed the next step) - and
        step counts that are no non-negative integers (which failed later, or gave a division by zero)."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups) or any(
                len(a.get("params", ())) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            return  # torch.optim's own check names this
        states, bad, i = state_dict.get("state", {}), [], 0
        for saved, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                st = states.get(index)
                name = self.tensor_info[i].name or f"tensor {i}"
                if isinstance(st, dict) and ("exp_avg" in st) != ("exp_avg_sq" in st):
                    bad.append(f"{name}: {'exp_avg' if 'exp_avg' in st else 'exp_avg_sq'} without "
                               f"{'exp_avg_sq' if 'exp_avg' in st else 'exp_avg'}")
                for key in ("exp_avg", "exp_avg_sq"):
                    if not isinstance(st, dict) or key not in st:
                        continue
                    problem = _moment_problem(st[key], p)
                    if problem:
                        bad.append(f"{name}: {key} {problem}")
                        break
                if isinstance(st, dict) and "exp_avg" in st and not _is_step_count(st.get("step")):
                    step = st["step"]
                    shown = repr(step.item()) if isinstance(step, Tensor) and step.numel() == 1 else described(step)
                    bad.append(f"{name}: step {shown} (expected a step count, an integer >= 0)")
                i += 1
        if bad:
            raise ValueError("the checkpoint's moments do not fit this optimizer's parameters, and nothing was loaded: "
                             + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
                             + ". Load the checkpoint of this model, with its parameters in the same order.")

    def _load_adamw_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("state", {})
        groups = state_dict.get("param_groups")
        neither = ("this state dict was saved neither by MetaAdamW (no 'metaadamw' entry) nor by torch.optim.AdamW "
                   "(every parameter's state needs exp_avg, exp_avg_sq and step, every param group betas)")
        if not isinstance(groups, list) or not all(isinstance(g, dict) and "betas" in g for g in groups) or not all(
                isinstance(st, dict) and (not st or {"exp_avg", "exp_avg_sq", "step"} <= set(st)) for st in states.values()):
            # (an empty entry is a tensor without state: torch.optim's state is a defaultdict, so code that merely
            # reads optimizer.state[p] of a frozen tensor leaves one, which AdamW saves and loads as no state)
            raise ValueError(f"{neither}. Nothing was loaded")
        other = sorted({k for st in states.values() for k in st} - {"exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq"})
        if other:  # (NAdam's mu_product)
            raise ValueError(f"{neither}: its per-parameter state also has {other}, another optimizer's. Nothing was "
                             f"loaded")
        if not all("amsgrad" in g for g in groups):
            if any(k in g for g in groups for k in _TORCH_FLAGS):  # (torch.optim's groups; MetaAdamW's have none)
                raise ValueError(f"{neither}: it has Adam's moments and torch.optim's param-group flags but not "
                                 f"AdamW's amsgrad - another torch.optim optimizer's (RAdam's?). Nothing was loaded")
            raise ValueError(
                "this state dict has AdamW moments but neither MetaAdamW's meta state (no 'metaadamw' entry: the "
                "modulator, its optimizer, the weighting) nor torch.optim.AdamW's param-group flags: it looks like a "
                "MetaAdamW state dict that lost its meta state, as torch.distributed.checkpoint's "
                "get_optimizer_state_dict() does (it keeps only 'state' and 'param_groups'). Nothing was loaded. Save "
                "and load optimizer.state_dict() itself, with torch.save and torch.load")
        unsupported = sorted({k for g in state_dict["param_groups"] for k in ("amsgrad", "maximize") if g.get(k)})
        if unsupported:
            raise ValueError(f"this AdamW checkpoint uses {', '.join(unsupported)}, which MetaAdamW does not support")
        coupled = [i for i, g in enumerate(state_dict["param_groups"])
                   if g.get("decoupled_weight_decay") is False and g.get("weight_decay", 0)]
        if coupled:
            wd = state_dict["param_groups"][coupled[0]]["weight_decay"]
            raise ValueError(
                f"this is a torch.optim.Adam checkpoint with weight_decay={wd} in param group(s) {coupled}: Adam adds "
                f"it to the gradient as an L2 penalty, while MetaAdamW (like AdamW) decays the weights directly, so "
                f"the same number means another rule. Nothing was loaded. To switch anyway, set those groups' "
                f"weight_decay in the dict to the decoupled value you want and their decoupled_weight_decay to True")
        _check_loaded_hyperparameters(state_dict)
        super().load_state_dict(state_dict)  # checks the param group sizes; moments and hyperparameters
        self._drop_torch_flags()
        for group in self.param_groups:  # an AdamW built with a tensor lr (or betas, eps, weight decay): their values,
            for key in ("lr", "eps", "weight_decay"):  # as MetaAdamW steps with floats (read once, here)
                if isinstance(group.get(key), Tensor) and group[key].numel() == 1:
                    group[key] = float(group[key].detach())
            if any(isinstance(b, Tensor) for b in group["betas"]):
                group["betas"] = tuple(float(b.detach()) if isinstance(b, Tensor) else b for b in group["betas"])
        steps = [0] * len(self._params)  # a tensor without state in the checkpoint starts afresh, as its moments do
        for i, p in enumerate(self._params):
            st = self.state[p]
            step = st.pop("step", None)
            st.pop("max_exp_avg_sq", None)
            if step is not None:
                steps[i] = int(step.item() if isinstance(step, Tensor) else step)
        self._set_step_counts(steps, max(steps, default=0))
        self._unsynced_from = (self.global_step, self.meta_updates)  # the same checkpoint on every rank
        self._carry_valid = False  # the carried norms of the moments: recomputed at the next refresh
        self._stats = {}  # those of the moments before the load: gone (tensors without a gradient read zeros)
        self._has_stats = [False] * len(self._params)
        self._multipliers = None  # the next step refreshes them

    def _drop_torch_flags(self) -> None:
        """Remove torch.optim.AdamW's own flags from the param groups (a loaded AdamW checkpoint
        brings them, at their defaults or refused): they are not MetaAdamW's options."""
        for group in self.param_groups:
            for key in _TORCH_FLAGS:
                group.pop(key, None)

    def _set_step_counts(self, steps: list[int], global_step: int) -> None:
        """The loaded per-tensor AdamW step counts and step() count (the plan is rebuilt next step)."""
        self._steps = steps
        self._mirror_steps()
        self.global_step = global_step
        self._time = torch.tensor(global_step, dtype=torch.int64, device=self.device)
        self._carried = self._carried_now()  # (the loaded moments are new tensors)
        self._versions = self._versions_now()
        self._plan = None
        self._live = None  # (the features' live tensors: recomputed with the plan)

    #: options that decide the shapes of the modulator, the weighting or the meta-optimizer's state,
    #: or what the trained modulator's outputs mean (the multipliers' ranges, the weighting's form)
    _STRUCTURAL_OPTIONS = ("features", "time_step", "second_moment", "gating", "modulator_layers", "modulator_heads",
                           "modulator_ff", "modulator_width", "objective", "weighting", "alpha_range", "beta_range",
                           "weighting_form")
    #: options of how the run goes on, which a resumed run may change (training longer, another
    #: meta-gradient): the constructor's values are kept, with a warning naming each difference
    _RUN_OPTIONS = ("meta_gradient", "refresh_every", "total_steps", "modulator_dropout", "gate_l1")
    #: options whose values a checkpoint carries in its state (the weighting's buffers, the
    #: meta-optimizer's param_groups): loading takes the checkpoint's, as torch.optim does for lr
    _LOADED_OPTIONS = ("priorities", "fixed_weights", "meta_lr", "meta_weight_decay")

    def _unused_options(self) -> set[str]:
        """:func:`unused_options` of this optimizer: a checkpoint that differs in them alone loads
        without an error or a warning."""
        return unused_options(self.config["weighting"], self.config["gating"], time_step=self.config["time_step"],
                              features=self.config["features"])

    def _check_loadable(self, extra: dict[str, Any]) -> None:
        """Raise, naming every difference, if the checkpoint was saved by a MetaAdamW whose
        modulator, weighting or meta-optimizer has other shapes or another kind than this one."""
        problems = []
        saved = extra.get("config") or {}  # checkpoints from before the config was saved have none
        unused = self._unused_options() if saved.get("weighting") == self.config["weighting"] else set()
        for key in self._STRUCTURAL_OPTIONS:
            if key in saved and saved[key] != self.config[key] and key not in unused:
                problems.append(f"{key}={saved[key]!r} (this optimizer: {self.config[key]!r})")
        cls, mine = extra.get("meta_optimizer_class"), type(self.meta_optimizer).__name__
        if cls is not None and cls != mine:
            problems.append(f"meta_optimizer {cls} (this optimizer: {mine})")
        for what, module in (("modulator", self.modulator), ("weighting", self.weighting)):
            ours, theirs = module.state_dict(), extra[what]
            diff = [f"missing {k}" for k in ours if k not in theirs] + [f"unexpected {k}" for k in theirs if k not in ours]
            diff += [f"{k} {tuple(theirs[k].shape)} (this optimizer: {tuple(ours[k].shape)})" for k in ours
                     if k in theirs and tuple(ours[k].shape) != tuple(theirs[k].shape)]
            if diff and not problems:  # the options above already explain a difference
                problems.append(f"the {what}'s tensors differ: " + ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""))
        ours_keys = set(self.meta_optimizer.state_dict()["param_groups"][0]) - {"params"}
        theirs_groups = extra["meta_optimizer"]["param_groups"]
        # (checked by torch.optim only once the model's moments and the modulator were loaded, and in its
        # words, which read as if the model's param groups differed)
        ours_sizes = [len(g["params"]) for g in self.meta_optimizer.param_groups]
        theirs_sizes = [len(g.get("params", ())) for g in theirs_groups]
        if ours_sizes != theirs_sizes and not problems:  # (the options above already explain a difference)
            problems.append(f"the meta-optimizer's param groups hold {theirs_sizes} tensors (this optimizer's: "
                            f"{ours_sizes}): build it with the checkpoint's meta_optimizer")
        theirs_keys = set(theirs_groups[0]) - {"params"} if theirs_groups else ours_keys
        if ours_keys != theirs_keys and cls is None:
            problems.append(f"the meta-optimizer's hyperparameters differ: {sorted(theirs_keys)} (this optimizer: "
                            f"{sorted(ours_keys)})")
        if problems:
            raise ValueError(
                "this checkpoint was saved by a MetaAdamW built with other options, and nothing was loaded: "
                + "; ".join(problems) + ". Build the optimizer with the checkpoint's options "
                "(state_dict['metaadamw']['config']) to load it.")

    def _adopt_loaded_settings(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        """Before a load: the settings ``config`` takes from the checkpoint once it is loaded, so that it
        describes what was loaded (priorities, fixed weights and the meta-optimizer's settings come from
        the checkpoint); say so when they differ (warned before anything is loaded: a warning made an
        error leaves the optimizer as it was, not half loaded)."""
        if not saved:
            return {}
        unused = self._unused_options()  # (weighting and gating are the checkpoint's: _check_loadable saw to it)
        def effective(key: str, value: Any) -> Any:  # (the built-in 'fixed' weighs every term 1.0 for None)
            ones = key == "fixed_weights" and value is None and self.config["weighting"] == "fixed"
            return [1.0] * len(TERM_ORDER) if ones else value

        changed = {k: (self.config[k], saved[k]) for k in self._LOADED_OPTIONS
                   if k in saved and effective(k, saved[k]) != effective(k, self.config[k]) and k not in unused}
        if changed:
            warnings.warn("MetaAdamW.load_state_dict: the checkpoint's settings replace the constructor's: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), stacklevel=_caller_stacklevel())
        kept = {k: (saved[k], self.config[k]) for k in self._RUN_OPTIONS
                if k in saved and saved[k] != self.config[k] and k not in unused}
        if kept:
            warnings.warn("MetaAdamW.load_state_dict: this run goes on with the constructor's settings, not the "
                          "checkpoint's (so it does not continue exactly as the saved run would have): " + ", ".join(
                              f"{k} {old!r} -> {new!r}" for k, (old, new) in kept.items()), stacklevel=_caller_stacklevel())
        return {k: new for k, (_, new) in changed.items()}

    # ------------------------------------------------------------------------------------------
    # copying and pickling

    #: what torch.optim.Optimizer leaves out of its pickled state (hooks are not state; the plan
    #: is a cache of views into the state and is rebuilt by the next step; a copy has no model:
    #: groups added to it later need names of their own)
    _NOT_PICKLED = ("_plan", "_model_ref", "_carried", "_versions", "_distributed_layout", "_optimizer_step_pre_hooks",
                    "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups, which is all AdamW has;
        # MetaAdamW also needs its modulator, weighting, meta-optimizer, layout and counters
        # (an instance attribute that shadows a method is a wrapper put there by someone else: an LR
        # scheduler wraps step(); torch.optim does not pickle it, and a copy of it would step the original)
        state = {k: v for k, v in self.__dict__.items()
                 if k not in self._NOT_PICKLED and not callable(getattr(type(self), k, None))}
        state["_carry_valid"] = self._carry_holds()  # (moments changed in place since: the copy recomputes them)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # fresh hook dicts, as torch.optim does
        _prepare_eager_step()  # (unpickled in a fresh process: made by no __init__ there)
        self._drop_torch_flags()  # (pickled by an earlier version after loading an AdamW checkpoint)
        self.__dict__.setdefault("sync_meta", True)  # (pickled before the option existed)
        self.__dict__.setdefault("_synced_world", 1)  # (pickled before the lazy sync existed)
        self.__dict__.setdefault("_group_sizes", [len(g["params"]) for g in self.param_groups])  # (pickled before)
        for name in ("refresh_every", "total_steps", "meta_gradient"):  # (pickled when they were attributes)
            if name in self.__dict__:
                self.config[name] = self.__dict__.pop(name)
        # an unpickled optimizer that never synced starts over from the pickle, as from a loaded checkpoint
        self._unsynced_from = (self.__dict__.get("global_step", 0), self.__dict__.get("meta_updates", 0))
        self._plan = None
        self._live = None  # (the features' live tensors: recomputed with the plan)
        self._carried = self._carried_now()  # (weak references are not pickled)
        self._versions = self._versions_now()  # (the copy's moments are new tensors)
        self.__dict__.setdefault("_has_stats", ["exp_avg" in self.state.get(p, ()) for p in self._params])
        # (an unpickled copy has no model; torch.optim's load_state_dict also calls __setstate__, with the
        # state and param groups alone: the model given as model= stays, for groups added after a resume)
        self.__dict__.setdefault("_model_ref", None)

    def __repr__(self) -> str:
        groups = ", ".join(self.group_names[:6]) + (", ..." if len(self.group_names) > 6 else "")

        def now(key: str) -> str:  # the param groups' current values (a scheduler's), as torch.optim shows them
            values = [tuple(g[key]) if key == "betas" else g[key] for g in self.param_groups]
            return f"{values[0]}" if len(set(values)) == 1 else f"[{', '.join(map(str, values))}] (per param group)"

        return (f"MetaAdamW(lr={now('lr')}, betas={now('betas')}, eps={now('eps')}, "
                f"weight_decay={now('weight_decay')}, groups={len(self.group_names)} [{groups}], "
                f"features={self.config['features']} ({self.modulator.in_width} wide, padding "
                f"{self.modulator.padding}, model width {self.modulator.width}), objective={self.config['objective']}, "
                f"weighting={self.config['weighting']})")


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)$")


def _unparametrized(name: str | None) -> str | None:
    """A parametrized tensor's name as :func:`_grouping_name` gives it, from the name alone."""
    if name is None or ".parametrizations." not in f".{name}":
        return name
    module_name, _, param_name = name.rpartition(".")
    return _grouping_name(module_name, param_name, {})[0]


def _grouping_name(module_name: str, param_name: str, types: dict[str, type]) -> tuple[str, type]:
    """A parameter's full name and the type of the layer that owns it, as grouping strategies
    should see them: a tensor of an ``nn.MultiheadAttention`` (also its ``out_proj``, a Linear)
    belongs to the attention; a parametrized tensor (``torch.nn.utils.parametrize``, weight_norm:
    ``fc.parametrizations.weight.original0``) to its layer, named ``fc.weight_original0``. ``types``
    holds the module types seen so far (``named_modules`` lists the parents first)."""
    m = _PARAMETRIZED.match(module_name)
    if m:
        module_name = m.group(1) or ""
        param_name = m.group(2) + ("" if param_name == "original" else "_" + param_name)
    owner = types.get(module_name, nn.Module)
    parts = module_name.split(".") if module_name else []
    if any(issubclass(types.get(".".join(parts[:k]), nn.Module), nn.MultiheadAttention) for k in range(len(parts))):
        owner = nn.MultiheadAttention
    return (f"{module_name}.{param_name}" if module_name else param_name), owner


@dataclasses.dataclass
class _Plan:
    """The cached layout of one step for a given set of tensors with gradients."""

    active: tuple[bool, ...]
    state: Any  # the optimizer's state mapping when the plan was made, its size, and the planned tensors' entries
    state_dicts: list[dict[str, Any]]
    state_len: int
    betas: list[Any]  # every param_group's betas when the plan was made
    indices: list[int]
    all_active: bool
    index_tensor: Tensor | None
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    step_counts: Tensor  # the planned tensors' AdamW step counts (float32, on the CPU, as AdamW keeps them)
    step_tensors: list[Tensor]  # their state[p]["step"]: 0-dim views of step_counts
    step_version: int | None  # step_counts' version counter after the plan's last change (None: inference tensor)
    param_group_slices: list[tuple[int, slice]]
    blocking: F.Blocking  # the runs of the moment pass (cache blocking on the CPU: limit set)
    buckets: list[F.Bucket]
    bucket_groups: Tensor  # the buckets' modulator groups
    beta1: Tensor
    beta2: Tensor
    stat_coefs: dict[str, Tensor]
    scalar_dtype: torch.dtype | None  # of the update's per-bucket scalars (float64 for float64 parameters)
    narrow: bool  # some parameters are of F.NARROW_DTYPES (their norms are taken in float32)
    cos_noise: Tensor  # per tensor, F.cos_noise
    numel: Tensor  # per tensor, element counts
    measure_v_sum: bool  # sum(v) is read from the tensors, not carried (F.CARRIED_V_DTYPES)
    has_stats: bool = False  # the planned tensors are flagged in MetaAdamW._has_stats


def _check_state_keys(state_dict: dict[str, Any], what: str) -> None:
    """Refuse per-parameter entries keyed by anything but the parameter indices of the saved
    param_groups (torch.optim would keep them as junk and silently start those parameters'
    state afresh): e.g. the string keys that torch.distributed.checkpoint.load leaves for the
    non-tensor values of an integer-keyed dict."""
    state, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        return  # torch.optim's own checks name a malformed state dict
    known = {i for g in groups if isinstance(g, dict) for i in g.get("params", ())}
    bad = [k for k in state if k not in known]
    if bad:
        raise ValueError(
            f"{what}state dict has per-parameter entries under {bad[:5]!r}{' ...' if len(bad) > 5 else ''}, which "
            f"are not the parameters of its param_groups, and nothing was loaded. Was it loaded through "
            f"torch.distributed.checkpoint.load? That turns the integer keys of non-tensor values into strings (and "
            f"writes tensors in place, into the live moments that state_dict() returns). Save and load "
            f"optimizer.state_dict() with torch.save and torch.load")


def _check_loaded_hyperparameters(state_dict: dict[str, Any]) -> None:
    """Refuse, before anything is loaded, saved param groups whose lr, betas, eps or weight_decay
    MetaAdamW cannot step with (missing, or not a number in AdamW's range), checked as the
    constructor's arguments are: torch.optim loads them as they are, and they failed at the next
    step (a string lr) or were stepped with although the constructor refuses them (a negative lr).
    One-element tensors (of an AdamW built with tensor hyperparameters) count by their values,
    which the load takes."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return  # torch.optim's own checks name a malformed state dict
    keys = ("lr", "betas", "eps", "weight_decay")
    for k, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        where = f"the checkpoint's param group {k}: "
        missing = [key for key in keys if key not in group]
        _check(not missing, f"{where}it has no {', '.join(missing)}, and nothing was loaded: a damaged checkpoint, "
                            f"or not one of optimizer.state_dict()")
        value = {key: _scalar_value(group[key]) for key in keys}
        if isinstance(value["betas"], (tuple, list)):
            value["betas"] = tuple(map(_scalar_value, value["betas"]))
        try:
            _check_adamw_args(**value, where=where)
        except ValueError as err:
            raise ValueError(f"{err}. Nothing was loaded") from None


def _scalar_value(v: Any) -> Any:
    """A one-element real tensor's value as a Python float (as a load takes it); anything else as it is."""
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool \
            and v.device.type != "meta":
        return float(v.detach())
    return v


def _moment_problem(t: Any, p: Tensor) -> str | None:
    """Why ``t`` cannot be loaded as a moment of parameter ``p`` (None: it can; torch.optim casts it to
    ``p``'s dtype and device, as for torch.optim.AdamW)."""
    if not isinstance(t, Tensor):
        return f"is {described(t)}, not a tensor"
    if t.layout != torch.strided:
        return f"is a {t.layout} tensor (moments are dense)"
    if t.device.type == "meta":
        return "is on the 'meta' device, which holds no values"
    if not t.is_floating_point():
        return f"is of dtype {t.dtype} (moments are real floating-point tensors, cast to the parameter's {p.dtype})"
    if tuple(t.shape) != tuple(p.shape):
        return f"{tuple(t.shape)}, parameter {tuple(p.shape)}"
    return None


def _is_flag(value: Any) -> bool:
    """True or False, in the forms a checkpoint's flag may take once converted (read with ``bool``): a
    bool, a numpy bool, a one-element bool tensor, or the integer 0 or 1 - not None, a string (``'no'``
    is true) or a tensor of several values."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.dtype == torch.bool and value.device.type != "meta"
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return getattr(getattr(value, "dtype", None), "kind", None) == "b"
    return isinstance(value, bool) or (_is_int(value) and value in (0, 1))


def _is_step_count(step: Any) -> bool:
    """A saved AdamW step count: an integer >= 0, as a number or a one-element real tensor (AdamW
    saves a float tensor); None is no count (the meta state's, or 0 for an AdamW checkpoint)."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool or step.device.type == "meta":
            return False
        step = step.item()
    if step is None:
        return True
    return (_real(step) and math.isfinite(step) and step >= 0 and float(step).is_integer())


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """``torch.random.fork_rng`` of the CPU generator and, for an accelerator, ``device``'s; and
    Python's and NumPy's global random states (:func:`~metaadamw.meta.host_rng_states`) put back
    too: a model or loss_fn that draws from them in the meta-update's passes (a layer drop decided
    by ``random.random()``) left the training steps after it another stream than without it."""
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else torch.get_device_module(device).current_device()
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    host = host_rng_states()
    try:
        with fork:
            yield
    finally:
        set_host_rng_states(host)


def _version_of(t: Tensor) -> int | None:
    """The version counter of ``t`` (shared by its views; every in-place change moves it), read on
    the host; None for an inference tensor (made by a step under ``torch.inference_mode()``), which has none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _step_tensor(n: int | list[int]) -> Tensor:
    """AdamW step counts as ``torch.optim.AdamW`` keeps them in its state (without ``capturable`` or
    ``fused``): float32 on the CPU, whatever the parameters' device (no host sync); one count: 0-dim."""
    return torch.tensor(n, dtype=torch.float32, device="cpu")


def _is_int(v: Any) -> bool:
    """An integer (numpy integers included), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_OBJECTIVE_ATTRIBUTES = ("terms", "signed_terms", "second_order", "needs_train_loss", "needs_val")

#: how MetaAdamW calls the component each config key names: (registry, the call in words, arguments to bind)
_COMPONENT_CALLS: dict[str, tuple[Any, str, tuple[Any, ...], dict[str, Any]]] = {
    "features": (FEATURES, "cls(layout, *, time_step, second_moment) -> a metaadamw.FeatureExtractor",
                 (None,), dict(time_step=True, second_moment=True)),
    "grouping": (GROUPINGS, "fn(tensors: list[TensorInfo]) -> one group name per tensor", ([],), {}),
    "objective": (OBJECTIVES, "cls() with no arguments (or register an instance of it)", (), {}),
    "weighting": (WEIGHTINGS, "cls(terms, signed_terms, *, priorities, weights, form) -> a metaadamw.Weighting",
                  ((), ()), dict(priorities=None, weights=None, form="regression")),
}


def component_registries() -> dict[str, Any]:
    """The registry of each config key that names a component MetaAdamW builds ('features',
    'grouping', 'objective', 'weighting'), from the table of how MetaAdamW calls them: the keys whose
    plugin components ``ablate`` fingerprints (:func:`ablate.provenance.code_fingerprint`)."""
    return {kind: call[0] for kind, call in _COMPONENT_CALLS.items()}


def component_signature_problem(kind: str, name: str) -> str | None:
    """Why the component registered as ``name`` for ``kind`` ('features', 'grouping', 'objective' or
    'weighting') cannot be called as MetaAdamW calls it (None: it can, or its signature cannot be
    read): a plugin's constructor with the wrong signature is named with the expected call when the
    optimizer is made - and by ``ablate`` when a study is loaded, once, not in every trial."""
    registry, expected, args, kwargs = _COMPONENT_CALLS[kind]
    if name not in registry:
        return None  # (the registry's own error names what exists)
    obj = registry.get(name)
    if kind == "objective" and not isinstance(obj, type):
        return None  # an instance is used as it is; a factory is checked by _make_objective
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # no signature to read (a builtin): left to the call
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        what = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
        return (f"the {registry.kind} {name!r} ({what}{signature}) cannot be called as MetaAdamW calls it, "
                f"{expected} ({exc})")
    return None


def unused_options(weighting: Any, gating: Any, *, time_step: Any = True, features: Any = None) -> set[str]:
    """The options a MetaAdamW with this ``weighting`` and ``gating`` does not use: a built-in
    weighting's form, priorities or fixed weights that it ignores (a weighting a user registered is
    given all of them), ``gate_l1`` without gating; with ``time_step=False`` and a built-in feature
    extractor ``features``, ``total_steps`` (it only normalises the time-step feature; an extractor a
    user registered is given the time all the same)."""
    unused = {key for key, ignoring in (("weighting_form", IGNORE_FORM), ("priorities", IGNORE_PRIORITIES),
                                        ("fixed_weights", IGNORE_FIXED_WEIGHTS)) if weighting in ignoring}
    if not gating:
        unused.add("gate_l1")
    if time_step is False and isinstance(features, str) and features in FEATURES and \
            getattr(FEATURES.get(features), "__module__", None) == FeatureExtractor.__module__:
        unused.add("total_steps")
    return unused


def component_kind_problem(kind: str, name: str) -> str | None:
    """Why the class registered as ``name`` for ``kind`` is not the kind of component MetaAdamW
    accepts (a feature extractor that is no :class:`FeatureExtractor`, a weighting that is no
    ``nn.Module``), which MetaAdamW refuses once it has made one; None: it is, or it is not a class
    (a factory's result is only known once called). For ``ablate``'s check of a study file, once,
    instead of a failure in every trial."""
    registry = _COMPONENT_CALLS[kind][0]
    base = {"features": FeatureExtractor, "weighting": nn.Module}.get(kind)
    if base is None or name not in registry:
        return None
    obj = registry.get(name)
    if isinstance(obj, type) and not issubclass(obj, base):
        what = f"{obj.__module__}.{obj.__qualname__}"
        fix = ("subclass metaadamw.features.FeatureExtractor" if kind == "features" else
               "subclass metaadamw.Weighting (an nn.Module: its log-variances are meta-parameters)")
        return f"the {registry.kind} {name!r} ({what}) is not a {registry.kind} MetaAdamW can use: {fix}"
    return None


def _make_objective(name: str) -> Any:
    """The objective registered as ``name``: a class is instantiated, an object that declares its
    terms (an instance) is used as it is, and anything else is a factory called with no arguments."""
    registered = OBJECTIVES.get(name)
    objective = registered
    if isinstance(registered, type) or (not hasattr(registered, "terms") and _callable_without_arguments(registered)):
        objective = registered()
    terms = getattr(objective, "terms", None)
    missing = [a for a in _OBJECTIVE_ATTRIBUTES if not hasattr(objective, a)]
    ok = (callable(objective) and not missing and isinstance(terms, (tuple, list)) and len(terms) > 0
          and all(isinstance(t, str) for t in terms))
    why = (f"it lacks {', '.join(missing)}" if missing else
           "it must be callable and declare its terms as a non-empty tuple of names")
    _check(ok, f"objective {name!r} gave {objective!r}, which is not a meta objective: {why}. "
               f"Subclass metaadamw.MetaObjective (which declares terms, signed_terms, second_order, "
               f"needs_train_loss, needs_val) and register the class or an instance of it")
    return objective


def _callable_without_arguments(fn: Any) -> bool:
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): try it
        return callable(fn)
    return True


def _sparse_layers_of(p: Tensor, model: nn.Module | None) -> list[str]:
    """The layers of ``model`` that make sparse gradients (``nn.Embedding(sparse=True)``,
    ``nn.EmbeddingBag(sparse=True)``) and hold ``p`` as their weight, named for the error
    step() and meta_step() raise on a sparse gradient. Not refused when the optimizer is made:
    whether such a weight's gradient is sparse depends on forward, which autograd sums into a
    dense one where the weight is also used densely - tied to an output projection, or called
    directly (``h @ self.emb.weight.T``), which nothing in the model's structure shows."""
    if model is None:
        return []
    return [f"{name!r} (nn.{type(module).__name__}(sparse=True))"
            for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and module.weight is p]


def _check_not_sharded(kinds: list[str]) -> None:
    _check(not kinds, f"MetaAdamW got sharded or distributed tensors ({', '.join(kinds)}: FSDP's, ZeRO's or tensor "
                      f"parallelism's), which it does not support: each rank would see the statistics of its shard "
                      f"only, and its updates cannot take such tensors. Use DistributedDataParallel with MetaAdamW "
                      f"itself as the optimizer (or train without sharding)")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_run_setting(name: str, value: Any) -> Any:
    """Validate ``refresh_every``, ``total_steps`` or ``meta_gradient`` (in the constructor and when set
    later); returns the value to store (an integer as a Python int)."""
    if name == "meta_gradient":
        _check(value in META_GRADIENTS, f"meta_gradient must be one of {META_GRADIENTS}, got {value!r}")
        return value
    if name == "total_steps":
        _check(value is None or (_is_int(value) and value >= 1),
               f"total_steps must be None or an integer >= 1, got {value!r}")
        return None if value is None else int(value)
    _check(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


#: AdamW's flags MetaAdamW accepts only at their defaults, and why
_ADAMW_FLAGS = {
    "amsgrad": (False, "MetaAdamW modulates AdamW's update without AMSGrad's running maximum of the second moments"),
    "maximize": (False, "minimise the negated objective instead (and give meta_step the same loss_fn)"),
    "capturable": (False, "MetaAdamW's step() cannot be captured in a CUDA graph (it never reads values back "
                          "to the host, but its layout follows which parameters have gradients)"),
    "differentiable": (False, "MetaAdamW's step() runs without autograd (its meta_step() trains the modulator)"),
    "fused": (None, "MetaAdamW's foreach implementation (the default, foreach=None) is its fast path"),
}


#: torch.optim.AdamW's own per-group flags, which MetaAdamW's param groups do not keep
_TORCH_FLAGS = (*_ADAMW_FLAGS, "foreach", "decoupled_weight_decay")


def _portable(value: Any) -> Any:
    """An option's value as every rank writes it alike: plain values as they are, anything else by
    its type's name (a repr with a memory address would differ between ranks)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _check_decoupled(where: str, group: dict[str, Any]) -> None:
    """Refuse ``decoupled_weight_decay=False`` with a weight decay (torch.optim.AdamW honours it per group)."""
    _check(group.get("decoupled_weight_decay", True) or not group.get("weight_decay"),
           f"{where}decoupled_weight_decay=False is not supported: that is torch.optim.Adam's L2 penalty added to the "
           f"gradient, while MetaAdamW (like AdamW) decays the weights directly, so the same weight_decay would mean "
           f"another rule. Leave decoupled_weight_decay=True (or out), or set the group's weight_decay=0")


def _check_adamw_flags(where: str, **flags: Any) -> None:
    for name, value in flags.items():
        default, why = _ADAMW_FLAGS[name]
        _check(not value, f"{where}{name}={value!r} is not supported: {why}; leave {name}={default!r}")


def _number(name: str, value: Any, low: float, high: float, why: str = "", above_low: bool = False,
            below_high: bool = False) -> float:
    """``value`` as a float, checked to be a real number in the interval (closed unless said)."""
    ok = _real(value) and (low < value if above_low else low <= value) and (
        value < high if below_high or high == math.inf else value <= high)
    if not ok:
        interval = f"{'(' if above_low else '['}{low:g}, {high:g}{')' if below_high or high == math.inf else ']'}"
        raise ValueError(f"{name} must be a number in {interval}{' ' + why if why else ''}, got {value!r}")
    return float(value)


def _real(value: Any) -> bool:
    """A real number (numpy scalars and 0-dim arrays included, as AdamW takes them), not a bool or a tensor."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "dtype"):
        return value.dtype.kind in "iuf"  # (np.array(1e-3): AdamW takes it; np.bool_ is no number)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shortest(value: Tensor) -> float:
    """The shortest decimal that is ``value`` (one element) in its dtype (float32's 1e-3 reads
    0.0010000000474974513 as a double)."""
    exact = float(value.detach().cpu())
    if not value.is_floating_point() or not math.isfinite(exact):
        return exact
    for digits in range(1, 18):
        short = float(f"{exact:.{digits}g}")
        if torch.tensor(short, dtype=value.dtype).item() == exact:
            return short
    return exact


def _check_adamw_args(lr: Any, betas: Any, eps: Any, weight_decay: Any,
                      where: str = "") -> tuple[float, tuple[float, float], float, float]:
    """AdamW's checks (a number, >= 0; betas in [0, 1)), with the value named; returns the values
    as Python floats (numpy scalars are accepted as AdamW accepts them)."""
    if isinstance(lr, Tensor):
        example = f", e.g. lr={_shortest(lr)!r}" if lr.numel() == 1 else ""
        raise ValueError(f"{where}lr as a Tensor is not supported (nor is it by torch.optim.AdamW with foreach=True "
                         f"and capturable=False): pass a float{example}")
    # a one-element tensor eps or weight_decay, which AdamW takes on every path: its value, as a float
    eps, weight_decay = (float(v.detach()) if isinstance(v, Tensor) and v.numel() == 1 and (v.is_floating_point() or (
        not v.is_complex() and v.dtype != torch.bool)) else v for v in (eps, weight_decay))
    _check(_real(lr) and 0 <= lr < math.inf, f"{where}Invalid learning rate: lr={lr!r} (must be a finite number >= 0)")
    _check(_real(eps) and 0 <= eps < math.inf, f"{where}Invalid epsilon value: eps={eps!r} (must be finite and >= 0)")
    if isinstance(betas, Tensor) or (isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas)):
        raise ValueError(f"{where}betas as Tensors are not supported (nor are they by torch.optim.AdamW with foreach=True "
                         f"and capturable=False): pass floats, e.g. "
                         f"betas=(0.9, 0.999)")
    if not isinstance(betas, (tuple, list, str, bytes, dict)) and hasattr(betas, "__len__") and hasattr(betas, "__iter__"):
        betas = tuple(betas)  # a numpy array of two, as AdamW accepts
    _check_betas(betas, where)
    _check(_real(weight_decay) and 0 <= weight_decay < math.inf,
           f"{where}Invalid weight_decay value: {weight_decay!r} (must be finite and >= 0)")
    return float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)


def _check_betas(betas: Any, where: str = "") -> None:
    """A pair of real numbers in [0, 1) (in the constructor, and at a step where a group's betas changed)."""
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2,
           f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        _check(_real(b) and 0.0 <= b < 1.0, f"{where}Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")


def _eager_step(opt: MetaAdamW, closure: Callable[[], Any] | None) -> Any:
    """MetaAdamW's step as Dynamo must call it: outside the graph (see :meth:`MetaAdamW.step`), through
    :data:`_EAGER_STEP`, its ``torch.compiler.disable`` wrapper."""
    return opt._step_with_closure(closure)


#: :func:`_eager_step` wrapped in ``torch.compiler.disable``, which :meth:`MetaAdamW.step` calls inside
#: compiled code; made by :func:`_prepare_eager_step` when the first optimizer is made (or unpickled), not
#: when metaadamw is imported: the wrapper imports ``torch._dynamo``, about a second, which a program that
#: only reads results or parses a study (``ablate report``, ``ablate list``) need not pay.
_EAGER_STEP: Callable[[MetaAdamW, Callable[[], Any] | None], Any] | None = None


def _prepare_eager_step() -> None:
    """Make :data:`_EAGER_STEP` once: before any step of any optimizer, so that Dynamo, tracing a step,
    finds the disabled wrapper there (a wrapper made while tracing would be traced itself)."""
    global _EAGER_STEP
    if _EAGER_STEP is None:
        _EAGER_STEP = torch.compiler.disable(_eager_step)
