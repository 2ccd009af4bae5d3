"""The meta-update: train the modulator through one hypothetical MetaAdamW step.

    1. g      = grad L(theta; batch1)            (first order, a constant; or the caller's .grad;
                                                  a frozen tensor's .grad, with which step() moves it),
       and L_val = L(theta; val)                 (a constant, computed here while no graph is held)
    2. m', v' = AdamW moments updated with g; features at theta      (paper Algorithm 2)
    3. alpha, beta, lambda1, lambda2 = modulator(features)           (with a graph)
    4. theta' = theta - lr alpha (m'_hat / (sqrt(v'_hat) + eps) + beta wd theta)
    5. L_train' = L(theta'; batch2) and g' = its gradient, L_val' = L(theta'; val) and its
       gradient   (one validation batch for both validation terms, with the dropout masks of
       the pass at theta; each pass only where the objective uses it: ``gen_gap`` has no L_val,
       ``loss_decrease`` no L_train')
    6. terms -> weighting -> meta-loss (+ gate penalty); one step of the meta-optimizer.

The meta-gradient is taken in stages that each traverse their graph once: the meta-loss is
differentiated with respect to its inputs (the multipliers, L_train', L_val', g' and the
weighting's own parameters); the gradient with respect to theta' is assembled from those
(``dL/dL_train' * g' + dL/dL_val' * grad L_val' + H v`` with ``v = dL/dg'`` and H the Hessian of
L(.; batch2) at theta'); it goes back through theta' to alpha and beta, and then once through the
encoder. H v is where the two ``meta_gradient`` modes differ:

* ``"finite_difference"`` (default): ``(grad L(theta' + eps v; batch2) - g') / eps`` with the step
  of matrix-free Newton methods, ``eps = sqrt(machine eps) (1 + ||theta'||) / ||v||``, the extra
  forward pass replaying the random stream of the g' pass (same dropout masks) and starting, as
  every pass does, from the model's buffers on entry (the same power-iteration vectors of
  ``spectral_norm``). Five forward and
  four backward passes for ``combined`` (four and three when g comes from ``.grad``), no
  second-order graph.
* ``"exact"``: g' is computed with ``create_graph=True`` and H v comes out of the double backward
  (the paper). Four forward passes; the one that is differentiated twice runs inside
  :func:`twice_differentiable_kernels` (math attention; on CUDA, no cuDNN), since the fused
  attention kernels and cuDNN's RNNs have no double backward - and with it the validation passes
  and the backward passes, so that an activation-checkpointed part is recomputed on the kernels
  it ran on. Models need no special code.

The model's parameters are never written: theta' lives in separate tensors swapped into the
modules for the forward passes. Buffers (BatchNorm running statistics) are restored afterwards,
as are the rows an embedding with ``max_norm`` renormalises in its forward and each module's
training mode (a loss_fn may set it), and ``.grad`` is never touched, so the model is exactly as
before the call. Other parameters a forward pass writes
in place (a running mean kept in a frozen parameter) are not copied: the call warns after the
passes, naming them (such state belongs in a buffer; an in-place constraint that changes nothing
is harmless).

A meta-update whose meta-loss, meta-gradient or an objective term it weights is not finite is
skipped (``record.skipped``, counted in ``optimizer.meta_skipped``): the modulator stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaadamw import distributed as D
from metaadamw import functional as F
from metaadamw.features import normalised_time
from metaadamw.objectives import MetaQuantities, needs_val_at_theta

if TYPE_CHECKING:
    from metaadamw.optimizer import MetaAdamW

#: how the meta-gradient goes through g' (see the module docstring)
META_GRADIENTS = ("finite_difference", "exact")


@dataclasses.dataclass
class MetaRecord:
    """What one meta-update did, as plain Python values (for logs and telemetry tables)."""

    step: int  # optimizer.global_step when it ran
    meta_loss: float
    terms: dict[str, float]  # objective term -> value
    sigmas: dict[str, float]  # weighting sigma per term (empty for sum / fixed)
    groups: list[str]
    alpha: list[float]  # per group, at theta (the multipliers the hypothetical step used)
    beta: list[float]
    lambda1: list[float]
    lambda2: list[float]
    skipped: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, replacements: dict[int, Tensor],
                       names: dict[int, str] | None = None) -> Iterator[None]:
    """Temporarily replace parameters (by identity) with other tensors in every module using them
    (tied weights included). RNN modules refresh their flat weights on the next forward. A
    replacement for a tensor no module of ``model`` holds is refused (``names``: how the error
    calls them): a loss that uses it from outside the model would see its current value."""
    saved, found = [], set()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in replacements:
                saved.append((module, name, p))
                found.add(id(p))
                module._parameters[name] = replacements[id(p)]
    try:
        if len(found) < len(replacements):
            buffers = {id(b) for b in model.buffers()}
            missing = [repr((names or {}).get(k, "(unnamed)")) + (" (a buffer of the model: register it as a parameter)"
                                                                 if k in buffers else "")
                       for k in replacements if k not in found]
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"meta_step: {len(missing)} tensor(s) this optimizer trains are not parameters of the model given to "
                f"meta_step: {shown}. The meta-update evaluates the loss at hypothetical values of the model's "
                f"parameters; a tensor that loss_fn uses from outside the model (a learnable temperature, a "
                f"criterion with weights) would keep its current value there and the meta-gradient would be wrong. "
                f"Register it on the model (model.register_parameter(name, tensor), or make the criterion a "
                f"submodule), or pass meta_step a module that holds the model and those tensors")
        yield
    finally:
        for module, name, p in saved:
            module._parameters[name] = p


@contextlib.contextmanager
def _explained_double_backward() -> Iterator[None]:
    """Errors of a model that cannot be differentiated twice (a custom autograd.Function without
    a double backward, an op whose backward has no derivative such as ``F.ctc_loss``, a
    torch.compile'd model's donated buffers), with what to use instead."""
    try:
        yield
    except RuntimeError as exc:
        said = str(exc)  # (an op whose backward has no derivative: "derivative for aten::_ctc_loss_backward ...")
        if ("double backward" not in said and "donated buffer" not in said
                and not re.search(r"derivative for \S*backward\S* is not implemented", said)):
            raise
        raise RuntimeError(f"meta_gradient='exact' differentiates the loss twice, which this model cannot "
                           f"be ({exc}). Use meta_gradient='finite_difference' (the default), which needs "
                           f"first derivatives only - it works with torch.compile'd models.") from exc


@contextlib.contextmanager
def twice_differentiable_kernels(device: torch.device) -> Iterator[None]:
    """Kernels with a double backward, for the one forward pass that ``meta_gradient="exact"``
    differentiates twice, and the passes and backward passes around it: the math implementation of
    ``scaled_dot_product_attention`` (the fused CPU and CUDA kernels have no double backward) and,
    on CUDA, no cuDNN (its RNN kernels have none either). Every other pass - the finite-difference
    meta-gradient's, training steps - keeps the fast kernels."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


class ModelState:
    """What a forward pass may change in a model besides its parameters, as it was when made:
    every buffer (BatchNorm running statistics, counters, power-iteration vectors) and which
    buffers each module holds (a buffer a forward pass replaces by another tensor, fills in from
    None or registers is put back as it was), and the weights a forward pass writes in place:
    those of embeddings with ``max_norm``, whose looked-up rows are renormalised (the other
    parameters are never written). :meth:`restore` writes every value back (version counters
    cannot tell what changed: BatchNorm's kernels update their running statistics without moving
    them); a tensor held by several modules is saved and written once. Tensors a module holds as
    plain attributes are put back too - the tensor it held, not values a pass wrote into it in
    place (state a forward pass updates in place belongs in a buffer, whose values are restored) -
    with the module's other plain attributes (a cache's key): the weight that ``torch.nn.utils.weight_norm`` and
    ``spectral_norm`` (the hook-based ones) compute before each forward pass, which would otherwise
    hold the last hypothetical pass's weight, and its graph, until the next forward pass; and on
    the final :meth:`restore`, a tensor a forward pass set in an attribute that held none (``self.attn
    = weights``, where ``__init__`` set None; or a new attribute) is undone (it held a hypothetical
    pass's values and graph), with the module's other plain attributes (a cache's key), and so is a
    parameter a forward pass registered or replaced. Between the passes that check is skipped (~130 us
    on a ResNet-18). The values of the other parameters are not saved (a frozen backbone's copy would
    double its memory): :meth:`warn_parameters_written` warns of a forward pass that wrote one."""

    def __init__(self, model: nn.Module):
        lazy = sorted({type(m).__name__ for m in model.modules() if any(
            isinstance(t, nn.parameter.UninitializedTensorMixin) for t in (*m._parameters.values(), *m._buffers.values()))})
        if lazy:  # (their shapes, and the state a pass gives them, come from the first forward pass)
            raise ValueError(f"meta_step: the model has lazy modules that are not initialised yet ({', '.join(lazy)}): "
                             f"run a forward pass (a training step) before the first meta_step")
        self._dicts = [(m, dict(m.__dict__)) for m in model.modules()]
        self._holders = [(m, dict(m._buffers), saved) for m, saved in self._dicts]
        self._attributes = [(m, held, saved) for m, saved in self._dicts
                            if (held := {k: v for k, v in saved.items() if _holds_tensors(v)})]
        # (an inference tensor - a cache first built under torch.inference_mode() - cannot be written
        # outside it, by a pass or by restore: it is only put back where a pass replaced it)
        buffers = {id(b): b for _, held, _ in self._holders for b in held.values()
                   if b is not None and not b.is_inference()}
        self._buffers = {k: (b, b.detach().clone()) for k, b in buffers.items()}
        # (the module's own weight: a parametrized one is computed at each access, and its renorm writes no parameter)
        self._weights = [(w, w.detach().clone()) for m in model.modules()
                         if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
                         and (w := m._parameters.get("weight")) is not None]
        # which parameters each module holds (one a forward pass registers is removed again), and every other
        # parameter's version counter: a forward pass that writes one in place (a frozen parameter updated as an
        # EMA, an in-place weight constraint) is warned of after the call - the values are not saved, as a copy of a
        # frozen backbone would double its memory; state a forward pass updates belongs in a buffer
        self._parameter_holders = [(m, dict(m._parameters), saved) for m, saved in self._dicts]
        renormalised = {id(w) for w, _ in self._weights}
        self._versions = [(name, p, p._version) for name, p in model.named_parameters()
                          if id(p) not in renormalised and not p.is_inference()]
        self._modes = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def restore(self, weights: bool = True) -> None:
        """Everything back in place. ``weights=False``: the buffers only (between the meta-update's
        passes: theta is read from the weights after the passes at theta, as the training step that
        follows a forward pass updates the weights it renormalised)."""
        self._put_back_holders()
        for t, value in self._buffers.values():
            t.copy_(value)
        for t, value in self._weights if weights else ():
            t.copy_(value)
        if weights:
            self._put_back_parameters()
            self._undo_new_tensor_attributes()
            self._put_back_modes()

    def _put_back_modes(self) -> None:
        """Each module's training mode as on entry. A loss_fn that sets it (``model.train()`` at its start,
        as a training loop's does) left a model its caller had put in eval mode in training mode: the
        evaluation that followed meta_step ran with dropout and updated BatchNorm's running statistics.
        Only on the final :meth:`restore`: between the passes the mode is the loss_fn's to set."""
        for module, training in self._modes:
            if module.training != training:
                module.training = training

    def _put_back_parameters(self) -> None:
        """Each module's parameters as on entry: one a forward pass registered (it holds a hypothetical
        pass's values, and no optimizer trains it) is removed, one it replaced put back. Only on the final
        :meth:`restore`: between the passes the model holds theta' (:func:`swapped_parameters`)."""
        for module, held, saved in self._parameter_holders:
            now = module._parameters
            if set(now.keys()) != held.keys() or any(now[k] is not v for k, v in held.items()):
                _restore_plain_attributes(module, saved)  # (a key kept beside it, as for a buffer)
                for name in [k for k in now.keys() if k not in held]:
                    del now[name]
                for name, p in held.items():
                    now[name] = p

    def warn_parameters_written(self) -> None:
        """Warn of a model whose forward pass wrote parameters in place (other than the embeddings with
        ``max_norm``, which are restored): their values on entry are not saved, so they now hold what
        the meta-update's passes wrote - at the hypothetical parameters too. A warning, not an error:
        an in-place weight constraint (``self.weight.clamp_(0)`` in ``forward``) writes a parameter
        without changing it, which the version counters read here cannot tell from an EMA's update (a
        write through ``.data`` bypasses them and is not seen)."""
        written = [name for name, p, version in self._versions if p._version != version]
        if written:
            shown = ", ".join(map(repr, written[:5])) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
            warnings.warn(
                f"meta_step: the model's forward pass wrote {len(written)} parameter(s) in place: {shown}. The "
                f"meta-update restores the buffers a forward pass changes but does not copy the parameters (a copy "
                f"of a frozen backbone would double its memory), so they now hold the values its passes wrote, at the "
                f"hypothetical parameters too. Keep state that a forward pass updates (an EMA, a running estimate) in "
                f"a buffer (module.register_buffer(name, tensor)), which meta_step restores, not in a parameter; an "
                f"in-place constraint that leaves the values as they were (a clamp the weights already satisfy) is "
                f"harmless", RuntimeWarning, stacklevel=2)

    def _undo_new_tensor_attributes(self) -> None:
        """A module a forward pass left a new tensor (or list of tensors) in gets all its plain
        attributes back as on entry, not the tensor alone: a cache keeps its key beside it (``self.seq_len_cached = T``
        with ``self.cos_cached``), and a key without its tensor would skip the rebuild."""
        for module, saved in self._dicts:
            now = module.__dict__
            if any(saved.get(k, _MISSING) is not v and _holds_tensors(v) for k, v in now.items()):
                _restore_plain_attributes(module, saved)

    def renormalised_weights(self) -> list[Tensor]:
        """The weights a forward pass writes in place (embeddings with ``max_norm``)."""
        return [w for w, _ in self._weights]

    @torch.no_grad()
    def restore_out_of_place(self) -> None:
        """The buffers' values on entry in new tensors, for a pass after one whose graph is still
        held (the exact path's): that graph may have saved the buffers, which must not be written.
        :meth:`restore` puts the modules' own tensors back."""
        self._put_back_holders()
        fresh = {k: value.clone() for k, (_, value) in self._buffers.items()}
        for module, held, _ in self._holders:
            for name, b in held.items():
                if b is not None:
                    module._buffers[name] = fresh.get(id(b), b)

    def _put_back_holders(self) -> None:
        # a tensor held on entry and replaced: the module's other plain attributes come back with it
        # (a cache's key, ``self.seq_len_cached``, would otherwise describe the replaced tensor)
        for module, held, saved in self._attributes:
            if any(module.__dict__.get(name) is not value for name, value in held.items()):
                _restore_plain_attributes(module, saved)
        for module, held, saved in self._holders:
            # (through keys() and item assignment: a TorchScript module's buffers are an OrderedDictWrapper,
            # whose keys() is a list and which has neither __iter__ nor update)
            now = module._buffers
            if set(now.keys()) != held.keys() or any(now[k] is not v for k, v in held.items()):
                _restore_plain_attributes(module, saved)  # (a buffer cache's key, as for a plain attribute)
                for name in [k for k in now.keys() if k not in held]:  # registered by a forward pass
                    del now[name]
                    module._non_persistent_buffers_set.discard(name)
                for name, b in held.items():
                    now[name] = b


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a list or tuple of them (an RNN's ``_flat_weights``, which a pass at theta'
    rebuilds to hold theta')."""
    return isinstance(value, Tensor) or (isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value))


def _restore_plain_attributes(module: nn.Module, saved: dict[str, Any]) -> None:
    """``module.__dict__`` as ``saved`` (a copy made earlier): attributes set since are removed,
    changed ones put back (``_parameters``, ``_buffers`` and the like are the same dicts)."""
    now = module.__dict__
    for name in [k for k in now if k not in saved]:
        del now[name]
    for name, value in saved.items():
        if now.get(name, _MISSING) is not value:
            now[name] = value


_MISSING = object()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[ModelState]:
    """The model's :class:`ModelState` on entry, restored on exit (the meta-update's passes change
    nothing the caller sees); yielded, for passes that must start from it too. Inside, the cache of
    ``torch.nn.utils.parametrize.cached()`` is off (a ``meta_step`` called within it computed every
    pass at theta' with the parametrized weights cached at theta, without a word); the caller's
    cached values are left as they were."""
    from torch.nn.utils import parametrize

    state = ModelState(model)
    caching = getattr(parametrize, "_cache_enabled", None)  # (a private counter, since torch 1.9)
    if caching is not None:
        parametrize._cache_enabled = 0
    try:
        yield state
    finally:
        if caching is not None:
            parametrize._cache_enabled = caching
        state.restore()
    state.warn_parameters_written()  # (after a successful call only: an error of the call itself comes first)


def host_rng_states() -> tuple[Any, Any]:
    """The global random states of Python's ``random`` and, where NumPy is imported, of ``numpy.random``:
    a model or loss_fn may draw from them (a layer drop decided by ``random.random()``, as older Hugging
    Face models do; an augmentation in ``loss_fn``), and the meta-update replays and restores them with
    torch's (NumPy is not imported here: a process that has not imported it draws nothing from it)."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), (numpy.random.get_state() if numpy is not None else None)


def set_host_rng_states(states: tuple[Any, Any]) -> None:
    """Set what :func:`host_rng_states` returned."""
    random.setstate(states[0])
    if states[1] is not None:
        sys.modules["numpy"].random.set_state(states[1])


class _RngReplay:
    """Replays the random stream of a forward pass (dropout masks): the finite-difference gradient is
    taken with the same masks as g', and L(theta'; val) with those of L(theta; val), so that the loss
    decrease is that of theta' and not of other masks. ``replay()`` rewinds to the captured state;
    ``resume()`` returns to where the stream was before the replay. The streams are torch's (CPU and
    ``device``) and Python's and NumPy's global ones (:func:`host_rng_states`): a layer drop decided
    by ``random.random()`` that differed between the g' pass and the finite-difference pass gave a
    meta-gradient 1e5x off."""

    def __init__(self, device: torch.device):
        self._module = torch.get_device_module(device) if device.type != "cpu" else None
        self._device = device
        self._states = self._get()
        self._after: tuple[Tensor, Tensor | None, tuple[Any, Any]] | None = None

    def _get(self) -> tuple[Tensor, Tensor | None, tuple[Any, Any]]:
        device_state = None
        if self._module is not None and hasattr(self._module, "get_rng_state"):
            device_state = self._module.get_rng_state(self._device)
        return torch.get_rng_state(), device_state, host_rng_states()

    def _set(self, states: tuple[Tensor, Tensor | None, tuple[Any, Any]]) -> None:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            self._module.set_rng_state(states[1], self._device)
        set_host_rng_states(states[2])

    def replay(self) -> None:
        self._after = self._get()
        self._set(self._states)

    def resume(self) -> None:
        assert self._after is not None
        self._set(self._after)


def meta_update(opt: "MetaAdamW", model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch1: Any,
                batch2: Any, val_batch: Any) -> "MetaRecord":
    """The meta-update of ``opt`` (:meth:`MetaAdamW.meta_step`). Where it is called inside
    ``torch.autocast``, the loss function runs in the caller's autocast and the meta-update's own
    maths (modulator, objective, weighting, chain rule) in full precision."""
    states = F.autocast_states(opt.device)
    if not states:
        return _meta_update(opt, model, loss_fn, batch1, batch2, val_batch)

    def caller_loss_fn(model: nn.Module, batch: Any) -> Tensor:
        # each pass with autocast's cache of its own, as a training step's forward pass in its own
        # autocast region: the cache of the caller's region (cleared when its outermost region ends)
        # does not see in-place writes, and the finite difference moves theta' in place (a cached
        # cast of theta' made H v 0); nor does it keep theta' and its casts after meta_step
        with F.autocast(states, enabled=True):
            torch.clear_autocast_cache()
            try:
                return loss_fn(model, batch)
            finally:
                torch.clear_autocast_cache()

    # the finite-difference step is sized for the precision the loss is computed in (a step sized for
    # float32 moves few weights by one bfloat16 ulp)
    loss_eps = max(torch.finfo(dtype).eps for dtype in states.values())
    with F.autocast(states, enabled=False):
        return _meta_update(opt, model, caller_loss_fn, batch1, batch2, val_batch, loss_eps)


def project_weighting(opt: "MetaAdamW") -> None:
    """The weighting's parameters back into their bounds (log-variances: see metaadamw.weighting)."""
    project = getattr(opt.weighting, "project_", None)  # (a user's weighting may have none)
    if project is not None:
        project()


def _meta_update(opt: "MetaAdamW", model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch1: Any,
                 batch2: Any, val_batch: Any, autocast_eps: float | None = None) -> "MetaRecord":
    objective = opt.objective
    exact = opt.meta_gradient == "exact"
    need_train = objective.second_order or objective.needs_train_loss
    double = exact and objective.second_order  # (the pass on batch 2 at theta' is differentiated twice)

    def kernels() -> contextlib.AbstractContextManager:
        # every pass from L(theta; val) on, and the backward passes that recompute an activation-checkpointed
        # part of them, on the same kernels: a recomputation on others saves other tensors (torch's
        # CheckpointError), and the two validation losses must differ by theta' alone
        return twice_differentiable_kernels(opt.device) if double else contextlib.nullcontext()

    params = opt._params
    world = D.world_size(opt.sync_meta)
    # every pass starts from the model's state on entry (buffers a pass both updates and reads, like
    # spectral_norm's power iteration in train mode, would otherwise differ between them by the passes
    # before: between g' and the finite-difference pass, a change the division by the tiny step turned
    # into a Hessian-vector product 37-375x off in float64); after a pass whose graph is still held (the
    # exact path's at theta'), whose saved tensors may not be written, from copies of them
    with _raised_on_every_rank(opt, world), preserved_state(model) as state, torch.enable_grad():
        project_weighting(opt)  # (set by hand, or loaded from an older checkpoint: a clamped s would get no gradient)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        if not trainable:
            raise ValueError("meta_step: no parameter of this optimizer requires grad (all frozen?): nothing to "
                             "meta-train for")
        # 1. g at theta on batch 1 (or the gradients the caller's backward pass left in .grad)
        if batch1 is None:
            grads = [params[i].grad for i in trainable]
            if all(gr is None for gr in grads):
                raise ValueError("meta_step(batch1=None) takes g from the parameters' .grad, but no parameter has a "
                                 "gradient: call it after loss.backward() and before step(), or pass batch1")
        else:
            loss1 = _loss(loss_fn, model, batch1)
            grads = _grad(loss1, [params[i] for i in trainable], zero=False, require="the loss on batch1")
            del loss1
        # frozen tensors (requires_grad=False) that hold a .grad - a zero one that zero_grad(set_to_none=False)
        # left, or one from before they were frozen - are moved by step() with that .grad, as torch.optim.AdamW
        # moves them (no backward pass changes it): theta' moves them with it too, the step that will be taken
        frozen = {i: params[i].grad for i, p in enumerate(params) if not p.requires_grad and p.grad is not None}
        by_index = {i: gr for i, gr in zip(trainable, grads) if gr is not None}
        n_trainable_active = len(by_index)
        by_index.update(frozen)
        active = sorted(by_index)
        g = [by_index[i].detach() for i in active]
        del grads, by_index, frozen
        F.check_dense(g, lambda k: opt._described_tensor(active[k]))
        # L(theta; val), with grad enabled as the pass at theta' runs: some modules compute otherwise
        # without it (nn.TransformerEncoder's fast path zeroes padded positions), and the two losses must
        # differ by theta' alone. Its graph is dropped at once, here, before any other graph is held
        # (peak memory: the exact path keeps the graphs at theta' until the end)
        loss_val = val_rng = None
        if needs_val_at_theta(objective):
            if batch1 is not None:
                state.restore(weights=False)
            val_rng = _RngReplay(opt.device)  # the pass at theta' replays its random stream (dropout masks)
            with kernels():
                loss_val = _loss(loss_fn, model, val_batch).detach()

        # 2-3. hypothetical moments, features at theta and the multipliers
        theta = [params[i].detach() for i in active]
        groups = [opt.param_groups[opt.tensor_info[i].param_group] for i in active]
        m_old, v_old, m_new, v_new = _hypothetical_moments(opt, [params[i] for i in active], g, groups)
        stats = _stats_at_theta(opt, g, m_old, v_old, m_new, v_new, theta, groups)
        del m_old, v_old
        stats = opt.full_stats(stats, None if len(active) == len(params) else torch.tensor(active, device=opt.device))
        time = normalised_time(opt._time + 1, opt.total_steps)
        opt.modulator.set_training(True)  # (MetaAdamW.meta_step restores the mode, also after an error)
        opt._set_live(active)  # the features average over the tensors with a gradient here too (before their first step)
        try:
            mult = opt.modulator(stats, time)
        finally:
            opt._set_live()
        # the meta-loss is differentiated in three stages that each traverse their graph once: down to
        # the multipliers (cut here as leaves), through theta' to alpha and beta, then through the encoder
        outputs = [mult.alpha, mult.beta, mult.lambda1, mult.lambda2]
        alpha, beta, lambda1, lambda2 = cut = [x.detach().requires_grad_() for x in outputs]

        # 4. theta' = theta * decay - scale * direction, with per-tensor scalars decay and scale that
        # carry the graph to alpha and beta (the tensors themselves need none: see _chain_to_multipliers)
        group_idx = [opt._group_of[i] for i in active]
        index = torch.tensor(group_idx, device=opt.device)
        steps = [opt._steps[i] + 1 for i in active]
        # (in float64 where step() computes its scalars in float64, for float64 parameters: in float32,
        # 1 - lr wd alpha beta rounds to 1 below ~3e-8 and theta' would lose the weight decay)
        sdtype = torch.float64 if any(t.dtype == torch.float64 for t in theta) else torch.float32
        lr_wd = torch.tensor([grp["lr"] * grp["weight_decay"] for grp in groups], dtype=sdtype, device=opt.device)
        lr_bc1 = torch.tensor([grp["lr"] / (1 - grp["betas"][0] ** t) for grp, t in zip(groups, steps)],
                              dtype=sdtype, device=opt.device)
        a, w = alpha.index_select(0, index).to(sdtype), beta.index_select(0, index).to(sdtype)
        decay = 1 - lr_wd * a * w
        scale = lr_bc1 * a
        # the Adam direction m'_hat / (sqrt(v'_hat) + eps), a constant, made in place in the moments, in
        # AdamW's order, sqrt(v') / sqrt(bc2) (as step() takes it for float16): v' / bc2 first overflows
        # float16 once |g| > 256 (float32 once |g| > 1.8e19), and the direction of those elements was 0
        # A float16 or bfloat16 tensor's step is taken from its direction in float32, rounded once into theta', as
        # step() takes it (AdamW's addcdiv): from the direction rounded to float16, theta' was a float16 ulp from the
        # step's in ~7% of the elements. One tensor at a time; the direction kept for the chain rule is the rounded one
        F.foreach_sqrt(v_new, inplace=True)
        torch._foreach_div_(v_new, [math.sqrt(1 - grp["betas"][1] ** t) for grp, t in zip(groups, steps)])
        torch._foreach_add_(v_new, [grp["eps"] for grp in groups])
        theta_prime = torch._foreach_mul(theta, decay.detach().tolist())
        scales = scale.detach().tolist()
        narrow = [m.dtype in F.NARROW_DTYPES for m in m_new]
        for tp, m, d, c, widen in zip(theta_prime, m_new, v_new, scales, narrow):
            if widen:
                tp.add_(m.float() / d.float(), alpha=-c)
        torch._foreach_div_(m_new, v_new)
        direction = m_new
        del m_new, v_new
        for tp, d, c, widen in zip(theta_prime, direction, scales, narrow):
            if not widen:
                tp.add_(d, alpha=-c)

        # 5. losses at theta' (leaf tensors: the graph to alpha and beta runs through decay and scale)
        leaves = [t.requires_grad_() for t in theta_prime]
        swap = {id(params[i]): leaf for i, leaf in zip(active, leaves)}
        names = {id(params[i]): opt.tensor_info[i].name or f"parameter {i}" for i in active}
        # (swapped out of the model for the passes at theta': a loss there that reaches them is refused)
        # (frozen tensors left out: autograd cannot be asked about a tensor that requires no grad)
        swapped_out = [(names[id(params[i])], params[i]) for i in active if params[i].requires_grad]
        partial = "" if n_trainable_active == len(trainable) else (
            f" theta' moves only the {n_trainable_active} of {len(trainable)} trainable tensors that have a gradient on batch 1"
            f" (the others' step would be zero): a loss that uses none of them - a multi-task model whose batch 1 "
            f"and batch 2 come from different tasks - reaches none. Draw batch 2 and the validation batch from "
            f"what batch 1 trains.")
        # (the objective's g and g' are of the tensors the training trains: a frozen tensor's .grad is constant -
        # no backward pass writes it - so its gradient at theta' is none a step sees, and a group of frozen
        # tensors alone takes no part, as before theta' moved them; theta' and the losses there still move them)
        frozen_at = {k for k, i in enumerate(active) if not params[i].requires_grad}
        trained_at = [k for k in range(len(active)) if k not in frozen_at]

        def trained(xs: list[Tensor]) -> list[Tensor]:
            return [xs[k] for k in trained_at] if frozen_at else xs

        q = MetaQuantities(tensor_group=index[trained_at] if frozen_at else index, num_groups=len(opt.group_names),
                           grads=trained(g), lambda1=lambda1, lambda2=lambda2, loss_val=loss_val)
        replay = None if exact or not objective.second_order else _RngReplay(opt.device)
        g_prime = g_val = None
        state.restore(weights=False)
        with swapped_parameters(model, swap, names):
            if need_train:
                with kernels():
                    q.loss_train_prime = _loss(loss_fn, model, batch2)
                if objective.second_order or not exact:  # finite difference: for the chain rule through L_train'
                    with _explained_double_backward() if exact else contextlib.nullcontext(), kernels():
                        g_prime = _grad(q.loss_train_prime, leaves, create_graph=exact, retain_graph=exact,
                                        require="the loss on batch2 at the hypothetical parameters", hint=partial,
                                        swapped_out=swapped_out)
                if objective.second_order:
                    q.grads_prime = trained(g_prime)
            if objective.needs_val:
                held_apart = {}
                if exact and need_train:  # (the graph of the pass at theta' on batch 2 is held)
                    state.restore_out_of_place()
                    # theta' of an embedding with max_norm, which the pass renormalises in place: a copy
                    # (a Linear tied to it saved it for that graph's backward pass)
                    # (and of a frozen one, which theta' leaves as it is: the graph saved it all the same)
                    held_apart = {id(t): t.clone() for t in (swap.get(id(w), w) for w in state.renormalised_weights())}
                else:
                    state.restore(weights=False)
                if val_rng is not None:  # the same dropout masks as L(theta; val): the two differ by theta' alone
                    val_rng.replay()
                try:
                    with kernels(), swapped_parameters(model, held_apart) if held_apart else contextlib.nullcontext():
                        q.loss_val_prime = _loss(loss_fn, model, val_batch)
                finally:
                    if val_rng is not None:
                        val_rng.resume()
                if not exact:
                    g_val = _grad(q.loss_val_prime, leaves, require="the loss on val_batch at the hypothetical parameters",
                                  hint=partial, swapped_out=swapped_out)

        # 6. meta-loss; its gradient for the meta-parameters it reaches directly (log-variances, gate
        # penalty), for the multipliers and for theta'
        if not exact:  # the objective sees constants; theta' gets its gradient by the chain rule below
            q.loss_train_prime = _leaf(q.loss_train_prime)
            q.loss_val_prime = _leaf(q.loss_val_prime)
            q.grads_prime = None if q.grads_prime is None else [_leaf(x) for x in q.grads_prime]
        terms = _checked_terms(objective(q), objective)
        loss, sigmas = _checked_weighting(opt.weighting(terms), opt.weighting)
        penalty = opt.modulator.penalty()
        if penalty is not None:
            loss = loss + penalty
        # what the meta-optimizer trains, as it holds them (a walk over the modulator's modules,
        # meta_parameters(), costs ~70 us on the default 8-layer encoder)
        meta_params = _meta_optimized(opt)
        n_meta = len(meta_params) + len(cut)
        if exact:  # (with theta' in the model: an activation-checkpointed part recomputes its forward pass here)
            try:
                with _explained_double_backward(), swapped_parameters(model, swap, names), kernels():
                    out = _grad(loss, meta_params + cut + leaves, zero=False, swapped_out=swapped_out)
            except RuntimeError as exc:
                if "modified by an inplace operation" not in str(exc) or not state.renormalised_weights():
                    raise
                raise RuntimeError(
                    "meta_step(meta_gradient='exact'): an embedding with max_norm renormalises its weight in place "
                    "at every forward pass, and a part of the model recomputed in this backward pass (activation "
                    "checkpointing) did so while the graph held that weight. Use meta_gradient='finite_difference' "
                    "(the default) with this model, or keep the embedding out of the checkpointed part") from exc
            _check_reached(loss, out[n_meta:], "the meta-loss (the losses at the hypothetical parameters)")
            d_theta = [torch.zeros_like(x) if d is None else d for d, x in zip(out[n_meta:], leaves)]
        else:
            extra = [q.loss_train_prime, q.loss_val_prime] + (q.grads_prime or [])
            present = [x for x in extra if x is not None]
            out = _grad(loss, meta_params + cut + present, zero=False)
            by_id = {id(x): d for x, d in zip(present, out[n_meta:])}
            v = None if q.grads_prime is None else [
                by_id[id(x)] if by_id.get(id(x)) is not None else torch.zeros_like(x) for x in q.grads_prime]
            if v is not None and frozen_at:  # (over every leaf of theta', as g': none for the frozen tensors)
                given = iter(v)
                v = [torch.zeros_like(g_prime[k]) if k in frozen_at else next(given) for k in range(len(active))]
            # free what is no longer needed before the finite-difference pass (peak memory): g, g_val
            coefs = [by_id.get(id(x)) if x is not None else None for x in (q.loss_train_prime, q.loss_val_prime)]
            del q, g, by_id, present, extra
            # d_theta = c_train g' + c_val grad L_val' + H v, in one pass over theta' per term
            d_theta = None
            for coef, grad in zip(coefs, (g_prime, g_val)):
                if coef is not None:
                    if d_theta is None:
                        d_theta = torch._foreach_mul(grad, float(coef))
                    else:
                        torch._foreach_add_(d_theta, grad, alpha=float(coef))
            del g_val
            if d_theta is None:
                d_theta = [torch.zeros_like(x) for x in leaves]
            if v is not None:
                _add_hessian_vector_fd(d_theta, model, loss_fn, batch2, swap, leaves, g_prime, v, replay, state,
                                       autocast_eps, D.world_size(True) > 1)
            del v, g_prime
        meta_grads, d_out = out[:len(meta_params)], list(out[len(meta_params):n_meta])
        # through theta' to alpha and beta, then once through the encoder
        d_alpha, d_beta = _chain_to_multipliers(d_theta, theta, direction, decay, scale, [alpha, beta])
        del direction, d_theta
        d_out[0] = d_alpha if d_out[0] is None else d_out[0] + d_alpha
        d_out[1] = d_beta if d_out[1] is None else d_out[1] + d_beta
        d_out = [torch.zeros_like(x) if d is None else d for d, x in zip(d_out, outputs)]
        encoded = torch.autograd.grad(outputs, meta_params, grad_outputs=d_out, allow_unused=True)
        meta_grads = [e if m is None else m if e is None else m + e for m, e in zip(meta_grads, encoded)]

    values = {k: float(v.detach()) for k, v in terms.items()}
    record = MetaRecord(
        step=opt.global_step, meta_loss=float(loss.detach()), terms=values,
        sigmas={k: float(v.detach()) for k, v in sigmas.items()},
        groups=list(opt.group_names), alpha=alpha.tolist(), beta=beta.tolist(), lambda1=lambda1.tolist(),
        lambda2=lambda2.tolist(),
    )
    # a weighted term that is not finite skips the update too: HUW's softplus of a signed term maps -inf to a
    # finite 0, so that an infinite L(theta; val) - a loss decrease of -inf - gave a finite meta-loss, and the
    # modulator was trained on the other terms (and that term's log-variance pushed down)
    bad_terms = [t for t in objective.terms if not math.isfinite(values[t])]
    own_finite = math.isfinite(record.meta_loss) and not bad_terms
    if world > 1:  # one modulator on every rank: the mean meta-gradient (NaN everywhere if a rank has none)
        meta_grads = D.average_(meta_grads, meta_params, world, poison=not own_finite,
                                layout=opt.distributed_layout()[-1])
    present_grads = [gr for gr in meta_grads if gr is not None]
    finite = own_finite and (
        not present_grads or bool(torch.stack(torch._foreach_norm(present_grads)).isfinite().all()))
    if not finite:
        record.skipped, record.reason = True, "non-finite meta-loss or meta-gradient"
        if bad_terms and math.isfinite(record.meta_loss):
            record.reason = f"non-finite objective term(s) {bad_terms} (the meta-loss is finite)"
        elif world > 1 and math.isfinite(record.meta_loss):  # (the mean over the ranks: perhaps another rank's)
            record.reason = "non-finite mean meta-gradient over the ranks (this rank's meta-loss is finite)"
        return record
    for p, gr in zip(meta_params, meta_grads):
        p.grad = gr
    try:
        with _stepped_on_every_rank(opt, world):
            opt.meta_optimizer.step()
            project_weighting(opt)
    finally:
        for p in meta_params:
            p.grad = None
    return record


def _meta_optimized(opt: "MetaAdamW") -> list[Tensor]:
    """The tensors the meta-optimizer trains, in its order: the meta-gradients and the buffer every rank
    all-reduces (a failing rank's too, which must match the others') follow it."""
    return [p for group in opt.meta_optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def _raised_on_every_rank(opt: "MetaAdamW", world: int) -> Iterator[None]:
    """An error of this rank's meta-update (its loss_fn on its batch, a component's) - or of
    ``meta_step``'s checks of its batches and state before it - is announced to the other ranks in
    the all-reduce of the meta-gradients they wait in, so that they raise too, and at once, instead
    of waiting there until the process group's timeout. Once per meta_step: the regions it guards
    end before that all-reduce (an error raised after it would announce into no collective).

    A ``KeyboardInterrupt`` (or ``SystemExit``) is announced as an error is: the other ranks are in
    that all-reduce or on their way to it in this meta_step, and a Ctrl-C that reaches every rank at
    once has each of them announce in it, the same collective. The announcement blocks until they
    arrive; where they never do - their processes ended (gloo then fails it with a connection
    error, which is raised with the interrupt as its context), or a model's own collectives meet
    it (see :mod:`metaadamw.distributed`) - a second Ctrl-C does not cut that wait short."""
    try:
        yield
    except BaseException:
        if world > 1:
            meta_params = _meta_optimized(opt)
            D.average_([None] * len(meta_params), meta_params, world, layout=opt.distributed_layout()[-1], failed=True)
        raise


@contextlib.contextmanager
def _stepped_on_every_rank(opt: "MetaAdamW", world: int) -> Iterator[None]:
    """The meta-optimizer's step, on every rank or known to every rank to have failed. The mean
    meta-gradient is the same on every rank (one all-reduce gives it to all), and so are the
    modulators and the meta-optimizers' states, so the step itself computes alike everywhere; but it
    can still fail on one rank alone - an out-of-memory error (its lazily made state, in that rank's
    memory), a meta-optimizer of the caller's that reads something of its rank's (a lasting device
    error fails this rank's count below too: the others then wait in it until the timeout).
    The ranks then count the failures in one more all-reduce (one element): where any rank failed,
    every rank raises, the ones whose step succeeded with an error that says their modulators now
    differ from that rank's (which may have stepped part of its tensors), instead of going on
    alone and waiting in their next collective until the process group's timeout - or, where that
    rank caught its error, training on with modulators that differ without a word. A
    ``KeyboardInterrupt`` in the step is counted as a failure too (see :func:`_raised_on_every_rank`)."""
    if world <= 1:
        yield
        return
    try:
        yield
    except BaseException:
        D.count_(True, opt.device)
        raise
    failures = D.count_(False, opt.device)
    if failures:
        raise RuntimeError(
            f"MetaAdamW.meta_step: the meta-optimizer's step failed on {failures} other rank(s) of {world} after the "
            f"meta-gradients were averaged (see their output), and succeeded on this one: the ranks' modulators now "
            f"differ (the failed rank's is not stepped, or stepped in part), and with them their multipliers and "
            f"replicas. Treat it as fatal to the run: restart every rank from a checkpoint")


def _checked_terms(terms: Any, objective: Any) -> dict[str, Tensor]:
    """An objective's result: a dict with a scalar tensor for each term it declares (and any others
    it records), each of at least float32: a term of a float16 or bfloat16 model's loss (the loss
    decrease, the generalisation gap) came in its dtype, and the weighting's maths with it - an
    uncertainty weighting's ``exp(-s) L`` overflowed float16 once it passed 65,504 (a gap of 45
    at ``s = -8``), and the meta-update was skipped, with ``s`` stuck, as long as the gap stayed."""
    name = type(objective).__name__
    if not isinstance(terms, dict):
        raise TypeError(f"objective {name} must return a dict of its terms {tuple(objective.terms)} -> scalar "
                        f"tensors, got a {type(terms).__name__}")
    missing = [t for t in objective.terms if t not in terms]
    if missing:
        raise ValueError(f"objective {name} declares the terms {tuple(objective.terms)} but returned "
                         f"{tuple(terms)}, without {missing}: return every term it declares (the weighting reads "
                         f"them; any others are only recorded)")
    bad = [k for k, v in terms.items() if not isinstance(v, Tensor) or v.numel() != 1]
    if bad:
        hint = ("; an objective that reads the validation quantities must say so with needs_val = True (they are "
                "None without it)" if any(terms[k] is None for k in bad) and not getattr(objective, "needs_val", False)
                else "")
        raise ValueError(f"objective {name}: the terms {bad} are not scalar tensors (got "
                         f"{', '.join(described(terms[k]) for k in bad)}): reduce each term to one value{hint}")
    if not any(terms[t].requires_grad for t in objective.terms):  # (a bare autograd error, or the model blamed)
        raise ValueError(f"objective {name}: none of its terms {tuple(objective.terms)} depends on the modulator "
                         f"through autograd, so there is nothing to train it with: compute them from the "
                         f"MetaQuantities' tensors with torch operations (no .detach(), .item(), float() or "
                         f"torch.tensor(...))")
    return {k: F.widened(v.reshape(())) for k, v in terms.items()}


def _checked_weighting(result: Any, weighting: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """A weighting's result: (meta-loss, sigma per term)."""
    ok = (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Tensor)
          and result[0].numel() == 1 and isinstance(result[1], dict))
    if not ok:
        raise TypeError(f"weighting {type(weighting).__name__} must return (meta-loss as a scalar tensor, dict of "
                        f"sigma per term - empty if it has none), got {described(result)}")
    bad = [k for k, v in result[1].items() if not isinstance(v, Tensor) or v.numel() != 1]
    if bad:
        raise TypeError(f"weighting {type(weighting).__name__} must return its sigmas as scalar tensors (a dict of "
                        f"sigma per term), got for {bad}: {', '.join(described(result[1][k]) for k in bad)}")
    if not result[0].requires_grad:  # (the terms do: see _checked_terms; a bare autograd error named no component)
        raise TypeError(f"weighting {type(weighting).__name__} returned a meta-loss that does not depend on the terms "
                        f"through autograd, so there is nothing to train the modulator with: compute it from the "
                        f"terms' tensors with torch operations (no .detach(), .item(), float() or torch.tensor(...))")
    return result[0].reshape(()), result[1]


def described(x: Any, top: bool = True) -> str:
    """What a user component returned, in a few words for an error message: a tensor's shape, a
    list's or tuple's length and first items, else the value itself when short."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        items = ", ".join(described(v, top=False) for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"a {type(x).__name__} of {len(x)} ({items})"
    text = repr(x)
    return text if len(text) <= 80 and not isinstance(x, dict) else f"a {type(x).__name__}"


def _hypothetical_moments(opt: "MetaAdamW", params: list[Tensor], g: list[Tensor], groups: list[dict[str, Any]]
                          ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(m, v, m', v')``: the AdamW moments now (zeros for tensors that have not stepped yet) and
    after one more step with gradients ``g``, in one foreach pass per distinct ``betas``."""
    m_old: list[Tensor] = [None] * len(g)  # type: ignore[list-item]
    v_old: list[Tensor] = [None] * len(g)  # type: ignore[list-item]
    m_new: list[Tensor] = [None] * len(g)  # type: ignore[list-item]
    v_new: list[Tensor] = [None] * len(g)  # type: ignore[list-item]
    by_betas: dict[tuple[float, float], list[int]] = {}
    for k, grp in enumerate(groups):
        by_betas.setdefault(tuple(grp["betas"]), []).append(k)
    for (b1, b2), ks in by_betas.items():
        states = [opt.state.get(params[k], {}) for k in ks]  # (opt.state[...] would insert empty entries)
        gs = [g[k] for k in ks]
        old_m = [st["exp_avg"] if "exp_avg" in st else torch.zeros_like(gk) for st, gk in zip(states, gs)]
        old_v = [st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(gk) for st, gk in zip(states, gs)]
        m, v = F.foreach_moments(gs, old_m, old_v, b1, b2, in_place=False)
        for j, k in enumerate(ks):
            m_old[k], v_old[k], m_new[k], v_new[k] = old_m[j], old_v[j], m[j], v[j]
    return m_old, v_old, m_new, v_new


def _stats_at_theta(opt: "MetaAdamW", g: list[Tensor], m_old: list[Tensor], v_old: list[Tensor],
                    m_new: list[Tensor], v_new: list[Tensor], theta: list[Tensor],
                    groups: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The statistics ``step()`` would compute for moments ``m_new``, ``v_new`` (after ``m_old``,
    ``v_old``), by the function it uses: the modulator is trained on the features it is given.
    The foreach path's cos comes from a norm identity that reads 0 where it cannot resolve the dot
    product (a gradient ~1e-4 of the first moment); an exact dot product there gave the meta-update
    other features, and other multipliers, than the step. The carried norms of the previous moments
    are read from the moments themselves. Equal to the step's up to float32 rounding of the norms
    (on the CPU the step of a model of :data:`~metaadamw.functional.CPU_BLOCKING_MIN_NUMEL` elements
    or more sums its norms over pieces of the tensors: ~1e-6 relative in the multipliers)."""
    needed = opt.modulator.extractor.required_stats
    beta1, beta2 = (F.to_device([grp["betas"][j] for grp in groups], opt.device, torch.float32) for j in (0, 1))
    if not opt.foreach:
        return F.single_tensor_stats(needed, g, None, None, m_new, v_new, theta, beta1, beta2)[0]
    return F.foreach_stats(needed, g, *F.carried_norms(m_old, v_old), m_new, v_new, theta, beta1, beta2,
                           v_sum=F.measured_v_sum(v_new) if F.measures_v_sum(needed, v_new) else None)[0]


def _chain_to_multipliers(d_theta: list[Tensor], theta: list[Tensor], direction: list[Tensor], decay: Tensor,
                          scale: Tensor, multipliers: list[Tensor]) -> list[Tensor]:
    """The gradient for alpha and beta from that for theta'. ``theta'_k = theta_k decay_k - scale_k
    direction_k`` is linear in the per-tensor scalars, so ``d decay_k = <d theta'_k, theta_k>`` and
    ``d scale_k = -<d theta'_k, direction_k>``: two dot products per tensor and a backward pass
    through the few scalar operations that made decay and scale, instead of one through every
    element of theta'."""
    dots = [F.flat_dot(d, x) for d, x in zip(d_theta + d_theta, theta + direction)]
    n = len(theta)
    d_decay, d_scale = torch.stack(dots[:n]).to(decay.dtype), -torch.stack(dots[n:]).to(scale.dtype)
    return _grad([decay, scale], multipliers, grad_outputs=[d_decay, d_scale])


def _loss(loss_fn: Callable[[nn.Module, Any], Tensor], model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)``, checked to be a floating-point tensor of one element, as a 0-dim
    tensor (a loss of shape (1,) is accepted, as ``backward()`` accepts it)."""
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        what = (f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                else f"a {type(loss).__name__}")
        raise ValueError(f"meta_step: loss_fn(model, batch) must return the scalar loss of the batch (a floating-point "
                         f"tensor of one element), got {what}: reduce it, e.g. with .mean()")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ValueError("meta_step: loss_fn(model, batch) returned a loss that does not require grad (computed under "
                         "torch.no_grad(), or detached, or .item() wrapped back in a tensor?): the meta-update "
                         "differentiates it with respect to the parameters")
    return loss.reshape(())


def _leaf(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().requires_grad_()


def _unreachable(what: str) -> str:
    return (f"meta_step: {what} does not depend on any parameter of this optimizer through autograd. Is the model the "
            "one the optimizer was built for? Does it run torch.utils.checkpoint with use_reentrant=True? That variant "
            "cannot be differentiated by torch.autograd.grad, which the meta-update needs: pass use_reentrant=False. "
            "Does the model keep its parameters outside its modules' attributes (in a cached list or tuple)? The "
            "meta-update evaluates the model at hypothetical parameters by setting those attributes: read the "
            "parameters from the module at each forward.")


def _uses_reentrant_checkpoint(output: Tensor) -> bool:
    """Whether ``output``'s autograd graph runs through ``torch.utils.checkpoint(use_reentrant=True)``."""
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def _check_reached(output: Tensor, grads: list[Tensor | None] | tuple[Tensor | None, ...], what: str,
                   hint: str = "") -> None:
    """Refuse gradients of ``output`` that reach no input, and - where some input is not reached
    (which can be legitimate: a branch unused on this batch) - a graph through reentrant
    checkpointing, which hides the parameters inside it from torch.autograd.grad."""
    if all(d is None for d in grads):
        raise ValueError(_unreachable(what) + hint)
    if any(d is None for d in grads) and _uses_reentrant_checkpoint(output):
        raise ValueError(f"meta_step: {what} runs through torch.utils.checkpoint with use_reentrant=True, which hides "
                         "the parameters inside the checkpointed part from torch.autograd.grad (the meta-update's "
                         "differentiation): pass use_reentrant=False")


def _grad(output: Tensor, inputs: list[Tensor], zero: bool = True, require: str | None = None,
          hint: str = "", swapped_out: Sequence[tuple[str, Tensor]] = (), **kwargs: Any) -> list[Tensor | None]:
    """``torch.autograd.grad`` with unused inputs as zeros (``zero``) or None. ``require``: what
    ``output`` is, and ``hint`` what may explain it, for the errors of :func:`_check_reached`.
    ``swapped_out``: ``(name, tensor)`` of the parameters at theta, swapped out of the model for a
    pass at theta' - a loss that reaches them is refused: a loss_fn that reads them through
    references of its own (an L2 penalty over a list made once, ``params = list(model.parameters())``)
    saw theta there, and its part of the meta-gradient was silently lost. Asking autograd for them
    costs nothing where the loss does not reach them (they are not in its graph)."""
    n = len(inputs)
    out = torch.autograd.grad(output, [*inputs, *(t for _, t in swapped_out)], allow_unused=True, **kwargs)
    read = [name for (name, _), d in zip(swapped_out, out[n:]) if d is not None]
    out = out[:n]
    if require is not None:
        _check_reached(output, out, require, hint)
    if read:
        shown = ", ".join(map(repr, read[:5])) + (f" and {len(read) - 5} more" if len(read) > 5 else "")
        raise ValueError(
            f"meta_step: {require or 'the loss at the hypothetical parameters'} reads {len(read)} parameter(s) of "
            f"the model other than through its modules: {shown}. The meta-update evaluates the loss at "
            f"hypothetical values of the parameters by setting them as the modules' attributes; a reference "
            f"kept elsewhere (a list made once, params = list(model.parameters()), used in loss_fn for a penalty; "
            f"a module that caches its weights) keeps the current value there, and that part of the "
            f"meta-gradient would be lost. Read the parameters from the model inside loss_fn "
            f"(model.parameters(), model.layer.weight)")
    if not zero:
        return list(out)
    return [torch.zeros_like(x) if d is None else d for d, x in zip(out, inputs)]


def _global_norm(tensors: list[Tensor]) -> float:
    """The 2-norm of all the tensors' elements together, read back to the host."""
    return float(torch.linalg.vector_norm(torch.stack(F.foreach_norms(tensors))))


def _add_hessian_vector_fd(out: list[Tensor], model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor],
                           batch2: Any, swap: dict[int, Tensor], leaves: list[Tensor], g_prime: list[Tensor],
                           v: list[Tensor], replay: _RngReplay, state: ModelState,
                           autocast_eps: float | None = None, distributed: bool = False) -> None:
    """Add H v to ``out``, for the Hessian H of L(.; batch 2) at theta', as
    ``(grad L(theta' + eps v) - g') / eps``.

    ``eps = sqrt(machine epsilon) (1 + ||theta'||) / ||v||``, the usual step of matrix-free Newton
    methods: it balances the difference's truncation error against float rounding. The machine
    epsilon is that of the parameters' narrowest dtype (in a model of mixed precision, the step of
    its wider tensors would move too few of its narrower ones). The forward
    pass replays the random stream of the one that gave g' (same dropout masks) and starts from
    the same ``state`` (same power-iteration vectors). ``leaves``
    (theta', swapped into the model by ``swap``) are moved to theta' + eps v in place. The
    difference is taken first (exact for nearby gradients), then added with weight 1 / eps.

    ``autocast_eps``: the machine epsilon of the caller's ``torch.autocast`` dtype, where the loss
    runs in one (:func:`meta_update` clears autocast's cache around each pass: a cast of theta' cached
    in the caller's region gave H v = 0). The step is sized for a precision between the
    parameters' and autocast's (the geometric mean of the two epsilons): in bfloat16, float32's step
    moves too few weights by a rounding step of the cast (70% off on an MLP) and bfloat16's own
    (8.8% of ||theta'||) is mostly truncation error (18-22% off on an MLP and a GRU); between them,
    5-7%. Finite differences of a loss computed in bfloat16 stay approximate (a Transformer layer
    with dropout: ~50% off): prefer ``exact`` where their accuracy matters.

    Where ``v`` is 0 (H v = 0) nothing is added, and where ||v|| is not finite ``out`` is filled
    with NaN (the meta-update is skipped); in both cases the pass is skipped - unless ``distributed``
    (a process group of several ranks, with ``sync_meta`` or without): then it runs all the same, at
    theta', and its result is dropped, so that every rank runs the same passes whatever its ``v``. A model whose forward runs collectives
    of its own (``SyncBatchNorm``) would otherwise meet another rank's pass with the meta-update's
    all-reduce (gloo aborts on the mismatch; NCCL waits or mixes values). (Agreeing on the skip in a
    collective of its own would cost one more all-reduce per meta-update, and one that a rank
    whose meta-update raised before it would not meet: its announcement is the all-reduce of the
    meta-gradients.) The pass wasted is one of a rare meta-update: a rank's ``v`` is 0 or not finite."""
    # (the step is sized for the parameters' narrowest dtype: a model of mixed precision - a float32 temperature or
    # norm registered before bfloat16 layers - had float32's step, too small to move most bfloat16 weights by
    # their rounding step, and a meta-gradient 6-16x further from the exact one than the same model all in bfloat16)
    dtypes = {x.dtype for x in leaves}
    v_norm = _global_norm(v)
    moves = math.isfinite(v_norm) and v_norm != 0.0
    if not moves and not distributed:
        if not math.isfinite(v_norm):
            for x in out:
                x.fill_(math.nan)
        return
    eps = 0.0  # (not moves: the pass runs at theta' for the other ranks' collectives in the model, and adds nothing)
    if moves:
        with torch.no_grad():
            theta_norm = _global_norm(leaves)
            precision = max(torch.finfo(dtype).eps for dtype in dtypes)
            # (between the two: see the docstring; autocast leaves float64 tensors as they are)
            if autocast_eps is not None and autocast_eps > precision and dtypes != {torch.float64}:
                precision = math.sqrt(precision * autocast_eps)
            eps = math.sqrt(precision) * (1.0 + theta_norm) / v_norm
            torch._foreach_add_(leaves, v, alpha=eps)  # in place: theta' + eps v (the leaves are not used after this)
    replay.replay()
    state.restore(weights=False)
    try:
        with swapped_parameters(model, swap):
            diff = _grad(_loss(loss_fn, model, batch2), leaves, require="the loss on batch2 at the hypothetical parameters")
    finally:
        replay.resume()
    if not moves:
        if not math.isfinite(v_norm):
            for x in out:
                x.fill_(math.nan)
        return  # (else H 0 = 0)
    torch._foreach_sub_(diff, g_prime)
    torch._foreach_add_(out, diff, alpha=1.0 / eps)
