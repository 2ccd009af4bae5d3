"""The benchmark scripts run: the GPU check (benchmarks/cuda_step.py) here on the CPU, so that a
session with a GPU for a few minutes finds it working, and the results-loading benchmark on a small study."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

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


def test_cuda_step_script_reports_a_failing_part_and_runs_the_others(cuda_step, monkeypatch, capsys):
    # a GPU session has minutes: one part that fails must not lose the others' figures
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available\nsecond line")

    monkeypatch.setattr(cuda_step, "bench_step", broken)
    monkeypatch.setattr(cuda_step, "MODELS", ("mlp10",))
    monkeypatch.setattr(cuda_step, "bench_encoder", lambda device, reps: {
        "eager_us": 1.0, "eager_ops": 184, "fused_us": 0.5, "fused_ops": 10, "fused_equals_eager": True,
        "fused_syncs": "none"})
    monkeypatch.setattr(cuda_step, "bench_meta", lambda name, device, reps: {
        "train_step_ms": 1.0, "meta_explicit_ms": 6.0, "meta_batch1_none_ms": 5.0, "meta_explicit_ratio": 6.0,
        "meta_batch1_none_ratio": 5.0})
    result = cuda_step.main(["--device", "cpu", "--quick"])
    captured = capsys.readouterr()
    assert result["step"]["mlp10"] == {"error": "RuntimeError: no kernel image is available"}
    assert result["encoder"]["fused_ops"] == 10 and result["meta"]["mlp10"]["meta_explicit_ratio"] == 6.0
    assert result["syncs"]["mlp10"] == "n/a (CPU)"
    assert json.loads(captured.out.strip().splitlines()[-1]) == result  # the last line is the JSON
    assert "mlp10     FAILED RuntimeError: no kernel image is available" in captured.err


def test_results_loading_script_compares_the_cached_load_with_parsing():
    pytest.importorskip("ablate")
    spec = importlib.util.spec_from_file_location("results_loading", ROOT / "benchmarks" / "results_loading.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--trials", "20"])  # (it checks that both loads give the same tables)
    assert result["trials"] == 20 and result["load_parsing_s"] > 0 and result["load_cached_s"] > 0


def test_memory_tracker_counts_a_storage_first_seen_empty_and_resized_in_place(monkeypatch):
    # benchmarks/memory.py re-reads a counted storage resized in place; one first seen empty (an out=
    # buffer, torch.empty(0).resize_) was taken for a known, uncounted storage and never counted
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_memory", memory)  # (its dataclass looks its module up)
    spec.loader.exec_module(memory)
    n = 1 << 18  # 1 MiB of float32

    def fn():
        a = torch.ones(n)
        out = torch.empty(0)
        torch.mul(a, 2, out=out)  # resized in place to 1 MiB
        grown = torch.empty(0)
        grown.resize_(n)
        return out, grown

    m = memory.measure_peak(fn)
    assert m.peak_bytes == 3 * n * 4
    assert m.end_bytes == 2 * n * 4  # (a is freed; out and grown are returned)
    assert m.new_peak_bytes == 3 * n * 4


def test_cuda_step_sync_check_does_not_report_a_failing_meta_update_as_a_synchronisation(cuda_step, monkeypatch):
    # check_syncs runs a meta-update between its checked steps, outside the sync debug mode; an error there was
    # returned as "SYNC: ...", which reads as step() synchronising with the host
    from metaadamw import MetaAdamW

    real = cuda_step.Workload
    modes = []
    monkeypatch.setattr(cuda_step, "Workload", lambda name, device: real(name, torch.device("cpu")))
    monkeypatch.setattr(cuda_step, "sync", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def failing_meta_step(*args, **kwargs):
        raise RuntimeError("the meta-update failed\nsecond line")

    monkeypatch.setattr(MetaAdamW, "meta_step", failing_meta_step)
    with pytest.raises(RuntimeError, match="the meta-update failed"):
        cuda_step.check_syncs("tiny10", torch.device("cuda"))
    assert modes == ["error", "default"]

    def syncing_step(self, closure=None):  # a step that synchronises is still reported as one
        raise RuntimeError("called a synchronizing CUDA operation\nsecond line")

    modes.clear()
    monkeypatch.setattr(MetaAdamW, "step", syncing_step)
    assert cuda_step.check_syncs("tiny10", torch.device("cuda")) == "SYNC: called a synchronizing CUDA operation"
    assert modes == ["error", "default"]


def test_results_loading_script_keeps_the_arms_of_the_trials_after_1pct_more(monkeypatch):
    # the "1% more trials" manifest labelled every trial arm0: the last load was not the study's
    pytest.importorskip("ablate")
    spec = importlib.util.spec_from_file_location("results_loading", ROOT / "benchmarks" / "results_loading.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loads = []
    real = module.load_results
    monkeypatch.setattr(module, "load_results", lambda out: loads.append(real(out)) or loads[-1])
    module.main(["--trials", "20"])
    trials = loads[-1].trials
    assert len(trials) == 21
    assert list(trials["arm"]) == [f"arm{int(t, 16) % 20}" for t in trials["trial_id"]]
    assert trials["arm"].nunique() == 20


def test_cuda_step_dry_run_message_does_not_deny_the_interleaving(cuda_step, monkeypatch, capsys):
    # bench_step and bench_meta interleave their rounds; the dry run's note said "without ... interleaving"
    monkeypatch.setattr(cuda_step, "MODELS", ())
    monkeypatch.setattr(cuda_step, "bench_encoder", lambda device, reps: {
        "eager_us": 1.0, "eager_ops": 184, "fused_us": 0.5, "fused_ops": 10, "fused_equals_eager": True,
        "fused_syncs": "n/a (CPU)"})
    cuda_step.main(["--device", "cpu", "--quick"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("(a dry run")]
    assert notes == ["(a dry run: wall-clock, without optimizer_overhead.py's allocator settings; the CPU figures of "
                     "record come from that script)"]


def test_optimizer_overhead_restart_follows_the_parsed_system_malloc_option(monkeypatch):
    # the restart looked for the literal "--system-malloc" in argv: an abbreviation argparse accepts
    # ("--system") still restarted with the allocator settings
    pytest.importorskip("metaadamw")
    spec = importlib.util.spec_from_file_location("optimizer_overhead", ROOT / "benchmarks" / "optimizer_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert module.restarts_with_tunables(["--quick"]) is True
    assert module.restarts_with_tunables(["--system"]) is False
    assert module.restarts_with_tunables(["--quick", "--system-malloc"]) is False
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert module.restarts_with_tunables(["--quick"]) is False
