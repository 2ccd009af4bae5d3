"""Helpers shared by the task tests (``test_task_*.py``).

* :data:`SHARED_DATA` - the real datasets, ``../shared/data`` next to the repository (the tests
  that use them skip where it is absent);
* :func:`task_config` - the resolved trial config of a task, as the trial runner passes it to the
  task's factory;
* :func:`train_with_adamw` - the few plain AdamW steps of the "embedded variant trains" tests;
* :func:`assert_second_order_gradients` - the second-order check of the text tasks' losses.

The one-intra-op-thread fixture these tests run under is ``one_thread`` in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from ablate.config import resolve_config
from ablate.tasks import TaskInstance

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def task_config(task: str, **overrides) -> dict:
    """The resolved trial config of ``task`` with ``overrides`` (see :func:`ablate.config.resolve_config`)."""
    return resolve_config({"task": task, **overrides})


def train_with_adamw(task: TaskInstance, batches: Iterable, lr: float = 1e-3, weight_decay: float = 1e-2) -> list[float]:
    """Put ``task.model`` in training mode and take one AdamW step on ``task.loss_fn`` per batch of
    ``batches``; returns the training losses. The model is left in training mode."""
    task.model.train()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for batch in batches:
        loss = task.loss_fn(task.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_second_order_gradients(task: TaskInstance, batch) -> None:
    """In training mode, the squared norm of the gradient of ``task.loss_fn`` on ``batch`` (taken
    with ``create_graph``, as MetaAdamW's meta-update does) back-propagates to every parameter of
    ``task.model``: each gets a finite ``.grad``, and not all of them are zero."""
    task.model.train()
    params = list(task.model.parameters())
    grads = torch.autograd.grad(task.loss_fn(task.model, batch), params, create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0
