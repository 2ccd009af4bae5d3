"""Pieces shared by the fault-tolerance tests and ``benchmarks/fault_injection.py``: the same
faults, injected the same way, so the benchmark measures what the tests prove."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from ablate.results import PARTS_DIR

OBJECT_STORE = 80 * 1024**2  # per node; Ray's minimum is 75 MiB


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def node_loss_study(path: Path, epochs: int) -> Path:
    """Two etth1 trials of ``epochs`` epochs on 1-CPU workers, two retries: one node is killed."""
    return write(path, f"""\
        name: nodeloss
        tasks: [etth1]
        seeds: 2
        resources: {{cpus: 1}}
        retries: 2
        budget: {{epochs: {epochs}, max_train_batches: 12, patience: 0}}
        baseline: {{meta_every: 4, modulator_layers: 1}}
        """)


def divergence_study(path: Path, task: str) -> Path:
    """The NaN-validation task ``task`` (a plugin next to ``path``, see :func:`nanval_plugin`) with
    arms that diverge: lr=300 with weight decay 1e-2 multiplies the weights by 1 - 300 * 1e-2 = -2 at
    every AdamW step, so the loss overflows in the second epoch; lr=1000 overflows in the first."""
    return write(path, f"""\
        name: diverge
        tasks: [{task}]
        seeds: 1
        plugins: [{task}]
        budget: {{epochs: 4, patience: 0}}
        adamw: {{lr: 300.0}}
        baseline: {{meta_every: 4, modulator_layers: 1}}
        ablations:
          objective: [loss_decrease]
          lr: [1000.0]
        """)


def kill_during_write_study(path: Path) -> Path:
    """Three short etth1 trials, whose result writes a killer script interrupts."""
    return write(path, """\
        name: killwrite
        tasks: [etth1]
        seeds: 1
        budget: {epochs: 2, max_train_batches: 4, patience: 0}
        baseline: {meta_every: 2, modulator_layers: 1}
        ablations:
          objective: [loss_decrease]
        """)


def done_ids(out: Path) -> set[str]:
    """Ids of the trials whose row is on disk."""
    parts = out / PARTS_DIR
    return {p.name.split(".")[0] for p in parts.glob("*.trials.parquet")} if parts.exists() else set()


def checkpoint_epoch(out: Path, trial_id: str) -> int:
    return int(torch.load(out / "checkpoints" / f"{trial_id}.pt", map_location="cpu", weights_only=False)["epoch"])


_NANVAL = """\
    '''A tiny regression task whose validation split has a NaN target every 21st example: a
    meta-update's validation batch then often holds one (a non-finite meta-objective), while
    the evaluation skips them (the metrics stay finite).'''
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import TensorDataset

    from ablate.tasks import TaskInstance, register_task


    def _data(n, seed, nan_every=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=g)
        y = x @ torch.tensor([0.5, -1.0, 2.0, 0.3]) + 0.1 * torch.randn(n, generator=g)
        if nan_every:
            y[::nan_every] = float("nan")
        return TensorDataset(x, y)


    def loss_fn(model, batch):
        x, y = batch
        return F.mse_loss(model(x).squeeze(-1), y)


    def evaluate(model, loader):
        model.eval()
        se, n = 0.0, 0
        with torch.no_grad():
            for x, y in loader:
                ok = torch.isfinite(y)
                se += float((model(x).squeeze(-1)[ok] - y[ok]).pow(2).sum())
                n += int(ok.sum())
        model.train()
        return {{"mse": se / n}}


    @register_task("{name}", metrics=[("mse", "min")],
                   defaults={{"epochs": 4, "batch_size": 16, "meta_every": 4, "modulator_layers": 1, "hidden": 16}})
    def {name}(config):
        '''Regression with NaN validation targets (fault tolerance).'''
        torch.manual_seed(config["seed"])
        model = nn.Sequential(nn.Linear(4, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 1))
        return TaskInstance(name="{name}", model=model, train=_data(256, 1), val=_data(64, 2, nan_every=21),
                            loss_fn=loss_fn, evaluate=evaluate, data_source="embedded:synthetic-nanval")
    """


def nanval_plugin(name: str) -> str:
    """Source of a plugin module registering task ``name``: a tiny regression whose validation
    split has a NaN target every 21st example."""
    return _NANVAL.format(name=name)


_WRITE_FAULT = """\
    import errno, io, os, sys
    from pathlib import Path
    import pandas as pd

    AT = int(os.environ["{env}"])
    original = pd.DataFrame.to_parquet
    seen = [0]

    def to_parquet(self, path, *args, **kwargs):
        p = Path(str(path))
        if p.parent.name == "parts" and ".trials.parquet." in p.name:
            seen[0] += 1
            if seen[0] == AT:
{fault}
        return original(self, path, *args, **kwargs)

    pd.DataFrame.to_parquet = to_parquet
    from ablate.cli import main
    sys.exit(main(sys.argv[1:]))
    """

_KILL = """\
                # the driver dies half-way through this trial's row
                buf = io.BytesIO()
                original(self, buf, *args, **kwargs)
                data = buf.getvalue()
                with open(p, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os._exit(137)"""

_FULL = """\
                # the disk is full when this trial's row is written
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(p))"""


def disk_full_script(env: str) -> str:
    """Source of a wrapper around ``ablate.cli`` whose N-th trial row write fails as on a full disk,
    N read from the environment variable ``env``."""
    return _WRITE_FAULT.format(env=env, fault=_FULL)


def killer_script(env: str) -> str:
    """Source of a wrapper around ``ablate.cli`` that dies (exit 137) half-way through writing the
    N-th trial row, N read from the environment variable ``env``."""
    return _WRITE_FAULT.format(env=env, fault=_KILL)
