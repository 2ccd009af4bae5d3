"""The GPU check script (benchmarks/cuda_step.py) runs, here on the CPU, so that a session with a
GPU for a few minutes finds it working."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda_step():
    pytest.importorskip("ablate")  # the benchmarks' ResNet-18 comes from ablate's models
    spec = importlib.util.spec_from_file_location("cuda_step", ROOT / "benchmarks" / "cuda_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_step_script_measures_on_the_cpu(cuda_step):
    cpu = torch.device("cpu")
    step = cuda_step.bench_step("mlp10", cpu, rounds=1, block_s=0.001)
    assert step["MetaAdamW_us"] > 0 and step["AdamW foreach_us"] > 0
    assert step["ratio_vs_foreach"] == pytest.approx(step["MetaAdamW_us"] / step["AdamW foreach_us"])
    # MetaAdamW does AdamW's passes plus norms, statistics and the encoder: more operations
    assert step["ops_MetaAdamW"] > step["ops_AdamW_foreach"] > 0
    assert step["launches_MetaAdamW"] is None and step["groups"] == 6
    enc = cuda_step.bench_encoder(cpu, reps=1)
    assert enc["fused_equals_eager"] and enc["layers"] == 8
    assert enc["eager_ops"] > enc["fused_ops"] >= enc["layers"]
    meta = cuda_step.bench_meta("mlp10", cpu, reps=1)
    assert meta["meta_explicit_ratio"] > 1 and meta["meta_batch1_none_ratio"] > 1
    assert cuda_step.check_syncs("mlp10", cpu) == "n/a (CPU)"
