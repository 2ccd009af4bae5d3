"""`metaadamw` must work with nothing but PyTorch: no NumPy, pandas, YAML, Ray, Optuna or ablate."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys

    BLOCKED = {"numpy", "pandas", "yaml", "ray", "optuna", "scipy", "sklearn", "ablate", "pyarrow"}
    for name in BLOCKED:  # None in sys.modules: `import name` fails, importlib.util.find_spec says absent
        sys.modules[name] = None
    import torch
    from metaadamw import MetaAdamW

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = MetaAdamW(model.named_parameters(), modulator_layers=1)
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    batch = (torch.randn(16, 4), torch.randn(16, 1))
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    record = opt.meta_step(model, loss_fn, batch, batch, batch)
    assert not record.skipped
    print("ok", sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCKED and mod is not None))
""")


def test_metaadamw_needs_only_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok []"
