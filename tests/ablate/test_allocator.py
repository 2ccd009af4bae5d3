"""ablate.allocator: large CPU blocks from the heap, freed memory kept (glibc), and the trial key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import ablate.trial
from ablate.allocator import glibc
from ablate.config import ConfigError, resolve_config, trial_id
from ablate.trial import Trial

# a child process: minor page faults of four steps that each touch a fresh 64 MiB tensor, with
# glibc's defaults and after keep_freed_memory(), each after ten steps in which the heap settles
# (small blocks land in freed space, so the heap grows by a few 64 MiB before it stops growing)
PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from ablate.allocator import keep_freed_memory

    def step():
        x = torch.empty(16 * 2**20)
        x.fill_(1.0)

    def faults_of_four_64_mib_steps():
        for _ in range(10):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    system = faults_of_four_64_mib_steps()
    applied = keep_freed_memory()
    kept = faults_of_four_64_mib_steps()
    print(json.dumps({"system": system, "applied": applied, "again": keep_freed_memory(), "kept": kept}))
""")


def _probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc() is None, reason="glibc only")
def test_keeping_freed_memory_removes_the_page_faults_of_large_blocks():
    r = _probe({})
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert r["applied"] and r["again"]
    assert r["system"] >= 4 * pages // 2  # glibc maps 64 MiB afresh each time: every page faults again
    assert r["kept"] < pages // 4  # from the heap, already faulted in


@pytest.mark.skipif(glibc() is None, reason="glibc only")
def test_a_users_own_glibc_malloc_tunables_win():
    r = _probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not r["applied"]
    assert r["kept"] >= 4 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE") // 2  # nothing changed


def test_cpu_malloc_is_validated_and_not_part_of_the_trial_identity():
    base = {"task": "etth1", "seed": 0}
    assert resolve_config(base)["cpu_malloc"] == "system"
    assert trial_id(resolve_config({**base, "cpu_malloc": "keep"})) == trial_id(resolve_config(base))
    with pytest.raises(ConfigError, match=r"cpu_malloc='jemalloc' is not allowed; choose one of: keep, system"):
        resolve_config({**base, "cpu_malloc": "jemalloc"})


@pytest.mark.parametrize("setting, calls", [("keep", 1), ("system", 0)])
def test_a_trial_applies_its_cpu_malloc_setting(monkeypatch, setting, calls):
    seen = []
    monkeypatch.setattr(ablate.trial, "keep_freed_memory", lambda: seen.append(1) or True)
    Trial({"task": "etth1", "seed": 0, "epochs": 1, "max_train_batches": 2, "num_threads": 1, "cpu_malloc": setting})
    assert len(seen) == calls
