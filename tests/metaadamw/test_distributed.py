"""MetaAdamW under torch.distributed: two CPU ranks (gloo, a file store: no network) training a
DistributedDataParallel model keep one modulator (rank 0's at the start, the mean meta-gradient
at every meta-update), so the replicas stay identical."""

from __future__ import annotations

import copy
import datetime
import os
import sys
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaadamw import MetaAdamW
from tests.metaadamw.helpers import mlp, mse, regression_batches, small_kwargs

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
#: rank 1's other options that MetaAdamW's config does not hold: each steps its replica (or modulator) apart
OTHER_SETTINGS = {"other_meta_optimizer": {"meta_optimizer": "adam"}, "other_lr": {"lr": 1e-3},
                  "other_foreach": {"foreach": False}}
META_LR = 0.05  # large enough for the meta-update to move the modulator visibly
#: the scenarios where one rank's error must reach the others at once, and their process group's timeout (s)
ANNOUNCED = ("no_val_on_rank1", "step_fails_on_rank1")
SHORT_TIMEOUT = 60  # (as the other scenarios': a shorter one could time out a slow rank's pass on a loaded 2-core CI machine)


def _batches(rank: int):
    """(training batch, batch 2, validation batch) of one rank: each rank its own."""
    b = regression_batches(n=3 * WORLD, seed=1)
    return b[3 * rank: 3 * rank + 3]


class _Centred(torch.nn.Module):
    """Subtracts the mean over the ranks of its input's batch mean, all-reduced in every forward pass
    (as ``SyncBatchNorm`` all-reduces its statistics, which needs a GPU); counts its passes."""

    def __init__(self):
        super().__init__()
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        mean = x.detach().mean(0)
        dist.all_reduce(mean)
        return x - mean / dist.get_world_size()


def _make(seed: int, subset: bool = False, layer: int | None = None, collective: bool = False, **kwargs):
    """``subset``: all tensors but the last; ``layer``: only those of that Linear layer (of three alike);
    ``collective``: a model whose forward runs a collective of its own (:class:`_Centred`)."""
    torch.manual_seed(0)
    model = mlp(0) if layer is None else mlp(0, widths=(6, 16, 16, 16, 1))
    if collective:
        model = torch.nn.Sequential(model[0], _Centred(), *model[1:])
    torch.manual_seed(seed)  # the modulator's initialisation
    params = list(model.named_parameters())[:-1] if subset else model.named_parameters()
    if layer is not None:
        params = [(n, p) for n, p in params if n.startswith(f"{layer}.")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MetaAdamW(params, model=model, meta_lr=META_LR, **small_kwargs(**kwargs))
    return model, opt


def _loopback() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)


def _worker(rank: int, store: str, out: str, scenario: str) -> None:
    """One rank. ``scenario``: "sync" (the default), "nosync" (sync_meta=False), "poison" (rank 1's
    validation targets are NaN: its meta-loss is not finite), "mismatch" (rank 1 builds a deeper
    modulator), "subset" (rank 1 optimises one tensor fewer), "other_layer" (each rank optimises
    another layer of the same shapes), "added_on_rank0" (both optimise all tensors but the last,
    which rank 0 alone then adds with add_param_group), "other_options" (rank 1 gives another alpha_range),
    "raises_on_rank1" (rank 1's loss_fn raises in meta_step), "no_val_on_rank1" (rank 1's validation batch
    is None: its loader ran out, say), "step_fails_on_rank1" (rank 1's meta-optimizer step raises), "late" (the optimizer is made before the process group),
    "late_stepped" (made and stepped before it), "late_stepped_steps" (the same, then step()
    alone), "late_stepped_rank0" (rank 0 alone stepped before it), "late_loaded" (made and
    loaded from one checkpoint before it), "late_loaded_adamw" (the same with a torch.optim.AdamW checkpoint),
    "pickled" (rank 0 pickles the model and optimizer made in the group to synced.pt), "late_unpickled_stepped" (each
    rank unpickles synced.pt and steps it before the group),
    "interrupted_on_rank1" / "step_interrupted_on_rank1" (KeyboardInterrupt in rank 1's loss_fn / meta-optimizer
    step), "collective_poison" (a model with a collective of its own, rank 1's batch 2 targets NaN: its
    Hessian-vector product's ||v|| is not finite) or "collective_zero_v" (the same model, rank 1's loss on batch 2
    multiplied by 0: its g', and v, are 0; "collective_zero_v_nosync": with sync_meta=False)."""
    if _loopback():  # gloo's ranks talk over the loopback interface only (no network in tests)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback())
    kwargs = {"sync_meta": scenario != "nosync" and not scenario.endswith("_nosync")}
    if scenario == "mismatch" and rank == 1:
        kwargs["modulator_layers"] = 2
    if scenario == "other_options" and rank == 1:
        kwargs["alpha_range"] = 0.5  # (the same modulator shapes)
    if scenario in OTHER_SETTINGS and rank == 1:  # options that config does not hold
        kwargs.update(OTHER_SETTINGS[scenario])
    if (scenario == "subset" and rank == 1) or scenario == "added_on_rank0":
        kwargs["subset"] = True
    if scenario == "other_layer":
        kwargs["layer"] = 2 + 2 * rank
    if scenario.startswith("collective"):
        kwargs["collective"] = True
    early = _make(100 + rank, **kwargs) if scenario.startswith("late") else None
    if scenario == "late_unpickled_stepped":  # an optimizer pickled in an earlier run's process group ("pickled")
        early = torch.load(f"{out}/synced.pt", weights_only=False)
    if scenario in ("late_stepped", "late_stepped_steps", "late_loaded", "late_unpickled_stepped") or (
            scenario == "late_stepped_rank0" and rank == 0):
        stepped = early if scenario != "late_loaded" else _make(7)  # late_loaded: the same checkpoint on every rank
        mse(stepped[0], _batches(0 if scenario == "late_loaded" else rank)[0]).backward()
        stepped[1].step()
        stepped[1].zero_grad()
        if scenario == "late_loaded":
            early[1].load_state_dict(stepped[1].state_dict())
            early[0].load_state_dict(stepped[0].state_dict())
    if scenario == "late_loaded_adamw":  # an AdamW run switched to MetaAdamW, as README's "drop-in" section does
        net = mlp(0)
        adamw = torch.optim.AdamW(net.parameters())
        mse(net, _batches(0)[0]).backward()
        adamw.step()
        early[1].load_state_dict(adamw.state_dict())
        early[0].load_state_dict(net.state_dict())
    # a collective mismatch fails, not hangs (sooner where the test is that no rank waits for the timeout)
    timeout = SHORT_TIMEOUT if scenario in ANNOUNCED else 60
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        if scenario == "sharded":  # sharded parameters: refused when the optimizer is made
            torch.save({"errors": _sharded_errors()}, f"{out}/rank{rank}.pt")
            return
        try:
            model, opt = early or _make(100 + rank, **kwargs)  # every rank its own seed
        except ValueError as exc:
            torch.save({"error": str(exc)}, f"{out}/rank{rank}.pt")
            return
        if scenario == "pickled":  # (for "late_unpickled_stepped")
            if rank == 0:
                torch.save((model, opt), f"{out}/synced.pt")
            torch.save({}, f"{out}/rank{rank}.pt")
            return
        if scenario == "lr_set_on_rank1" and rank == 1:  # (as a scheduler run on one rank only would)
            opt.param_groups[0]["lr"] = 1e-3
        if scenario == "added_on_rank0" and rank == 0:
            name, last = list(model.named_parameters())[-1]
            opt.add_param_group({"params": [last], "param_names": [name]})
        start = [p.detach().clone() for p in opt.meta_parameters()]
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        train, b2, val = _batches(rank)
        if scenario == "poison" and rank == 1:
            val = (val[0], torch.full_like(val[1], float("nan")))
        if scenario == "no_val_on_rank1" and rank == 1:
            val = None
        if scenario == "collective_poison" and rank == 1:
            b2 = (b2[0], torch.full_like(b2[1], float("nan")))
        if scenario.startswith("collective_zero_v") and rank == 1:
            b2 = (*b2, 0.0)  # (a loss scale, read by loss_fn below)
        if scenario == "step_interrupted_on_rank1" and rank == 1:
            def step_interrupted(*args, **kwargs):
                raise KeyboardInterrupt("rank 1 interrupted in its meta-optimizer step")

            opt.meta_optimizer.step = step_interrupted
        if scenario == "step_fails_on_rank1" and rank == 1:
            def step_failing(*args, **kwargs):
                raise RuntimeError("rank 1's meta-optimizer step failed")  # (out of memory, say)

            opt.meta_optimizer.step = step_failing
        opt.zero_grad()
        mse(ddp, train).backward()  # DDP averages the gradients
        grads = [p.grad.clone() for p in model.parameters()]
        started = time.monotonic()
        try:
            if scenario == "late_stepped_steps":  # training goes on with step() alone: refused there
                opt.step()
                torch.save({"error": "step() did not refuse it"}, f"{out}/rank{rank}.pt")
                return
            def failing(m, batch):
                raise RuntimeError("rank 1's loss_fn failed")

            def interrupted(m, batch):
                raise KeyboardInterrupt("rank 1 interrupted in its loss_fn")  # (Ctrl-C, or a signal to that rank)

            def scaled(m, batch):  # (collective_zero_v: batch 2 of rank 1 carries a scale)
                return mse(m, batch[:2]) * (batch[2] if len(batch) > 2 else 1.0)

            loss_fn = (failing if scenario == "raises_on_rank1" and rank == 1 else  # (a batch it cannot take, say)
                       interrupted if scenario == "interrupted_on_rank1" and rank == 1 else
                       scaled if scenario.startswith("collective_zero_v") else mse)
            passes_before = model[1].passes if scenario.startswith("collective") else 0
            record = opt.meta_step(ddp, loss_fn, None, b2, val)  # each rank on its own batches
            passes = model[1].passes - passes_before if scenario.startswith("collective") else None
        except (RuntimeError, ValueError, KeyboardInterrupt) as exc:
            torch.save({"error": str(exc), "type": type(exc).__name__, "seconds": time.monotonic() - started},
                       f"{out}/rank{rank}.pt")
            return
        grads_kept = all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        opt.step()
        after_meta = [p.detach().clone() for p in opt.meta_parameters()]
        opt.zero_grad()  # a second training step through DDP: its hooks must be intact
        mse(ddp, train).backward()
        opt.step()
        torch.save({"start": start, "meta": after_meta, "model": [p.detach().clone() for p in model.parameters()],
                    "skipped": record.skipped, "reason": record.reason, "grads_kept": grads_kept, "passes": passes},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.barrier()  # both ranks done with their collectives before the teardown (gloo aborts otherwise)
        if sys.exc_info()[0] is None:  # (a failure propagates, with its traceback, through the teardown)
            # out without the process group's teardown: torch 2.13's ProcessGroupGloo destructor can
            # deadlock (it joins its run-loop thread while holding the GIL that thread waits for), which
            # hung one test run in a dozen; the results are saved above
            os._exit(0)
        dist.destroy_process_group()


def _sharded_errors() -> list[str | None]:
    """What making MetaAdamW raises for FSDP's flat parameters, FSDP with the original parameters (views of
    the flat shard), FSDP2's DTensors and ZeroRedundancyOptimizer's shards (None: accepted)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cpu = torch.device("cpu")

    def named(model):
        return MetaAdamW(model.named_parameters(), model=model, **small_kwargs())

    class ZeroWithProbe(ZeroRedundancyOptimizer):  # a MetaAdamW of another, whole model made in ZeRO's __init__
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            self.probe = MetaAdamW(mlp(1).parameters(), **small_kwargs(grouping="original", sync_meta=False))

    makers = [lambda: named(FullyShardedDataParallel(mlp(0), device_id=cpu)),
              lambda: named(FullyShardedDataParallel(mlp(0), device_id=cpu, use_orig_params=True)),
              lambda: named(fully_shard(mlp(0), mesh=init_device_mesh("cpu", (WORLD,)))),
              # (FSDP's views of its flat shard, without names: no FSDP module name to see)
              lambda: MetaAdamW(FullyShardedDataParallel(mlp(0), device_id=cpu, use_orig_params=True).parameters(),
                                **small_kwargs(grouping="original", sync_meta=False)),
              # (ZeRO passes tensors without names: with grouping="original" nothing else stops it)
              lambda: ZeroRedundancyOptimizer(mlp(0).parameters(), optimizer_class=MetaAdamW,
                                              **small_kwargs(grouping="original")),
              lambda: ZeroWithProbe(mlp(0).parameters(), optimizer_class=torch.optim.SGD, lr=0.1)]
    errors: list[str | None] = []
    for make in makers:
        try:
            make()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _run(tmp_path, scenario: str) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), scenario), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_ranks_keep_one_modulator_with_the_mean_meta_gradient(tmp_path):
    ranks = _run(tmp_path, "sync")
    # the same start (rank 0's modulator, seed 100), the same meta-update, the same replicas
    _, reference_opt = _make(100)
    for a, b, c in zip(ranks[0]["start"], ranks[1]["start"], reference_opt.meta_parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    for key in ("meta", "model"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), f"the ranks' {key} parameters differ"
    assert not ranks[0]["skipped"]
    assert all(r["grads_kept"] for r in ranks), "meta_step must leave the gradients DDP averaged as they were"
    # the meta-update is SGD with the mean of the ranks' meta-gradients: the mean of the modulators
    # that each rank's batches would have given alone (the gradient: DDP's mean over the ranks)
    model, opt = _make(100)
    grads = []
    for r in range(WORLD):
        model.zero_grad()
        mse(model, _batches(r)[0]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    alone = []
    for r in range(WORLD):
        m, o = copy.deepcopy((model, opt))
        for p, *gs in zip(m.parameters(), *grads):
            p.grad = sum(gs) / WORLD
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o.meta_step(m, mse, None, *_batches(r)[1:])
        alone.append([p.detach().clone() for p in o.meta_parameters()])
    assert any(not torch.allclose(a, b) for a, b in zip(*alone)), "the ranks' batches must give different updates"
    for got, a, b in zip(ranks[0]["meta"], *alone):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-7)


def test_without_sync_each_rank_keeps_its_own_modulator(tmp_path):
    ranks = _run(tmp_path, "nosync")
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["start"], ranks[1]["start"]))
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["model"], ranks[1]["model"])), \
        "different modulators give the replicas different multipliers"


def test_meta_step_runs_the_module_inside_a_data_parallel_wrapper():
    # the hypothetical passes must not go through DDP's forward (buffer broadcasts, reducer hooks)
    model, opt = _make(0)
    wrapped = torch.nn.DataParallel(model)  # (on the CPU it just calls the module)
    seen = []

    def loss_fn(m, batch):
        seen.append(m)
        return mse(m, batch)

    mse(wrapped, _batches(0)[0]).backward()
    opt.meta_step(wrapped, loss_fn, None, *_batches(0)[1:])
    assert seen and all(m is model for m in seen)


def test_a_rank_without_a_finite_meta_loss_makes_every_rank_skip(tmp_path):
    ranks = _run(tmp_path, "poison")
    assert all(r["skipped"] for r in ranks)
    assert ranks[0]["reason"] == "non-finite mean meta-gradient over the ranks (this rank's meta-loss is finite)"
    assert ranks[1]["reason"] == "non-finite meta-loss or meta-gradient"
    for r in ranks:  # the modulator as it started, on both ranks
        for a, b in zip(r["start"], r["meta"]):
            assert torch.equal(a, b)
    for a, b in zip(ranks[0]["model"], ranks[1]["model"]):
        assert torch.equal(a, b)


def test_ranks_with_different_modulators_are_refused_on_every_rank(tmp_path):
    ranks = _run(tmp_path, "mismatch")
    for r in ranks:
        assert "the ranks built different modulators" in r["error"] and "same model, param groups and options" in r["error"]


def test_ranks_optimising_different_tensors_are_refused_on_every_rank(tmp_path):
    # with the default features the modulators have the same size whatever the groups: the check used to
    # pass, and the meta-gradients of different groups were averaged into one modulator
    ranks = _run(tmp_path, "subset")
    for r in ranks:
        assert "the ranks built different modulators (optimized tensors" in r["error"], r["error"]


def test_an_optimizer_made_before_the_process_group_takes_rank_0s_modulator_before_it_is_used(tmp_path):
    # the broadcast was decided in __init__ only: made before init_process_group, the ranks kept
    # different modulators (while meta_step averaged their meta-gradients), and the replicas drifted
    (tmp_path / "late").mkdir()
    (tmp_path / "sync").mkdir()
    late = _run(tmp_path / "late", "late")
    synced = _run(tmp_path / "sync", "sync")
    for key in ("meta", "model"):
        for a, b, c in zip(late[0][key], late[1][key], synced[0][key]):
            assert torch.equal(a, b) and torch.equal(a, c), key


@pytest.mark.parametrize("scenario", ["late_loaded", "late_loaded_adamw"])
def test_an_optimizer_that_loaded_a_checkpoint_before_the_process_group_is_not_refused(tmp_path, scenario):
    # the refusal looked at the step counters, which load_state_dict restores: resuming crashed; with
    # an AdamW checkpoint it still did (the counters before the load counted as the load's)
    ranks = _run(tmp_path, scenario)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    for key in ("meta", "model"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("scenario", ["late_stepped", "late_stepped_steps", "late_stepped_rank0"])
def test_an_optimizer_that_stepped_before_the_process_group_is_refused_on_every_rank(tmp_path, scenario):
    # with step() alone after it, the cached step plan skipped the check and the replicas drifted apart; when
    # one rank alone had stepped, it alone raised and the other waited in a collective until the timeout
    ranks = _run(tmp_path, scenario)
    for rank, r in enumerate(ranks):
        who = "the optimizer of another rank" if scenario == "late_stepped_rank0" and rank == 1 else "this optimizer"
        assert f"{who} stepped before torch.distributed's process group of 2 ranks existed" in r["error"], r["error"]
        assert "Make the optimizer after init_process_group" in r["error"]


def test_an_optimizer_unpickled_from_a_process_group_and_stepped_before_the_next_one_is_refused(tmp_path):
    # the pickle kept the synced world size of the run that saved it: in a new run of as many ranks, the optimizer that
    # each rank had stepped on its own data before init_process_group was taken as synced, and the replicas drifted apart
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    _run(tmp_path / "a", "pickled")
    (tmp_path / "a" / "synced.pt").rename(tmp_path / "b" / "synced.pt")  # (each run its own store)
    ranks = _run(tmp_path / "b", "late_unpickled_stepped")
    for r in ranks:
        assert "error" in r, "not refused: the ranks' replicas drift apart"
        assert "this optimizer stepped before torch.distributed's process group of 2 ranks existed" in r["error"], r


def test_sharded_parameters_of_fsdp_and_zero_are_refused_when_the_optimizer_is_made(tmp_path):
    # FSDP2's DTensors failed later inside step() and meta_step with sharding errors; FSDP1's flat parameters (and
    # its views of them) were accepted, each rank stepping on the statistics of its shard. As ZeRO's
    # optimizer_class, it was refused for the wrong reason (missing names; ranks with different
    # modulators) or, with shards of equal shapes, accepted: one modulator for different tensors
    for r in _run(tmp_path, "sharded"):
        kinds = ["FSDP's flat parameter", "parameters of an FSDP-wrapped model", "DTensor",
                 "parameters of an FSDP-wrapped model",
                 "a shard of the parameters from ZeroRedundancyOptimizer"]
        assert len(r["errors"]) == len(kinds) + 1
        assert r["errors"][-1] is None, "a MetaAdamW of a whole model, made elsewhere inside ZeRO, is not ZeRO's"
        for error, kind in zip(r["errors"], kinds):
            assert error is not None and f"sharded or distributed tensors ({kind}" in error, (kind, error)


def test_ranks_optimising_different_tensors_of_the_same_shapes_are_refused_on_every_rank(tmp_path):
    # counts and sizes agreed: one modulator was trained on the mean meta-gradient of different layers
    ranks = _run(tmp_path, "other_layer")
    for r in ranks:
        expected = "the ranks built different modulators (fingerprint of the optimized tensors' names"
        assert expected in r["error"], r["error"]


def test_an_add_param_group_that_not_every_rank_made_is_refused_on_every_rank_at_the_next_meta_update(tmp_path):
    # the layout was compared when the optimizer was made only: a group rank 0 alone added trained on with
    # other multipliers on each rank, and the replicas drifted apart without a word
    ranks = _run(tmp_path, "added_on_rank0")
    for r in ranks:
        assert "the ranks' optimizers no longer hold the same tensors in the same groups" in r["error"], r
        assert "Every rank must make the same add_param_group calls" in r["error"]


def test_ranks_with_other_options_are_refused_on_every_rank(tmp_path):
    # modulators of the same shapes passed: rank 1's multipliers, from another alpha_range, stepped its replica apart
    ranks = _run(tmp_path, "other_options")
    for r in ranks:
        assert "the ranks built different modulators (fingerprint of the optimized tensors' names, shapes and " \
               "groups and of the options" in r["error"], r["error"]


@pytest.mark.parametrize("scenario", sorted(OTHER_SETTINGS))
def test_ranks_with_another_meta_optimizer_lr_or_foreach_are_refused_on_every_rank(tmp_path, scenario):
    # the fingerprint held only config's options: another meta-optimizer (Adam steps from the same mean
    # meta-gradient), another lr or the single-tensor path on one rank passed, and the replicas drifted apart
    ranks = _run(tmp_path, scenario)
    for r in ranks:
        assert "error" in r, "not refused: the ranks' replicas drift apart"
        assert "the ranks built different modulators (fingerprint of the optimized tensors' names, shapes and " \
               "groups and of the options" in r["error"], r["error"]


def test_a_param_group_lr_set_on_one_rank_only_is_refused_on_every_rank_at_the_next_meta_update(tmp_path):
    ranks = _run(tmp_path, "lr_set_on_rank1")
    for r in ranks:
        assert "error" in r, "not refused: the ranks' replicas drift apart"
        assert "the ranks' optimizers no longer hold the same tensors in the same groups" in r["error"], r["error"]


def test_the_docs_say_that_without_sync_the_ranks_need_the_same_seed_not_only_the_same_batches(tmp_path):
    # README and docstring said the replicas drift apart "unless every rank meta-steps on the same batches":
    # with sync_meta=False nothing is broadcast, so ranks seeded apart (as this file's are) drift from the
    # first step even on the same batches
    ranks = _run(tmp_path, "nosync")
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["start"], ranks[1]["start"]))
    from pathlib import Path
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    docstring = " ".join(MetaAdamW.__doc__.split())
    for text in (readme, docstring):
        assert "from the same random seed and meta-steps on the same batches" in text


def test_an_error_in_one_ranks_meta_update_is_raised_on_every_rank_at_once(tmp_path):
    # rank 1 raised alone and rank 0 waited in the all-reduce of the meta-gradients until the process
    # group's timeout (then gloo's "Timed out waiting ... for recv operation", naming nothing of the cause)
    # (timed inside the worker, from the call: the time to spawn the ranks, a minute and more on a loaded machine,
    # made a wall-clock bound around _run fail although no rank had waited)
    ranks = _run(tmp_path, "raises_on_rank1")
    assert ranks[1]["error"] == "rank 1's loss_fn failed"
    assert "1 other rank(s) of 2 raised an error in this meta-update" in ranks[0]["error"], ranks[0]["error"]
    assert ranks[0]["seconds"] < 55, "rank 0 waited for the process group's timeout (60 s)"


def test_an_error_of_meta_steps_checks_on_one_rank_is_raised_on_every_rank_at_once(tmp_path):
    # a check that depends on the rank's batch (no val_batch) was raised on rank 1 alone, before its meta-update,
    # and rank 0 waited in the all-reduce of the meta-gradients until the process group's timeout
    ranks = _run(tmp_path, "no_val_on_rank1")
    assert ranks[1]["error"].startswith("objective 'combined' needs a validation batch"), ranks[1]["error"]
    assert "1 other rank(s) of 2 raised an error in this meta-update" in ranks[0]["error"], ranks[0]["error"]
    assert ranks[0]["seconds"] < SHORT_TIMEOUT - 5, "rank 0 waited for the process group's timeout"


def test_a_meta_optimizer_step_that_fails_on_one_rank_is_raised_on_every_rank_at_once(tmp_path):
    # after the averaging, rank 1's meta-optimizer step raised (an out-of-memory error, say) and rank 0 went on
    # with a modulator that had stepped, into its next collective, until the process group's timeout
    ranks = _run(tmp_path, "step_fails_on_rank1")
    assert ranks[1]["error"] == "rank 1's meta-optimizer step failed"
    assert "the meta-optimizer's step failed on 1 other rank(s) of 2" in ranks[0]["error"], ranks[0]["error"]
    assert "the ranks' modulators now differ" in ranks[0]["error"]
    assert ranks[0]["seconds"] < SHORT_TIMEOUT - 5, "rank 0 waited for the process group's timeout"


@pytest.mark.parametrize("scenario, said", [
    ("interrupted_on_rank1", "1 other rank(s) of 2 raised an error in this meta-update"),
    ("step_interrupted_on_rank1", "the meta-optimizer's step failed on 1 other rank(s) of 2")])
def test_a_keyboard_interrupt_on_one_rank_is_announced_to_every_rank(tmp_path, scenario, said):
    # a KeyboardInterrupt (not an Exception) skipped the announcement: rank 1 stopped at once and rank 0 waited in
    # the all-reduce of the meta-gradients (or the count of the steps' failures) until the process group's timeout
    ranks = _run(tmp_path, scenario)
    assert ranks[1]["type"] == "KeyboardInterrupt", ranks[1]
    assert ranks[1]["error"].startswith("rank 1 interrupted in its"), ranks[1]["error"]
    assert said in ranks[0]["error"], ranks[0]["error"]


def test_a_rank_whose_hessian_vector_product_is_not_finite_still_runs_the_pass_of_the_others(tmp_path):
    # rank 1 (||v|| not finite) skipped the finite-difference pass alone: the others' pass met its all-reduce of the
    # meta-gradients with the model's own collective, and gloo aborted them ("Received data size doesn't match")
    ranks = _run(tmp_path, "collective_poison")
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    assert [r["passes"] for r in ranks] == [4, 4], "the ranks ran different numbers of the model's passes"
    assert all(r["skipped"] for r in ranks)
    assert ranks[0]["reason"] == "non-finite mean meta-gradient over the ranks (this rank's meta-loss is finite)"
    for r in ranks:
        for a, b in zip(r["start"], r["meta"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("scenario", ["collective_zero_v", "collective_zero_v_nosync"])
def test_a_rank_whose_hessian_vector_product_is_zero_still_runs_the_pass_of_the_others(tmp_path, scenario):
    # rank 1 (v = 0: H v = 0) skipped the finite-difference pass alone, which the others ran: a collective mismatch
    # (with sync_meta=False too: the model's collectives are there all the same)
    ranks = _run(tmp_path, scenario)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    assert [r["passes"] for r in ranks] == [4, 4], "the ranks ran different numbers of the model's passes"
    assert not any(r["skipped"] for r in ranks)
    if scenario.endswith("_nosync"):  # (each rank its own modulator)
        return
    for key in ("meta", "model"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b), key
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["start"], ranks[0]["meta"])), "the modulator must move"
