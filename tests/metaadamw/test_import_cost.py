"""What importing metaadamw costs: nothing a program that never steps needs (torch._dynamo)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import torch

from metaadamw import MetaAdamW


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_importing_metaadamw_does_not_import_dynamo_and_making_an_optimizer_does():
    # torch.compiler.disable, applied when metaadamw was imported, imported torch._dynamo: about a second at every
    # `import metaadamw`, and so at every `ablate list` / `ablate report` / study parse, which never step
    out = _run("import sys, torch, metaadamw; print('torch._dynamo' in sys.modules); "
               "from metaadamw import optimizer; print(optimizer._EAGER_STEP is None); "
               "metaadamw.MetaAdamW([torch.nn.Parameter(torch.zeros(2))], grouping='original'); "
               "print('torch._dynamo' in sys.modules, optimizer._EAGER_STEP is not None)")
    assert out.splitlines() == ["False", "True", "True True"]


def test_an_optimizer_unpickled_in_a_fresh_process_prepares_the_compiled_step_path():
    # the wrapper a compiled step calls is made by __init__; an optimizer unpickled where none was made has it too
    opt = MetaAdamW([torch.nn.Parameter(torch.zeros(2))], grouping='original')
    blob = pickle.dumps(opt).hex()
    out = _run(f"import pickle; from metaadamw import optimizer; assert optimizer._EAGER_STEP is None; "
               f"pickle.loads(bytes.fromhex({blob!r})); print(optimizer._EAGER_STEP is not None)")
    assert out == "True"
