"""The maths of one MetaAdamW step, as two implementations of each part.

``single_tensor_*`` is the slow, readable reference: a Python loop over tensors that computes
every statistic directly (``torch.dot`` for the cosine). ``foreach_*`` is the fast path used by
default (the same positional arguments; keyword-only extras for what the fast path can reuse):
``torch._foreach_*`` kernels, one norm call over gradients, first moments and (where a feature
needs them) parameters, and no extra pass for the multipliers:

* the cosine and the first-moment norm come from two norms and the identity
  ``||m_t||^2 = b1^2 ||m_{t-1}||^2 + 2 b1 (1 - b1) <g, m_{t-1}> + (1 - b1)^2 ||g||^2``, with
  ``||m_{t-1}||^2`` carried from the previous step (computed directly when it was not);
* the second-moment norm ``sqrt(sum v)`` is carried by ``sum v_t = b2 sum v_{t-1} + (1 - b2) ||g||^2``;
* alpha and beta are folded into the scalars of the foreach ops AdamW runs anyway, as
  per-bucket 0-dim tensors (a bucket = the tensors that share param_group, modulator group and
  step count), so ``step()`` never reads a value back to the host;
* on the CPU, for models of :data:`CPU_BLOCKING_MIN_NUMEL` elements or more, the tensors are
  processed in runs of about :data:`CPU_CHUNK_NUMEL` elements (cache blocking): each run's
  moments, norms and update passes find their operands still in cache, where one foreach pass
  over every tensor streams the whole model through memory once per op. The norms are taken
  right after the moment update, while g and m are cached;
* on the CPU the square roots of v are taken as ``1 / rsqrt(v)`` (:func:`foreach_sqrt`): torch's
  CPU ``sqrt`` is slow on the zeros that unused embedding rows and dead units leave in v.

The update, for a tensor p of group g with bias corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t:

    p <- p * (1 - lr * alpha_g * beta_g * wd) - lr * alpha_g / bc1 * m / (sqrt(v / bc2) + eps)

With alpha = beta = 1 this is exactly torch.optim.AdamW's decoupled update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from typing import Callable, Iterator

import torch
from torch import Tensor


#: elements per run of tensors on the CPU (cache blocking). 2^18 float32 = 1 MiB per tensor list,
#: so a run's parameters, moments and temporaries stay in the last-level cache between passes
#: (measured on ResNet-18's step: 2^15 1.37x AdamW's, 2^16 1.23x, 2^17 1.10x, 2^18-2^20 1.05x).
#: Larger tensors are cut into flat views of this size.
CPU_CHUNK_NUMEL = 2**18

#: models with fewer elements than this are not blocked: their passes find the tensors in cache
#: anyway, and more, smaller foreach calls only add overhead (measured on this machine, 32 MiB L3,
#: step time against AdamW's: ResNet-18, 11M elements, 1.26x -> 1.03-1.11x with blocking; MiniGPT,
#: 3M, 1.29-1.32x -> 1.26-1.31x; a 10-tensor MLP of 0.27M elements slightly slower)
CPU_BLOCKING_MIN_NUMEL = 2**21

#: the most elements of float16 tensors whose update :func:`foreach_update` takes in float32 at
#: once (AdamW's order, :func:`narrow_range`): three float32 temporaries of 64 MiB at most
NARROW_CHUNK_NUMEL = 2**24


def _autocast_on(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, None where it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: the per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def autocast_states(device: torch.device) -> dict[str, torch.dtype]:
    """The autocast regions the caller is in, on ``device``'s type and the CPU: type -> dtype."""
    states = {}
    for device_type in dict.fromkeys((device.type, "cpu")):
        dtype = _autocast_on(device_type)
        if dtype is not None:
            states[device_type] = dtype
    return states


@contextlib.contextmanager
def autocast(states: dict[str, torch.dtype], enabled: bool) -> Iterator[None]:
    """Turn the autocast regions ``states`` (from :func:`autocast_states`) off, or on again
    inside a region that turned them off. Nothing to enter (the common case) costs nothing.

    The optimizer's own maths runs in full precision: the modulator, the group means (matrix
    products) and the multipliers are float32 even when ``step()`` or ``meta_step()`` is called
    inside ``torch.autocast`` - in bfloat16, 1 - lr * weight_decay rounds to 1 and the weight
    decay is lost. The caller's loss function runs in the caller's autocast."""
    if not states:
        yield
        return
    with contextlib.ExitStack() as stack:
        for device_type, dtype in states.items():
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


def takes_cpu_routes(device: torch.device) -> bool:
    """Whether ``step()`` takes its CPU routes on ``device``: square roots as ``1 / rsqrt``
    (:func:`reciprocal_roots`), the fused encoder layer (:func:`metaadamw.modulator.uses_fused_layer`),
    the time feature made from the host's step count, and cache blocking. On CUDA and other
    accelerators it takes routes that never read a value back to the host. One function, so that
    the tests can run those routes on the CPU (``tests/metaadamw/test_accelerator_routes.py``): CI
    has no GPU, and checks their arithmetic there (that they never synchronise needs a GPU)."""
    return device.type == "cpu"


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor of host values on ``device``, made on the CPU and copied without blocking: on CUDA,
    ``torch.tensor(values, device=cuda)`` is a blocking copy, i.e. a host synchronisation."""
    host = torch.tensor(values, dtype=dtype, device="cpu")
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def chunk_slices(numels: list[int], start: int, stop: int, limit: int | None) -> list[slice]:
    """Split positions ``start:stop`` into consecutive runs of at most ``limit`` elements (each run
    holds at least one tensor); ``limit=None`` gives one run."""
    if limit is None:
        return [slice(start, stop)]
    out, begin, size = [], start, 0
    for i in range(start, stop):
        if size and size + numels[i] > limit:
            out.append(slice(begin, i))
            begin, size = i, 0
        size += numels[i]
    if begin < stop:
        out.append(slice(begin, stop))
    return out


def is_cut(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, limit: int | None) -> bool:
    """Whether a parameter and its moments are cut into flat views of ``limit`` elements: larger
    than that, and all contiguous (so that the views of the three match). One rule for
    :class:`Blocking` and :meth:`Bucket.split`, whose views must cover the same tensors."""
    return limit is not None and param.numel() > limit and all(
        t.is_contiguous() for t in (param, exp_avg, exp_avg_sq))


def split_views(t: Tensor, limit: int) -> list[Tensor]:
    """Flat views of at most ``limit`` elements covering ``t`` (a copy when ``t`` is not contiguous,
    which is only ever done for read-only gradients)."""
    return list(t.reshape(-1).split(limit))


class Blocking:
    """Cache blocking of N tensors on the CPU: tensors of more than ``limit`` elements (with
    contiguous parameter and moments) are cut into flat views ("pieces"), and the pieces are
    grouped into runs of about ``limit`` elements within each param_group. Reductions over
    pieces (norms) are combined back per tensor with :meth:`combine_norms`. ``limit=None`` is no
    blocking: the pieces are the tensors, one run per param_group.

    The views of parameters and moments are made once; the gradients' each step
    (:meth:`pieces`). :meth:`valid` says whether the cut tensors still own the storage the views
    were made of (``p.data = ...`` replaces it)."""

    def __init__(self, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 slices: list[tuple[int, slice]], limit: int | None):
        self.limit = limit
        self.split = [k for k, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)) if is_cut(p, m, v, limit)]
        self._split_set = frozenset(self.split)
        self._ptrs = [(t, t.data_ptr()) for k in self.split for t in (params[k], exp_avgs[k], exp_avg_sqs[k])]
        self.params, self.exp_avgs, self.exp_avg_sqs = (self.pieces(x) for x in (params, exp_avgs, exp_avg_sqs))
        owner = [k for k, p in enumerate(params) for _ in range(self._count(k, p))]
        self.owner = to_device(owner, params[0].device) if self.split else None
        self.n = len(params)
        self._norm_index: dict[int, Tensor] = {}
        starts = [0]
        for k, p in enumerate(params):
            starts.append(starts[-1] + self._count(k, p))
        numels = [p.numel() for p in self.params]
        #: (param_group, slice of pieces) in order
        self.runs = [(pg, run) for pg, sl in slices
                     for run in chunk_slices(numels, starts[sl.start], starts[sl.stop], limit)]

    def _count(self, k: int, t: Tensor) -> int:
        return -(-t.numel() // self.limit) if k in self._split_set else 1

    def pieces(self, tensors: list[Tensor]) -> list[Tensor]:
        if not self.split:
            return tensors
        out: list[Tensor] = []
        for k, t in enumerate(tensors):
            if k in self._split_set:
                out += split_views(t, self.limit)
            else:
                out.append(t)
        return out

    def valid(self) -> bool:
        return all(t.data_ptr() == ptr for t, ptr in self._ptrs)

    def combine_norms(self, piece_norms: Tensor, blocks: int) -> Tensor:
        """Per-piece norms of ``blocks`` consecutive lists (each over all pieces) -> per-tensor norms."""
        if self.owner is None:
            return piece_norms
        p = self.owner.numel()
        index = self._norm_index.get(blocks)
        if index is None:
            index = self._norm_index[blocks] = torch.cat([self.owner + b * self.n for b in range(blocks)])
        sq = piece_norms[:blocks * p].square()
        return torch.zeros(blocks * self.n, dtype=sq.dtype, device=sq.device).index_add_(0, index, sq).sqrt_()


@dataclasses.dataclass
class Bucket:
    """Tensors updated with the same scalars: one param_group, one modulator group, one step."""

    group: int  # modulator group index
    indices: list[int]  # positions in the optimizer's flat tensor order
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    lr: float
    weight_decay: float
    eps: float
    beta1: float
    beta2: float
    step: int  # AdamW step count after this step's increment
    param_group: int = 0
    runs: list[tuple[list[Tensor], list[Tensor], list[Tensor], bool, bool]] = dataclasses.field(default_factory=list)

    def split(self, limit: int | None) -> None:
        """Cut the bucket into runs ``(params, exp_avgs, exp_avg_sqs, reciprocal_roots, narrow)``
        of about ``limit`` elements for cache blocking (larger contiguous tensors as flat views);
        None: one run. ``reciprocal_roots``: the run's square roots are taken by
        :func:`foreach_sqrt`'s CPU form (float32 and float64 second moments on the CPU);
        ``narrow``: :func:`foreach_update` takes AdamW's order of operations (a float16 second moment)."""
        pieces: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for p, m, v in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
            cut = is_cut(p, m, v, limit)
            for out, t in zip(pieces, (p, m, v)):
                out.extend(split_views(t, limit) if cut else [t])
        numels = [t.numel() for t in pieces[0]]
        self.runs = []
        for sl in chunk_slices(numels, 0, len(numels), limit):
            params, exp_avgs, exp_avg_sqs = (x[sl] for x in pieces)
            self.runs.append((params, exp_avgs, exp_avg_sqs, reciprocal_roots(exp_avg_sqs), narrow_range(exp_avg_sqs)))

    @property
    def bias_correction1(self) -> float:
        return 1.0 - self.beta1**self.step

    @property
    def bias_correction2(self) -> float:
        return 1.0 - self.beta2**self.step


# ---------------------------------------------------------------------------------------------
# moments


def single_tensor_moments(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], beta1: float,
                          beta2: float) -> None:
    for g, m, v in zip(grads, exp_avgs, exp_avg_sqs):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def check_dense(grads: list[Tensor | None], describe: Callable[[int], str] = lambda i: f"tensor {i}") -> None:
    """Refuse gradients that are not dense (strided): step() and meta_step() both need dense ones. Sparse
    COO ones (``nn.Embedding(sparse=True)``) and the compressed layouts (CSR, CSC, BSR, BSC: the gradients
    of a parameter of that layout), for which ``is_sparse`` is False, and which failed deep inside the
    step ("unsupported tensor layout") after it had been counted; also the layouts that are not sparse
    (``torch._mkldnn``, ``torch.jagged``: the gradients of a parameter of that layout), refused with
    wording and advice of their own, not the sparse ones. None (no gradient) passes. One layout
    comparison per tensor, on the host: no sync. ``describe(i)`` names the tensor of ``grads[i]`` in the
    error (called only for the refused one)."""
    strided = torch.strided  # (layouts are singletons: an identity test, the cheapest per tensor)
    for i, g in enumerate(grads):
        if g is not None and g.layout is not strided:
            if g.layout not in _SPARSE_LAYOUTS:
                raise ValueError(f"MetaAdamW supports only dense (strided) gradients (as does AdamW): {describe(i)} "
                                 f"has a gradient of layout {g.layout}. A parameter of that layout gets gradients of "
                                 f"it: keep the parameter a strided tensor and convert it to that layout in forward")
            fix = ("A layer such as nn.Embedding(sparse=True) or nn.EmbeddingBag(sparse=True) makes them: build it "
                   "with sparse=False, or train its weight with torch.optim.SparseAdam in an optimizer of its own"
                   if g.layout is torch.sparse_coo else
                   "A parameter of a sparse layout gets gradients of that layout: keep the parameter dense (a "
                   "strided tensor) and make the sparse tensor from it in forward")
            raise ValueError(f"MetaAdamW does not support sparse gradients (nor does AdamW): {describe(i)} has a "
                             f"{g.layout} gradient. {fix}")


# the sparse layouts, which check_dense words as such (the others, such as torch._mkldnn or torch.jagged, by layout)
_SPARSE_LAYOUTS = frozenset({torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc})


def foreach_moments(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], beta1: float,
                    beta2: float, in_place: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """AdamW's moment update, ``m <- lerp(m, g, 1 - b1)``, ``v <- b2 v + (1 - b2) g^2``: in place
    (the step), or into new tensors (``in_place=False``: the meta-update's hypothetical step).
    Returns the updated moments."""
    if in_place:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
    else:
        exp_avgs = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        exp_avg_sqs = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    return exp_avgs, exp_avg_sqs


def foreach_moments_and_norms(runs: list[tuple[slice, float, float]], grads: list[Tensor], exp_avgs: list[Tensor],
                              exp_avg_sqs: list[Tensor], params: list[Tensor] | None,
                              norms: bool, narrow: bool | None = None) -> Tensor | None:
    """The moment update run by run (``(positions, beta1, beta2)``), each run followed, when
    ``norms``, by the norms of its g, new m and (unless ``params`` is None) parameters while they
    are in cache. Returns the float32 vector ``[||g_i||..., ||m_i||..., ||p_i||...]`` (over the
    given tensors or pieces) or None. ``narrow``: see :func:`foreach_norms`."""
    g_out: list[Tensor] = []
    m_out: list[Tensor] = []
    p_out: list[Tensor] = []
    for sl, beta1, beta2 in runs:
        g, m = grads[sl], exp_avgs[sl]
        foreach_moments(g, m, exp_avg_sqs[sl], beta1, beta2)
        if norms:
            k = len(g)
            out = foreach_norms(g + m + (params[sl] if params is not None else []), narrow=narrow)
            g_out += out[:k]
            m_out += out[k:2 * k]
            p_out += out[2 * k:]
    return _vector(g_out + m_out + p_out) if norms else None


# ---------------------------------------------------------------------------------------------
# per-tensor statistics (see metaadamw.features.TENSOR_STATS)


_VERSION = operator.attrgetter("_version")


def versions(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> list[tuple[int, int]] | None:
    """Per tensor, the version counters of its two moments (every in-place change moves them), read
    on the host; None for inference tensors, which have none."""
    try:
        return list(zip(map(_VERSION, exp_avgs), map(_VERSION, exp_avg_sqs)))
    except RuntimeError:
        return None


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) over all elements in one kernel, without an elementwise temporary; in float32 for
    :data:`NARROW_DTYPES` (a float16 ``torch.dot`` returns its sum in float16: inf once it passes
    65,504, i.e. a squared norm of a gradient of norm 256, and 3 significant digits below)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype in NARROW_DTYPES or b.dtype in NARROW_DTYPES:
        a, b = a.float(), b.float()
    return torch.dot(a, b)


class _SquaresAndDots(torch.autograd.Function):
    """See :func:`squares_and_dots`."""

    @staticmethod
    def forward(ctx, n: int, *tensors: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        xs, cs = tensors[:n], tensors[n:]
        ctx.n = n
        ctx.save_for_backward(*tensors)
        return stack_scalars([flat_dot(x, x) for x in xs]), stack_scalars([flat_dot(c, x) for c, x in zip(cs, xs)])

    @staticmethod
    def backward(ctx, d_sq: Tensor, d_dot: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        n = ctx.n
        saved = ctx.saved_tensors
        xs, cs = list(saved[:n]), list(saved[n:])
        grads: list[Tensor | None] = [None] * (2 * n)
        # per-tensor 0-dim scalars: foreach multiplies each tensor by its own, without a host read
        dot_scalars = list(d_dot.unbind(0))
        if any(ctx.needs_input_grad[1:n + 1]):  # d/dx_k = 2 d_sq_k x_k + d_dot_k c_k
            gx = torch._foreach_mul(xs, list((2 * d_sq).unbind(0)))
            torch._foreach_add_(gx, torch._foreach_mul(cs, dot_scalars))
            grads[:n] = gx
        if any(ctx.needs_input_grad[n + 1:]):  # d/dc_k = d_dot_k x_k
            grads[n:] = torch._foreach_mul(xs, dot_scalars)
        return (None, *grads)


def squares_and_dots(xs: list[Tensor], cs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(||x_k||^2, <c_k, x_k>)`` for every pair of tensors, as two vectors, differentiable.

    The same values as :func:`flat_dot` tensor by tensor, with a backward of three foreach passes
    (``2 d_sq_k x_k + d_dot_k c_k``) instead of autograd's two full-size products, a sum and the
    per-node overhead for every tensor: the gradient-alignment objective's backward took 1.3 ms of
    a 10-tensor MLP's meta-update that way, two thirds of a training step."""
    if len(xs) != len(cs):
        raise ValueError(f"squares_and_dots needs pairs, got {len(xs)} and {len(cs)} tensors")
    return _SquaresAndDots.apply(len(xs), *xs, *cs)


def stack_scalars(values: list[Tensor]) -> Tensor:
    """Stack 0-dim tensors into a vector of their dtype (float32 when the dtypes differ)."""
    if len({v.dtype for v in values}) == 1:
        return torch.stack(values)
    return torch.stack([v.float() for v in values])


def _vector(values: list[Tensor]) -> Tensor:
    """Stack 0-dim tensors into a float32 vector (one kernel when the dtypes agree)."""
    out = stack_scalars(values)
    return out if out.dtype == torch.float32 else out.float()


def direct_stats(needed: frozenset[str], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 params: list[Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Every statistic computed directly from the tensors, one at a time: ``(stats, ||m||, sum v)``.

    ``exp_avgs`` and ``exp_avg_sqs`` are the moments after this step's update, ``params`` the
    parameters at which the gradients were taken."""
    out: dict[str, Tensor] = {}
    g_norm = _vector([g.float().norm() for g in grads])
    m_norm = _vector([m.float().norm() for m in exp_avgs])
    v_sum = _vector([v.float().sum() for v in exp_avg_sqs])
    if "grad_norm" in needed:
        out["grad_norm"] = g_norm
    if "exp_avg_norm" in needed:
        out["exp_avg_norm"] = m_norm
    if "param_norm" in needed:
        out["param_norm"] = _vector([p.float().norm() for p in params])
    if "cos" in needed:
        dots = _vector([flat_dot(g.float(), m.float()) for g, m in zip(grads, exp_avgs)])
        out["cos"] = (dots / (g_norm * m_norm).clamp_min(1e-30)).clamp(-1, 1)
    if "v_norm" in needed:
        out["v_norm"] = v_sum.clamp_min(0).sqrt()
    if "grad_sparsity" in needed:
        out["grad_sparsity"] = _zero_fraction(grads, foreach=False)
    if "exp_avg_sparsity" in needed:
        out["exp_avg_sparsity"] = _zero_fraction(exp_avgs, foreach=False)
    return out, m_norm, v_sum


def single_tensor_stats(needed: frozenset[str], grads: list[Tensor], m_norm_sq_old: Tensor, v_sum_old: Tensor,
                        exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], params: list[Tensor],
                        beta1: Tensor, beta2: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Every statistic computed directly from the tensors, one at a time (the carried vectors are
    not used; the reference for :func:`foreach_stats`). Returns ``(stats, ||m_t||^2, sum v_t)``."""
    out, m_norm, v_sum = direct_stats(needed, grads, exp_avgs, exp_avg_sqs, params)
    return out, m_norm * m_norm, v_sum


#: relative rounding noise of ``||m||^2`` as :func:`foreach_stats` gets it (float32 norms of the
#: moments; measured up to 1e-5 on tensors of 3M elements), for moments of float32 or wider: the
#: cos identity cannot resolve a dot product below this fraction of the terms it cancels
COS_NOISE_FLOAT32 = 1e-4


def cos_noise(exp_avgs: list[Tensor]) -> Tensor:
    """Per tensor, the relative noise of the cos identity of :func:`foreach_stats`: the machine
    epsilon of the first moment's dtype (bf16, fp16: measured up to 0.6 of it), at least
    :data:`COS_NOISE_FLOAT32`."""
    return to_device([max(torch.finfo(m.dtype).eps, COS_NOISE_FLOAT32) for m in exp_avgs],
                     exp_avgs[0].device if exp_avgs else torch.device("cpu"), torch.float32)


def stat_coefficients(beta1: Tensor, beta2: Tensor, noise: Tensor, numel: Tensor | None = None) -> dict[str, Tensor]:
    """The per-tensor constants of :func:`foreach_stats` (computed when the layout or the betas
    change, not every step: made from host values, they would cost a blocking host-to-device copy
    in every CUDA step); ``noise``:
    :func:`cos_noise`; ``numel``: the tensors' element counts (:func:`numel_vector`), for the
    sparsity statistics."""
    a, b = 0.5 / (1 - beta1), 0.5 * beta1 * beta1 / (1 - beta1)
    out = {"1-b2": 1 - beta2, "A": a, "-B": -b, "C": 0.5 * (1 - beta1), "A noise": a * noise, "B noise": b * noise}
    if numel is not None:
        out["numel"], out["numel or 1"] = numel, numel.clamp_min(1)
    return out


def foreach_stats(needed: frozenset[str], grads: list[Tensor], m_norm_sq_old: Tensor, v_sum_old: Tensor,
                  exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor] | None, params: list[Tensor],
                  beta1: Tensor, beta2: Tensor, norms: Tensor | None = None,
                  coefs: dict[str, Tensor] | None = None,
                  v_sum: Tensor | None = None, narrow: bool | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Statistics from the norms of gradient, first moment and parameter and two carried vectors.

    Args:
        m_norm_sq_old: ||m_{t-1}||^2 per tensor (carried from the previous step).
        v_sum_old: sum(v_{t-1}) per tensor (carried).
        exp_avgs: first moments after this step's update.
        exp_avg_sqs: second moments after it (unused: sum(v) is carried or passed as ``v_sum``;
            kept for the signature shared with :func:`single_tensor_stats`).
        beta1, beta2: per-tensor decay rates (vectors).
        norms: ``[||g||, ||m||, ||p|| (when param_norm is needed)]`` already computed (see
            :func:`foreach_moments_and_norms`, as ``step()`` does); None computes them here in one
            foreach call (as ``meta_step`` does).
        coefs: :func:`stat_coefficients` of beta1 and beta2, if the caller keeps them.
        v_sum: sum(v_t) per tensor, measured (:func:`measured_v_sum`), for second moments whose
            rounding the carried recurrence does not follow (bfloat16, float16); None: carried.

    Returns:
        (stats, m_norm_sq, v_sum): the statistics and the new carried vectors.
    """
    out: dict[str, Tensor] = {}
    n = len(grads)
    with_params = "param_norm" in needed
    if norms is None:
        norms = _vector(foreach_norms(grads + exp_avgs + (params if with_params else []), narrow=narrow))  # one call
    c = stat_coefficients(beta1, beta2, cos_noise(exp_avgs)) if coefs is None else coefs
    g_norm, m_norm = norms[:n], norms[n:2 * n]
    g_sq, m_sq = g_norm.square(), m_norm.square()
    if v_sum is None:
        v_sum = torch.addcmul(beta2 * v_sum_old, c["1-b2"], g_sq)
    if "grad_norm" in needed:
        out["grad_norm"] = g_norm
    if "exp_avg_norm" in needed:
        out["exp_avg_norm"] = m_norm
    if with_params:
        out["param_norm"] = norms[2 * n:]
    if "cos" in needed:
        # <g, m_t> = b1 <g, m_{t-1}> + (1 - b1) ||g||^2 with <g, m_{t-1}> from the norm identity, i.e.
        # <g, m_t> = (||m_t||^2 - b1^2 ||m_{t-1}||^2) / (2 (1 - b1)) + (1 - b1) / 2 ||g||^2. The first two
        # terms cancel when ||g|| << ||m||; a dot product within their rounding noise is unresolved and
        # taken as 0 (exactly 0 for a zero gradient: otherwise the noise, divided by ||g|| ||m||, gave +-1)
        dot = torch.addcmul(torch.addcmul(c["A"] * m_sq, c["-B"], m_norm_sq_old), c["C"], g_sq)
        noise = torch.addcmul(c["A noise"] * m_sq, c["B noise"], m_norm_sq_old)
        dot = torch.where(dot.abs() > noise, dot, 0.0)
        out["cos"] = (dot / (g_norm * m_norm).clamp_min(1e-30)).clamp(-1, 1)
    if "v_norm" in needed:
        out["v_norm"] = v_sum.sqrt()  # b2 * (sum v_{t-1} >= 0) + (1 - b2) ||g||^2 >= 0 (or measured: >= 0)
    if "grad_sparsity" in needed:
        out["grad_sparsity"] = _zero_fraction(grads, foreach=True, coefs=c, narrow=narrow)
    if "exp_avg_sparsity" in needed:
        out["exp_avg_sparsity"] = _zero_fraction(exp_avgs, foreach=True, coefs=c, narrow=narrow)
    return out, m_sq, v_sum


#: second-moment dtypes whose stored values follow the carried ``sum(v)`` recurrence of
#: :func:`foreach_stats` to float32 rounding; in the others (bfloat16, float16) an update of
#: ``(1 - beta2) g^2`` is largely rounded away, and the stored v drifts from the exact sum (12% in
#: 400 steps measured on bfloat16)
CARRIED_V_DTYPES = (torch.float32, torch.float64)


def _foreach_norm_takes_dtype() -> bool:
    try:
        torch._foreach_norm([torch.zeros(1, dtype=torch.bfloat16)], 1, dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


#: ``torch._foreach_norm(..., dtype=)`` (recent torch): one call for every tensor's sum
FOREACH_NORM_DTYPE = _foreach_norm_takes_dtype()

#: the dtypes whose norms :func:`foreach_norms` takes in float32
NARROW_DTYPES = (torch.float16, torch.bfloat16)


def foreach_norms(tensors: list[Tensor], ord: float = 2, narrow: bool | None = None) -> list[Tensor] | tuple[Tensor, ...]:
    """Each tensor's ``ord``-norm, accumulated and returned in float32 or wider: ``torch._foreach_norm``
    returns a bfloat16 or float16 tensor's norm in its own dtype - rounded to 3 significant digits
    (which the cos identity of :func:`foreach_stats` magnifies to 0.03), or, in float16, inf above
    65,504 (an L0 count of a 300 x 300 weight). ``narrow``: whether some tensors are of
    :data:`NARROW_DTYPES`, when the caller knows (reading each tensor's dtype costs ~0.25 us)."""
    if narrow is None:
        narrow = any(t.dtype in NARROW_DTYPES for t in tensors)
    if not narrow:
        return torch._foreach_norm(tensors, ord)
    if FOREACH_NORM_DTYPE and not any(t.dtype == torch.float64 for t in tensors):
        return torch._foreach_norm(tensors, ord, dtype=torch.float32)
    return [torch.linalg.vector_norm(t, ord, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def measures_v_sum(needed: frozenset[str], exp_avg_sqs: list[Tensor]) -> bool:
    """Whether :func:`foreach_stats` must be given sum(v) read from the moments (``v_sum=``): the
    v_norm statistic is needed and some second moments are not of :data:`CARRIED_V_DTYPES`."""
    return "v_norm" in needed and any(v.dtype not in CARRIED_V_DTYPES for v in exp_avg_sqs)


def carried_norms(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(||m||^2, sum v)`` per tensor read from the moments: what :func:`foreach_stats` carries
    from one step to the next, where it was not carried."""
    return _vector(foreach_norms(exp_avgs)).square(), measured_v_sum(exp_avg_sqs)


def measured_v_sum(exp_avg_sqs: list[Tensor]) -> Tensor:
    """sum(v) per tensor as a float32 vector, read from the tensors (v >= 0: its L1 norm),
    accumulated in float32 or wider (a float16 sum can overflow; float64 is not narrowed)."""
    if FOREACH_NORM_DTYPE and all(v.dtype != torch.float64 for v in exp_avg_sqs):
        return torch.stack(torch._foreach_norm(exp_avg_sqs, 1, dtype=torch.float32))
    return torch.stack([torch.linalg.vector_norm(v, 1, dtype=torch.promote_types(v.dtype, torch.float32)).float()
                        for v in exp_avg_sqs])


def _zero_fraction(tensors: list[Tensor], foreach: bool, coefs: dict[str, Tensor] | None = None,
                   narrow: bool | None = None) -> Tensor:
    """The fraction of exact zeros of each tensor (0 for an empty tensor, which has none): from one
    foreach count of the nonzeros (its L0 norm) and the element counts (``coefs["numel"]`` and
    ``coefs["numel or 1"]`` of :func:`stat_coefficients`, else made here), or tensor by tensor."""
    if foreach:
        if coefs is None or "numel" not in coefs:
            numel = numel_vector(tensors)
            coefs = {"numel": numel, "numel or 1": numel.clamp_min(1)}
        return (coefs["numel"] - _vector(foreach_norms(tensors, 0, narrow))) / coefs["numel or 1"]
    return _vector([(t == 0).sum().float() / max(t.numel(), 1) for t in tensors])


def numel_vector(tensors: list[Tensor]) -> Tensor:
    """The tensors' element counts as a float32 vector on their device."""
    return to_device([float(t.numel()) for t in tensors], tensors[0].device, torch.float32)


# ---------------------------------------------------------------------------------------------
# parameter update


def single_tensor_update(buckets: list[Bucket], alpha: Tensor, beta: Tensor) -> None:
    """The readable update: one tensor at a time, the formula as written in the docstring (its
    scalars in float64 for float64 parameters, as AdamW's Python-float scalars are). In AdamW's
    order, ``sqrt(v) / sqrt(bc2) + eps`` and ``m / denom`` before the step size: in float16,
    ``v / bc2`` (about g^2 early on) overflowed to inf once ``|g| > 256``, and the element stopped
    moving, and ``step size * m`` could round to a subnormal before the division. As AdamW's
    ``addcdiv``, the direction times the step size is taken in float32 for float16 and bfloat16
    tensors and rounded once, when subtracted."""
    for b in buckets:
        root_bc2 = math.sqrt(b.bias_correction2)
        for p, m, v in zip(b.params, b.exp_avgs, b.exp_avg_sqs):
            a, w = alpha[b.group], beta[b.group]
            if p.dtype == torch.float64:
                a, w = a.double(), w.double()
            denom = v.sqrt() / root_bc2 + b.eps
            p.mul_(1 - b.lr * a * w * b.weight_decay)
            p.sub_(widened(m) / widened(denom) * (b.lr * a / b.bias_correction1))


#: ``torch._foreach_rsqrt`` (torch 2.8 and later)
FOREACH_RSQRT = hasattr(torch, "_foreach_rsqrt")


def reciprocal_roots(tensors: list[Tensor]) -> bool:
    """Whether :func:`foreach_sqrt` takes the square roots of ``tensors`` as ``1 / rsqrt``."""
    return FOREACH_RSQRT and bool(tensors) and all(
        takes_cpu_routes(t.device) and t.dtype in (torch.float32, torch.float64) for t in tensors)


def narrow_range(tensors: list[Tensor]) -> bool:
    """Whether :func:`foreach_update` must apply the step after the division for ``tensors``
    (second moments): float16's range (at most 65504, nothing below 6e-8) cannot hold the
    denominator with the whole step folded in, ``sqrt(v) / (lr alpha)``, nor AdamW's eps times
    ``sqrt(1 - beta2^t)``."""
    return any(t.dtype == torch.float16 for t in tensors)


def foreach_sqrt(tensors: list[Tensor], reciprocal: bool | None = None, inplace: bool = False) -> list[Tensor]:
    """Square roots of non-negative tensors (second moments), as new tensors or ``inplace``.

    On the CPU (float32 and float64; ``reciprocal``: that test's result, if the caller keeps it)
    they are taken as ``1 / rsqrt(x)``. Torch's CPU ``sqrt`` goes through MKL's vector maths
    library, whose handling of special values makes it slow on exact zeros (the rows of embedding
    tables that recent batches did not touch, the weights of dead ReLU units: v = 0) and on
    subnormals, and ``rsqrt`` and ``reciprocal`` are two vectorised passes that are faster even
    on dense input. Measured on 65,536 float32 elements, one thread: ``sqrt`` 23 us dense, 109 us
    with 26% zeros, 733 us subnormal; ``rsqrt`` + ``reciprocal_`` 17, 17 and 39 us (float64:
    98 / 128 us against 55 us). The result is 0 at 0 (rsqrt gives inf) and inf at inf, and
    elsewhere within two units in the last place of ``sqrt`` (a relative 1.3e-7 in float32; equal
    for three inputs in four): float rounding, as AdamW's own update has in every op.
    Other devices take ``sqrt`` (on CUDA it is a single memory-bound pass), as does a torch older
    than 2.8, which has no foreach ``rsqrt``."""
    if reciprocal is None:
        reciprocal = reciprocal_roots(tensors)
    if not reciprocal:
        if inplace:
            torch._foreach_sqrt_(tensors)
            return tensors
        return torch._foreach_sqrt(tensors)
    if inplace:
        torch._foreach_rsqrt_(tensors)
        out = tensors
    else:
        out = torch._foreach_rsqrt(tensors)
    torch._foreach_reciprocal_(out)
    return out


def foreach_update(buckets: list[Bucket], alpha: Tensor, beta: Tensor, index: Tensor | None = None,
                   scalar_dtype: torch.dtype | None = None) -> None:
    """The fast update: AdamW's foreach passes with per-bucket tensor scalars.

    ``denom = (sqrt(v) + eps * sqrt(bc2)) * c`` with ``c = 1 / (sqrt(bc2) * s)`` and the signed
    step ``s = -lr * alpha / bc1``, so that ``p += m / denom`` applies the whole step (the trick of
    torch's capturable Adam) and alpha is folded in at no extra pass. Tensor-valued scalars are
    only ever multiplied (the foreach ``add``/``addcdiv`` overloads taking a tensor scalar read it
    back to the host). ``index``: the buckets' modulator groups as a tensor (cached by the caller).
    ``scalar_dtype``: the dtype the per-bucket scalars are computed in (default alpha's, float32);
    float64 when there are float64 parameters, whose AdamW steps use Python-float scalars.

    Square roots: :func:`foreach_sqrt` (on the CPU, ``1 / rsqrt``). A run with float16 second
    moments (:func:`narrow_range`) takes AdamW's order instead: ``sqrt(v) / sqrt(bc2) + eps``,
    ``m / denom``, times ``s``, added (two passes more): folded, its denominator overflows to inf
    once ``|g| > 65504 lr`` (the update vanishes) and its eps to 0 (0 / 0 where v is 0)."""
    if not buckets:
        return
    device, dtype = alpha.device, scalar_dtype or alpha.dtype
    # host columns: lr * wd and -1 / (sqrt(bc2) * lr / bc1); then decay = 1 - lr wd alpha beta and
    # scale = -1 / (sqrt(bc2) lr alpha / bc1) in three tensor ops
    host = to_device(
        [[b.lr * b.weight_decay, -1.0 / (math.sqrt(b.bias_correction2) * b.lr / b.bias_correction1)
          if b.lr else -math.inf] for b in buckets],
        device, dtype,
    )
    if index is None:
        index = to_device([b.group for b in buckets], device)
    a = alpha.to(dtype)  # (the product in the scalars' dtype: float64 for float64 parameters, as single_tensor_update)
    a_aw = torch.stack([a, a * beta.to(dtype)]).index_select(1, index)  # (2, buckets)
    decay = torch.addcmul(torch.ones_like(a_aw[1]), host[:, 0], a_aw[1], value=-1)
    scale = host[:, 1] / a_aw[0]
    scalars = zip(decay.unbind(0), scale.unbind(0))  # 0-dim views, two ops for all the buckets
    for b, (d, c) in zip(buckets, scalars):
        eps = b.eps * math.sqrt(b.bias_correction2)
        for params, exp_avgs, exp_avg_sqs, reciprocal, narrow in b.runs or [
                (b.params, b.exp_avgs, b.exp_avg_sqs, reciprocal_roots(b.exp_avg_sqs), narrow_range(b.exp_avg_sqs))]:
            if narrow:
                _narrow_update(b, params, exp_avgs, exp_avg_sqs, d, c)
                continue
            denom = foreach_sqrt(exp_avg_sqs, reciprocal)
            torch._foreach_add_(denom, eps)
            torch._foreach_mul_(denom, c)
            torch._foreach_mul_(params, d)
            torch._foreach_addcdiv_(params, exp_avgs, denom)


def _narrow_update(b: Bucket, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   decay: Tensor, scale: Tensor) -> None:
    """:func:`foreach_update` of one run in AdamW's order (float16: :func:`narrow_range`);
    ``decay``, ``scale``: the bucket's 0-dim scalars, ``scale = -bc1 / (sqrt(bc2) lr alpha)``.

    The denominator is rounded in the tensors' dtype, as AdamW's; the direction ``m / denom`` times
    the step size is taken in float32 (float16 and bfloat16 tensors widened; float64 ones kept) and
    rounded once, when added to the parameter, as AdamW's ``addcdiv`` does in its float32 opmath:
    rounded to float16 twice more, the update drifted from AdamW's by float16 ulps within 50 steps.
    The run is taken :data:`NARROW_CHUNK_NUMEL` elements at a time (larger contiguous tensors as
    flat views), so that its float32 temporaries stay bounded: widened all at once, a whole
    bucket's (on an accelerator, where runs are not cut) took 14 bytes per float16 element, 3.5x
    the moments themselves."""
    root_bc2 = math.sqrt(b.bias_correction2)
    step = torch.reciprocal(scale * root_bc2)  # -lr alpha / bc1
    pieces: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        cut = is_cut(p, m, v, NARROW_CHUNK_NUMEL)
        for out, t in zip(pieces, (p, m, v)):
            out.extend(split_views(t, NARROW_CHUNK_NUMEL) if cut else [t])
    ps, ms, vs = pieces
    for sl in chunk_slices([t.numel() for t in ps], 0, len(ps), NARROW_CHUNK_NUMEL):
        denom = torch._foreach_sqrt(vs[sl])
        torch._foreach_div_(denom, root_bc2)
        torch._foreach_add_(denom, b.eps)
        update = torch._foreach_div([widened(m) for m in ms[sl]], [widened(d) for d in denom])  # m / denom
        del denom
        torch._foreach_mul_(update, step)
        torch._foreach_mul_(ps[sl], decay)
        torch._foreach_add_(ps[sl], update)  # (in float32, rounded once to the parameter's dtype)


def widened(t: Tensor) -> Tensor:
    """``t`` in float32 if it is of :data:`NARROW_DTYPES` (AdamW's opmath for them), else as it is."""
    return t.float() if t.dtype in NARROW_DTYPES else t
