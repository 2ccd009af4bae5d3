"""The trial runner: one training loop for every task, optimizer and sweep.

:class:`Trial` takes a flat trial config (see :mod:`ablate.config`), builds the task and the
optimizer, and trains with early stopping, warm-up epochs before meta-updates, a meta-update
every K steps (between the K-th step's backward pass and its ``step()``, reusing that gradient
as the meta-update's batch-1 gradient), and an epoch and/or step budget. It records per-epoch history, per-meta-update
telemetry and a final summary row, reports every epoch through a callback (so the same loop runs
alone, in tests and inside Ray Tune) and can checkpoint and resume bit-identically on CPU.

Reproducibility and pairing. The seed fixes Python's, NumPy's and torch's RNGs before the model
is built, and the data order through a dedicated generator. A trial's process-wide random stream
is its own: swapped in around its work (building, each epoch, the final evaluation) and the
caller's given back after it, so trials run in one process (a notebook, ``ablate tune``'s
lockstep seeds) neither disturb the caller's random state nor each other's (nor the caller's
number of torch threads: ``num_threads`` holds while the trial works). Meta-updates draw their
batches from their own generators and run under ``torch.random.fork_rng``, so an AdamW trial and a MetaAdamW
trial with the same seed see the same initial weights, the same batches in the same order and the
same dropout masks and augmentations: seeds are matched pairs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import io
import itertools
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ablate.allocator import keep_freed_memory
from ablate.config import ConfigError, identity_config, resolve_config, trial_id
from ablate.files import atomic_write_bytes
from ablate.optim import build_optimizer
from ablate.provenance import provenance
from ablate.tasks import data_fingerprint, get_task, move_to_device
from ablate.tasks.base import check_loss, check_metrics, check_task_instance, evaluating
from metaadamw import MetaAdamW

Callback = Callable[[dict, "Trial"], None]


class UnusableCheckpoint(ConfigError):
    """A checkpoint this trial cannot continue from: another trial's, one without the keys this version
    of ablate writes, or one that does not fit the trial's model or optimizer (written by other code)."""


class StaleCheckpoint(UnusableCheckpoint):
    """A checkpoint made on other data files than the trial reads now."""


#: the keys of a trial checkpoint (:meth:`Trial.state_dict`) that :meth:`Trial.load_state_dict` needs
#: (``config``, ``error``, ``patience_value`` and ``data_fingerprint`` may be missing: older checkpoints)
CHECKPOINT_KEYS = ("trial_id", "epoch", "step", "model", "optimizer", "rng", "generators", "history", "telemetry",
                   "best_value", "best_epoch", "best_state", "bad_epochs", "times", "stop_reason")


class TrialDiverged(RuntimeError):
    """The model's loss became non-finite."""


#: on accelerators, steps between two host reads of the divergence flag (each read synchronises)
DIVERGENCE_CHECK_STEPS = 20


@dataclasses.dataclass
class TrialResult:
    row: dict[str, Any]  # one row of the trials table (without study / arm columns)
    history: list[dict[str, Any]]
    telemetry: list[dict[str, Any]]

    @property
    def best_metric(self) -> float:
        return self.row["best_metric"]


def seed_everything(seed: int, cuda: bool = True) -> None:
    """Seed Python's, NumPy's and torch's generators; with ``cuda`` False torch's CPU generator alone
    (``torch.manual_seed`` seeds every CUDA device too, or queues that seed until CUDA starts: a CPU
    trial must leave CUDA alone)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    _torch_seed(seed, cuda)


def _torch_seed(seed: int, cuda: bool) -> None:
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


def rng_state(cuda: bool | None = None) -> dict[str, Any]:
    """The process-wide random states a trial draws from (Python, NumPy, torch, and CUDA's with ``cuda``;
    None: CUDA's where it is available). Reading CUDA's states starts CUDA on every visible GPU (memory
    in each): a CPU trial passes False."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any], cuda: bool = True) -> None:
    """Set the states :func:`rng_state` read (CUDA's only with ``cuda``, where the state has them)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if cuda and state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available here (torch.cuda.is_available() is False): "
                          "use device: cpu or auto")
    return torch.device(name)


def _device_used(device: torch.device) -> str:
    """The device a trial trained on, as its row records it: ``cpu``, or a GPU with its index (``cuda:0``)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _uses_cuda(device: torch.device) -> bool:
    """Whether a trial on ``device`` draws from (and seeds) CUDA's generators."""
    return device.type == "cuda"


@contextlib.contextmanager
def _callers_state_kept(cuda: bool) -> Iterator[None]:
    """The process-wide random state (CUDA's with ``cuda``) and torch's thread count as they were before
    the block, after it."""
    outside, threads = rng_state(cuda), torch.get_num_threads()
    try:
        yield
    finally:
        set_rng_state(outside, cuda)
        _set_threads(threads)


def _set_threads(n: int | None) -> None:
    """torch's intra-op threads to ``n`` (None: as they are); a no-op when they are that already."""
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trial:
    """One training run. ``Trial(config).run()`` returns a :class:`TrialResult`."""

    def __init__(self, config: dict[str, Any]):
        self.config = resolve_config(config)
        self.device = _device(self.config["device"])
        #: whether the trial's random stream holds CUDA's generators (a CPU trial never touches CUDA)
        self._cuda = _uses_cuda(self.device)
        with _callers_state_kept(self._cuda):  # (the trial seeds its own random streams and sets its threads)
            self._build()

    def _build(self) -> None:
        self.trial_id = trial_id(self.config)
        cfg = self.config
        self.spec = get_task(cfg["task"])
        if not cfg["num_threads"]:  # (the row records the threads it trains with: they change the last digits)
            cfg["num_threads"] = torch.get_num_threads()
        _set_threads(cfg["num_threads"])
        if cfg["cpu_malloc"] == "keep":
            keep_freed_memory()
        seed_everything(cfg["seed"], self._cuda)
        self.task = self.spec.build(cfg)
        check_task_instance(self.spec, self.task)
        self._loss_checked = False  # (the task's loss_fn: checked on the first batch)
        self.data_fingerprint = data_fingerprint(self.spec, cfg)  # (the files exist: the task just read them)
        self.provenance = provenance(self.spec, cfg)  # (the code as it is now, before the training: see ablate.provenance)
        self.model = self.task.model.to(self.device)
        self.metric = self.spec.metric
        self.min_delta = cfg["min_delta"]

        self._gens = {name: torch.Generator().manual_seed(cfg["seed"] * 1000 + k)
                      for k, name in enumerate(("train", "meta_train", "meta_val"))}
        bs, ebs = cfg["batch_size"], cfg["eval_batch_size"] or cfg["batch_size"]
        collate = self.task.collate_fn
        self.train_loader = DataLoader(self.task.train, bs, shuffle=True, generator=self._gens["train"],
                                       collate_fn=collate)
        self.val_loader = DataLoader(self.task.val, ebs, shuffle=False, collate_fn=collate)
        self.test_loader = DataLoader(self.task.test, ebs, collate_fn=collate) if self.task.test is not None else None
        self._meta_loaders = {
            "meta_train": DataLoader(self.task.train, bs, shuffle=True, generator=self._gens["meta_train"],
                                     collate_fn=collate),
            "meta_val": DataLoader(self.task.val, bs, shuffle=True, generator=self._gens["meta_val"],
                                   collate_fn=collate),
        }
        self.steps_per_epoch = len(self.train_loader)
        if cfg["max_train_batches"]:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg["max_train_batches"])
        per_epoch = cfg["meta_per_epoch"]
        #: meta-updates at given positions in each epoch (meta_per_epoch >= 1), else every K steps
        self.meta_in_epoch = bool(per_epoch) and per_epoch >= 1
        if self.meta_in_epoch and per_epoch > self.steps_per_epoch and cfg["optimizer"] == "metaadamw":
            warnings.warn(f"meta_per_epoch={per_epoch:g} is more than the {self.steps_per_epoch} steps of an epoch: "
                          f"one meta-update per step ({self.steps_per_epoch} per epoch)", stacklevel=2)
        self.meta_every = (max(1, round(self.steps_per_epoch / per_epoch)) if per_epoch else cfg["meta_every"])
        total = self.steps_per_epoch * cfg["epochs"]
        if cfg["max_steps"]:
            total = min(total, cfg["max_steps"])
        # the modulator's init must not shift the training RNG stream: on the CPU, nor on the trial's GPU
        # (torch.manual_seed reseeds every CUDA device, and an extractor's group embedding is drawn there)
        cuda_devices = list(range(torch.cuda.device_count())) if self._cuda else []
        with torch.random.fork_rng(devices=cuda_devices):
            _torch_seed(cfg["seed"] + 7919, self._cuda)
            self.optimizer = build_optimizer(cfg, self.model, total_steps=total)
        self.is_meta = isinstance(self.optimizer, MetaAdamW)

        # progress
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.best_value = math.inf if self.metric.mode == "min" else -math.inf
        #: the value of the last epoch that reset the patience (improved by more than min_delta)
        self.patience_value = self.best_value
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.times = {"train": 0.0, "meta": 0.0, "eval": 0.0}
        self.stop_reason = ""
        self.resumed_from_epoch = 0  # the epoch of the checkpoint this run continued from
        self.error = ""
        #: this trial's own stream of the process-wide generators (dropout, augmentation, ...):
        #: swapped in for each epoch and out after it, so trials stepped in turn in one process
        #: (``ablate tune`` trains a suggestion's seeds in lockstep) draw what each would alone
        self._rng = rng_state(self._cuda)

    # -----------------------------------------------------------------------------------------
    def run(self, callback: Callback | None = None, progress: bool = False) -> TrialResult:
        """Train until early stopping or the budget; ``callback(epoch_row, trial)`` after every epoch."""
        while not self.done:
            row = self.run_epoch(progress)
            if row is not None and callback is not None:
                callback(row, self)
        return self.finish()

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def run_epoch(self, progress: bool = False) -> dict[str, Any] | None:
        """One epoch and its early-stopping bookkeeping; returns its history row, or None when the
        trial ended without one (budget exhausted, or the loss diverged)."""
        if self.epoch >= self.config["epochs"]:
            self.stop_reason = "max_epochs"
            return None
        try:
            with self._own_rng():
                row = self._epoch(progress)
        except TrialDiverged as exc:
            self.error, self.stop_reason = str(exc), "diverged"
            return None
        self.history.append(row)
        self._early_stopping(row)
        return row

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """The trial's random stream and torch threads (``num_threads``) swapped in; the caller's back after."""
        with _callers_state_kept(self._cuda):
            set_rng_state(self._rng, self._cuda)
            _set_threads(self.config["num_threads"])
            try:
                yield
            finally:
                self._rng = rng_state(self._cuda)

    def finish(self) -> TrialResult:
        """Restore the best weights and build the result (test metrics included)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        with self._own_rng():  # (a task may evaluate with randomness: MC dropout, random crops)
            return self._result("diverged" if self.stop_reason == "diverged" else "ok", self.error)

    def _epoch(self, progress: bool) -> dict[str, Any]:
        cfg, dev = self.config, self.device
        self.epoch += 1
        self.model.train()
        meta_on = self.is_meta and self.epoch > cfg["warmup_epochs"]
        meta_iters = {k: iter(v) for k, v in self._meta_loaders.items()} if meta_on else {}
        loss_sum = torch.zeros((), device=dev)  # (each batch's mean loss times its examples)
        n_examples = 0
        # the first step whose loss is not finite, and that loss: kept on the device (no host sync
        # per step), read every DIVERGENCE_CHECK_STEPS steps (every step on the CPU, where reading
        # is free), so a diverged trial stops within those steps, not at the end of the epoch
        first_bad, bad_loss = torch.full((), -1, dtype=torch.long, device=dev), torch.zeros((), device=dev)
        check_every = 1 if dev.type == "cpu" else DIVERGENCE_CHECK_STEPS
        n_batches, t_meta, meta_before = 0, 0.0, self.meta_updates
        t0 = time.perf_counter()
        batches = _limit(self.train_loader, self.steps_per_epoch)
        sizes = _batch_sizes(self.train_loader)  # (the examples of each batch, as the loader batches them)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {self.epoch}", leave=False)
        for batch in batches:
            batch = move_to_device(batch, dev)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss_fn(self.model, batch)
            if not self._loss_checked:
                check_loss(self.spec, loss)
                self._loss_checked = True
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
            if meta_on and self._meta_due(n_batches, self.step):
                # before step(): the meta-update reuses this batch's gradient as its g (batch 1)
                _sync(dev)  # (on a GPU: the training backward's tail is training time, not meta time)
                tm = time.perf_counter()
                self._meta_update(meta_iters)
                _sync(dev)
                t_meta += time.perf_counter() - tm
            self.optimizer.step()
            value = loss.detach()
            size = next(sizes)
            loss_sum += value * size
            n_examples += size
            newly = ~torch.isfinite(value) & (first_bad < 0)
            first_bad.masked_fill_(newly, self.step + 1)
            bad_loss = torch.where(newly, value.to(bad_loss.dtype), bad_loss)
            n_batches += 1
            self.step += 1
            if self.step % check_every == 0 and int(first_bad) >= 0:
                break
            if cfg["max_steps"] and self.step >= cfg["max_steps"]:
                self.stop_reason = "max_steps"
                break
        _sync(dev)
        t_train = time.perf_counter() - t0 - t_meta
        self.times["train"] += t_train  # (also a diverged epoch's time counts in the trial's totals)
        self.times["meta"] += t_meta
        if int(first_bad) >= 0:
            raise TrialDiverged(f"training loss became {float(bad_loss)} at step {int(first_bad)} (epoch {self.epoch}); "
                                f"stopped at step {self.step}")
        train_loss = float(loss_sum) / max(n_examples, 1)  # (over examples: a last, partial batch weighs its size)
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss became {train_loss} in epoch {self.epoch} (step {self.step})")
        te = time.perf_counter()
        metrics = self._evaluate(self.val_loader)
        check_metrics(self.spec, metrics)
        t_eval = time.perf_counter() - te
        self.times["eval"] += t_eval
        if not all(math.isfinite(v) for v in metrics.values()):
            raise TrialDiverged(f"validation metrics became non-finite in epoch {self.epoch}: {metrics}")
        return {
            "epoch": self.epoch, "step": self.step, "train_loss": train_loss,
            **{f"val_{k}": float(v) for k, v in metrics.items()},
            "time_train_s": t_train, "time_meta_s": t_meta, "time_eval_s": t_eval,
            "wall_s": sum(self.times.values()), "meta_updates": self.meta_updates,
            "meta_updates_epoch": self.meta_updates - meta_before,
        }

    def _evaluate(self, loader: DataLoader) -> dict[str, Any]:
        """The task's ``evaluate`` on ``loader``, the model in evaluation mode and without gradients (dropout
        off, BatchNorm's running statistics used, not updated, by the validation and test data), whether or not
        the task's own ``evaluate`` switches it (one that wants a module in training mode, MC dropout, may set
        it inside); the model's training mode as it was after it."""
        with evaluating(self.model):
            return self.task.evaluate(self.model, _to_device(loader, self.device))

    def _meta_due(self, i: int, step: int) -> bool:
        """Whether the ``i``-th step of this epoch (from 0; ``step`` of the run) ends with a meta-update: with
        ``meta_per_epoch`` >= 1 at evenly spread positions in every epoch (exactly that many per
        epoch, rounded down when it is not whole: 2 in 5 steps at steps 3 and 5), else every
        ``meta_every`` steps of the whole run (``meta_per_epoch`` < 1: once every few epochs)."""
        if self.meta_in_epoch:
            per, n = min(self.config["meta_per_epoch"], self.steps_per_epoch), self.steps_per_epoch
            return math.floor((i + 1) * per / n) > math.floor(i * per / n)
        return (step + 1) % self.meta_every == 0

    def planned_meta_updates(self) -> int:
        """The meta-updates the budget holds (epochs, max_steps, warm-up epochs and the schedule),
        if early stopping does not end the trial first: 0 for AdamW, and for a MetaAdamW trial whose
        budget ends before its first meta-update (its modulator would stay as initialised)."""
        if not self.is_meta:
            return 0
        cfg, n = self.config, self.steps_per_epoch
        total = n * cfg["epochs"] if not cfg["max_steps"] else min(n * cfg["epochs"], cfg["max_steps"])
        return sum(self._meta_due(step % n, step) for step in range(cfg["warmup_epochs"] * n, total))

    @property
    def meta_updates(self) -> int:
        """Meta-updates made so far (their telemetry rows are numbered 0, 1, ...)."""
        return self.telemetry[-1]["meta_update"] + 1 if self.telemetry else 0

    def _meta_update(self, iters: dict[str, Iterator]) -> None:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            b2 = move_to_device(self._next(iters, "meta_train"), self.device)
            val = move_to_device(self._next(iters, "meta_val"), self.device)
            # batch 1 is the training batch just back-propagated: its gradient is in .grad
            record = self.optimizer.meta_step(self.model, self.task.loss_fn, None, b2, val)
        index = self.meta_updates
        scalars = {"meta_loss": record.meta_loss, "skipped": record.skipped,
                   **{f"term_{k}": v for k, v in record.terms.items()},
                   **{f"sigma_{k}": record.sigmas.get(k, math.nan) for k in record.terms}}
        for g, name in enumerate(record.groups):
            self.telemetry.append({
                "meta_update": index, "step": self.step + 1, "epoch": self.epoch, "group": name, "group_index": g,
                "alpha": record.alpha[g], "beta": record.beta[g], "lambda1": record.lambda1[g],
                "lambda2": record.lambda2[g], **scalars,
            })

    def _next(self, iters: dict[str, Iterator], key: str) -> Any:
        try:
            return next(iters[key])
        except StopIteration:
            iters[key] = iter(self._meta_loaders[key])
            return next(iters[key])

    def _early_stopping(self, row: dict[str, Any]) -> None:
        """The best epoch is the best validation value recorded (its weights are restored at the
        end); ``min_delta`` decides only the patience, as in Lightning's EarlyStopping: an epoch
        resets it when it improves by more than ``min_delta`` on the last epoch that reset it, so a
        run of small gains still stops, and still reports the best of them."""
        value = row[f"val_{self.metric.name}"]
        if self.metric.better(value, self.best_value):
            self.best_value, self.best_epoch = value, self.epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.metric.better(value, self.patience_value, self.min_delta):
            self.patience_value, self.bad_epochs = value, 0
        else:  # (every epoch counts, warm-up included, for AdamW and MetaAdamW alike: the arms get one
            # rule; a MetaAdamW trial stopped before its first meta-update is named by the run and the report)
            self.bad_epochs += 1
            # (patience running out at the budget's last epoch saved no epoch: the budget ended the trial,
            # as max_steps wins over it; the cost table's "stopped early" counts trials ended before their budget)
            if (self.config["patience"] and self.bad_epochs >= self.config["patience"]
                    and self.stop_reason != "max_steps" and self.epoch < self.config["epochs"]):
                self.stop_reason = "early_stopping"

    def _result(self, status: str, error: str) -> TrialResult:
        cfg = self.config
        row: dict[str, Any] = {
            "trial_id": self.trial_id, "status": status, "error": error, **cfg,
            "data_source": self.task.data_source, "data_fingerprint": self.data_fingerprint,
            "metric": self.metric.name, "mode": self.metric.mode,
            "best_metric": self.best_value if self.best_state is not None else math.nan,
            "best_epoch": self.best_epoch, "epochs_run": len(self.history), "steps": self.step,
            "stop_reason": self.stop_reason, "time_total_s": sum(self.times.values()),
            "time_train_s": self.times["train"], "time_meta_s": self.times["meta"], "time_eval_s": self.times["eval"],
            "meta_every_steps": self.meta_every if self.is_meta else 0,
            "meta_updates": self.meta_updates,
            "meta_skipped": getattr(self.optimizer, "meta_skipped", 0),
            "resumed_from_epoch": self.resumed_from_epoch,
            "device_used": _device_used(self.device),  # (the config's device is the request: auto, cuda)
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            **self.provenance,
        }
        best_row = next((h for h in self.history if h["epoch"] == self.best_epoch), None)
        for m in self.spec.metrics:
            row[f"best_{m.name}"] = best_row[f"val_{m.name}"] if best_row else math.nan
        for k, v in self.task.reference.items():
            row[f"ref_{k}"] = v
        if self.test_loader is not None and status == "ok" and self.best_state is not None:
            for k, v in self._evaluate(self.test_loader).items():
                row[f"test_{k}"] = float(v)
        return TrialResult(row, list(self.history), list(self.telemetry))

    # -----------------------------------------------------------------------------------------
    # checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this trial stands (at an epoch boundary)."""
        return copy.deepcopy({
            "config": self.config, "trial_id": self.trial_id, "epoch": self.epoch, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": self._rng,
            "generators": {k: g.get_state() for k, g in self._gens.items()},
            "history": self.history, "telemetry": self.telemetry, "best_value": self.best_value,
            "best_epoch": self.best_epoch, "best_state": self.best_state, "bad_epochs": self.bad_epochs,
            "patience_value": self.patience_value,
            "times": self.times, "stop_reason": self.stop_reason, "error": self.error,
            "data_fingerprint": self.data_fingerprint,
        })

    def check_checkpoint(self, state: Any) -> None:
        """Raise :class:`UnusableCheckpoint` (:class:`StaleCheckpoint` for other data) where ``state`` is no
        checkpoint this trial can continue from; nothing is changed."""
        if not isinstance(state, dict):
            raise UnusableCheckpoint(f"not a trial checkpoint (a {type(state).__name__}, not a dict)")
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise UnusableCheckpoint(f"the checkpoint lacks {', '.join(missing)} (written by another version of ablate, "
                                     f"or not by ablate): start the trial afresh instead")
        if state["trial_id"] != self.trial_id:
            differ = _identity_differences(state.get("config") or {}, self.config)
            theirs = state.get("config") or {}
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {self.config.get(k)!r} here" for k in differ[:5])
            if differ or not theirs:
                why = f"their configs differ{': ' + shown if shown else ''}{', ...' if len(differ) > 5 else ''}"
            else:  # (the id sees more than the config: the version of the embedded data)
                data = identity_config(self.config)["data"]
                why = ("their configs are the same, but its id was made by another version of ablate"
                       + (f", on other embedded data than {data}" if data.startswith("embedded:") else ""))
            raise UnusableCheckpoint(f"checkpoint of trial {state['trial_id']} cannot resume trial {self.trial_id} "
                                     f"({why})")
        bad = _random_states_problem(state, self._gens)
        if bad:
            raise UnusableCheckpoint(f"the checkpoint of trial {self.trial_id} holds random states this trial cannot "
                                     f"take ({bad}; written by other code?): start the trial afresh instead")
        if not self.can_resume_from(state):
            raise StaleCheckpoint(f"the checkpoint of trial {self.trial_id} was made on other data files than its data "
                                  f"directory holds now (fingerprint {state['data_fingerprint']} then, "
                                  f"{self.data_fingerprint} now): start the trial afresh instead")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_checkpoint(state)
        state = copy.deepcopy(state)
        # the model's weights as they were, on the host (a copy on the device would double the model's memory
        # at every resume); the optimizers' own loads change nothing when they refuse (torch.optim's builds the
        # new state before it sets it, MetaAdamW's puts back what it changed)
        before = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:  # (a model or optimizer of other code, same config): the trial as it was
            self.model.load_state_dict(before)
            raise UnusableCheckpoint(f"the checkpoint of trial {self.trial_id} does not fit its model or optimizer "
                                     f"(written by other code? {type(exc).__name__}: {str(exc).strip()}): "
                                     f"start the trial afresh instead") from exc
        # (CUDA's states: a CUDA trial's own; one resumed on the CPU leaves CUDA alone, and one resumed on a
        # GPU from a CPU checkpoint keeps the CUDA stream its seed gave it)
        cuda = state["rng"].get("cuda") if self._cuda else None
        self._rng = {**state["rng"], "cuda": cuda if cuda is not None else self._rng["cuda"]}
        for k, g in self._gens.items():
            g.set_state(state["generators"][k])
        for key in ("epoch", "step", "history", "telemetry", "best_value", "best_epoch", "best_state",
                    "bad_epochs", "times", "stop_reason"):
            setattr(self, key, state[key])
        self.error = state.get("error", "")
        # (a checkpoint from before the best and the patience were told apart: they were one value)
        self.patience_value = state.get("patience_value", self.best_value)
        self.resumed_from_epoch = self.epoch

    def can_resume_from(self, state: dict[str, Any]) -> bool:
        """Whether a checkpoint was made on the data this trial reads (checkpoints written before
        fingerprints were kept are taken on trust)."""
        recorded = state.get("data_fingerprint")
        return recorded is None or recorded == self.data_fingerprint

    def checkpoint_bytes(self) -> bytes:
        """The checkpoint (:meth:`state_dict`) serialised, as :meth:`save` writes it."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically to ``path`` (a file)."""
        return atomic_write_bytes(path, self.checkpoint_bytes())

    def load(self, path: str | os.PathLike) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise UnusableCheckpoint(f"{path} is not a readable ablate trial checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or "trial_id" not in state:
            raise UnusableCheckpoint(f"{path} is not an ablate trial checkpoint (no trial_id in it)")
        self.load_state_dict(state)


def _random_states_problem(state: dict[str, Any], gens: dict[str, torch.Generator]) -> str:
    """What is wrong with a checkpoint's ``rng`` and ``generators`` entries (``""``: nothing), found by setting each
    state on a scratch generator (the trial's and the process's own are left alone): an entry that is not there, or
    not of the kind it should be, failed the trial with a bare KeyError after its model and optimizer were loaded."""
    rng, generators = state["rng"], state["generators"]
    try:
        if not isinstance(generators, dict):
            raise TypeError(f"generators is a {type(generators).__name__}, not a dict")
        missing = [k for k in gens if k not in generators]
        if missing:
            raise ValueError(f"generators lacks {', '.join(missing)}")
        for k in gens:
            torch.Generator().set_state(generators[k])
        if not isinstance(rng, dict):
            raise TypeError(f"rng is a {type(rng).__name__}, not a dict")
        missing = [k for k in ("python", "numpy", "torch") if k not in rng]
        if missing:
            raise ValueError(f"rng lacks {', '.join(missing)}")
        random.Random().setstate(rng["python"])
        np.random.RandomState().set_state(rng["numpy"])
        torch.Generator().set_state(rng["torch"])
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return ""


def _identity_differences(theirs: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """The keys of a trial's identity in which two configs differ: the common keys in their order
    (task, data, optimizer, seed, ... first), then the task's own keys; not the keys that may differ on
    resume (num_threads, device, ...), nor the MetaAdamW keys when either trial is an AdamW one."""
    from ablate.config import COMMON_FIELDS, METAADAMW_KEYS, NON_IDENTITY_KEYS

    skip = set(NON_IDENTITY_KEYS)
    if "adamw" in (theirs.get("optimizer"), mine.get("optimizer")):
        skip |= set(METAADAMW_KEYS)
    keys = [k for k in COMMON_FIELDS if k in theirs or k in mine]
    keys += sorted((set(theirs) | set(mine)) - set(keys))
    return [k for k in keys if k not in skip and theirs.get(k, None) != mine.get(k, None)]


def run_trial(config: dict[str, Any], *, callback: Callback | None = None, resume: str | os.PathLike | None = None,
              progress: bool = False) -> TrialResult:
    """Build and run one trial (resuming from the checkpoint file ``resume`` when given)."""
    trial = Trial(config)
    if resume is not None:
        trial.load(resume)
    return trial.run(callback, progress=progress)


def _batch_sizes(loader: DataLoader) -> Iterator[int]:
    """The examples in each batch of ``loader``, in order: its batch size, and the rest of the
    dataset in a last, partial batch. From the loader's batching, not from the batch's tensors,
    whose leading dimension need not be the examples (sequence-first ``(T, B)`` batches, a packed
    sequence, a list of strings before the tensors)."""
    size = loader.batch_size
    if size is None or loader.batch_sampler is None:  # (a loader without automatic batching: one example a batch)
        return itertools.repeat(1)
    try:
        n = len(loader.sampler)  # (the examples an epoch draws: a task's own sampler may draw other than all)
    except TypeError:  # (a sampler without a length: each batch counts alike)
        return itertools.repeat(1)
    if loader.drop_last:
        return itertools.repeat(size, n // size)
    return (min(size, n - start) for start in range(0, n, size))


def _limit(loader: DataLoader, n: int) -> Iterator:
    """The first ``n`` batches (without loading, and augmenting, an n+1-th to find the end)."""
    return itertools.islice(loader, n)


def _to_device(loader: DataLoader, device: torch.device) -> Iterator:
    """The loader with each batch moved to ``device`` (a re-iterable view for evaluate())."""
    if device.type == "cpu":
        return loader

    class _Moved:
        def __iter__(self):
            return (move_to_device(b, device) for b in loader)

        def __len__(self):
            return len(loader)

    return _Moved()
