"""Helpers shared by the tests of ``ablate run`` and the Ray cluster code (``test_sweep.py``,
``test_cluster.py``): :func:`tiny_study`, a study file of a few short etth1 trials on the
embedded data. The ``one_ray`` fixture (one in-process Ray for a test's runs) is in ``conftest.py``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def tiny_study(tmp_path: Path, name: str = "tiny", *, seeds: int = 2, epochs: int = 2, batches: int = 4,
               ablation: str = "objective: [loss_decrease]", extra: str = "") -> Path:
    """A study file ``tmp_path/<name>.yaml``: etth1, ``seeds`` seeds, ``epochs`` epochs of ``batches``
    batches, the baseline with a one-layer modulator meta-updating every 2 steps, and ``ablation``;
    ``extra``: more top-level keys."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        tasks: [etth1]
        seeds: {seeds}
        budget: {{epochs: {epochs}, max_train_batches: {batches}, patience: 0}}
        baseline: {{meta_every: 2, modulator_layers: 1}}
        ablations:
          {ablation}
        {extra}
        """))
    return path
