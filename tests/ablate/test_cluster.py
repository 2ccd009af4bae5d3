"""Ray for a study (:mod:`ablate.cluster`): starting and joining it, the checks before any trial -
resources, a cluster's address, what each node sees - and SIGTERM ending a run at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ablate.study import load_study
from tests.ablate.study_helpers import tiny_study

pytestmark = pytest.mark.slow


def test_joining_a_cluster_no_node_of_which_fits_a_trial_says_so(tmp_path, monkeypatch, capsys):
    import ray

    from ablate.cluster import _warn_if_no_node_fits

    study = load_study(tiny_study(tmp_path, seeds=1, extra="resources: {cpus: 2}"))
    nodes = [{"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 1.0}},
             {"NodeID": "b" * 56, "Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    _warn_if_no_node_fits(study, "10.0.0.1:6379")
    err = capsys.readouterr().err
    assert err.startswith("ablate: warning: each trial asks for 2 CPUs on one node, which no node of the cluster at "
                          "10.0.0.1:6379 has (its nodes: 1 CPUs, 0 GPUs)"), err
    nodes.append({"NodeID": "c" * 56, "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}})
    _warn_if_no_node_fits(study, "10.0.0.1:6379")
    assert capsys.readouterr().err == ""
    # CPUs on one node and the GPU on another fit no trial that needs both (the check took each maximum alone)
    study = load_study(tiny_study(tmp_path, seeds=1, extra="resources: {cpus: 2, gpus: 1}"))
    nodes[:] = [{"NodeID": "d" * 56, "Alive": True, "Resources": {"CPU": 2.0}},
                {"NodeID": "e" * 56, "Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]
    _warn_if_no_node_fits(study, "10.0.0.1:6379")
    assert "asks for 2 CPUs and 1 GPUs on one node, which no node of the cluster at 10.0.0.1:6379 has (its nodes: " \
           "1 CPUs, 1 GPUs; 2 CPUs, 0 GPUs)" in capsys.readouterr().err


@pytest.mark.parametrize("reset_by_ray", [False, True])
def test_sigterm_ends_a_run_at_once_with_its_message_also_after_ray_shutdown(tmp_path, reset_by_ray):
    # ray.shutdown() resets SIGTERM's handling in the kernel while Python still reports the handler
    # installed: the handler is installed again after it (else SIGTERM killed the driver silently
    # while it combined the results); the bookkeeping (tune's unfinished suggestions marked FAIL)
    # runs before the exit
    marker = tmp_path / "bookkeeping"
    script = textwrap.dedent(f"""
        import ctypes, os, signal, time
        from ablate.cluster import exit_on_sigterm

        with exit_on_sigterm(lambda: "2 trial(s) did not finish", on_exit=lambda: open({str(marker)!r}, "w").close()) as rearm:
            if {reset_by_ray}:
                ctypes.CDLL(None).signal(signal.SIGTERM, 0)  # SIG_DFL in the C library, as ray.shutdown() leaves it
                rearm()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stdout + done.stderr
    assert done.stdout.strip() == "terminated (SIGTERM): 2 trial(s) did not finish" and marker.exists()


def test_a_local_cluster_starts_without_ray_s_token_authentication_warning(tmp_path):
    # Ray 2.5x starts a local cluster with token authentication and warned about it on every
    # `ablate run` ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
    spec = tiny_study(tmp_path)
    code = (f"import ray; from ablate.study import load_study; from ablate.cluster import init_ray; "
            f"assert init_ray(load_study({str(spec)!r}), num_cpus=1); import os; print(os.environ['RAY_AUTH_MODE']); "
            f"ray.shutdown()")  # (Ray sets RAY_AUTH_MODE=token itself when it turns authentication on)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # (an earlier in-process cluster sets it)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "token"  # (the mode Ray picks itself: still authenticated)
    assert "Token authentication" not in done.stderr, done.stderr[-3000:]


def test_the_cluster_check_names_the_nodes_without_the_storage_the_checkpoints_folder_or_the_data(tmp_path, monkeypatch,
                                                                                                  capsys, one_ray):
    # on a cluster whose nodes have disks of their own, every trial failed after its first epoch on a node that
    # did not see Ray Tune's storage (Ray's own message, at each attempt) or the data; checkpoints written to a
    # node's disk left --resume to start the trial again without a word
    import pathlib
    import socket

    import torch

    import ablate.cluster as cluster
    from ablate.cluster import check_cluster_nodes
    from ablate.config import ConfigError
    from ablate.provenance import code_fingerprint
    from ablate.tasks import DatasetNotFoundError

    study = load_study(tiny_study(tmp_path, seeds=1))
    folders = {"storage": tmp_path / "storage", "checkpoints": tmp_path / "out" / "checkpoints"}
    capsys.readouterr()  # (Ray's start)
    check_cluster_nodes(study, folders)  # this machine's one node sees them, and runs the driver's code
    assert capsys.readouterr().err == "" and not any(folders["storage"].iterdir()), "its markers are removed"
    node = f"{socket.gethostname()} ("
    with monkeypatch.context() as m:  # the driver made from other code than its node (whose answer is its own)
        m.setattr(cluster, "_code_view", lambda: "code 0123456789ab, torch 0.0")
        check_cluster_nodes(study, folders)
    err = capsys.readouterr().err
    assert (f"node(s) of the cluster run other code than this driver (code 0123456789ab, torch 0.0): {node}"
            in err and f"): code {code_fingerprint()}, torch {torch.__version__}. Their trials run that code" in err), err
    with monkeypatch.context() as m:  # `ablate tune` checks the nodes, and so does its AdamW reference's study
        m.setattr(cluster, "_code_view", lambda: "code 0123456789ab, torch 0.0")
        with cluster.node_warnings_once():
            check_cluster_nodes(study, folders)
            with cluster.node_warnings_once():  # (nested: the outer one's record)
                check_cluster_nodes(study, folders)
        assert capsys.readouterr().err.count("run other code than this driver") == 1
        check_cluster_nodes(study, folders)  # outside it, each check says it
        assert capsys.readouterr().err.count("run other code than this driver") == 1

    def older_node(markers, study, plugins, plugin_dir):  # (an ablate from before the nodes said their code)
        import os

        return {"missing": [k for k, m in markers.items() if not os.path.exists(m)], "plugins": None, "data": None}

    with monkeypatch.context() as m:
        m.setattr(cluster, "_node_view", older_node)
        check_cluster_nodes(study, folders)
    err = capsys.readouterr().err
    assert (f"run other code than this driver (code {code_fingerprint()}, torch {torch.__version__}): {node}" in err
            and "): an older ablate, which does not say. Their trials run that code" in err), err
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "touch", lambda self, *a, **k: None)  # the driver's marker files reach no node
        with pytest.raises(ConfigError, match=rf"Ray Tune's storage {re.escape(str(folders['storage']))} is not on "
                                              rf"node\(s\) {re.escape(node)}.*Give --storage a folder every node shares"):
            check_cluster_nodes(study, folders)
        check_cluster_nodes(study, {"checkpoints": folders["checkpoints"]})  # a warning: the trials can run
        assert f"{folders['checkpoints']} is not on node(s) {node}" in capsys.readouterr().err
        # a node that cannot hold a trial (this one: 1 CPU) runs none, and is not asked
        check_cluster_nodes(load_study(tiny_study(tmp_path, "big", seeds=1, extra="resources: {cpus: 2}")), folders)
        assert capsys.readouterr().err == ""
    real = load_study(tiny_study(tmp_path, "real", seeds=1, extra=f"data: real\n        data_dir: {tmp_path / 'none'}"))
    with pytest.raises(DatasetNotFoundError, match=rf"node\(s\) of the cluster cannot run the study's real-data trials, "
                                                   rf"which would fail there: {re.escape(node)}"
                                                   rf".*data directory {re.escape(str(tmp_path / 'none'))}") as error:
        check_cluster_nodes(real, folders)
    assert str(error.value).count("Nothing was run.") == 1
    import dataclasses
    with pytest.raises(ConfigError, match=rf"plugins do not import on node\(s\) of the cluster, where its trials would "
                                          rf"fail: {re.escape(node)}.*no_such_plugin_module"):
        check_cluster_nodes(dataclasses.replace(study, plugins=("no_such_plugin_module",)), {})


def test_a_study_run_in_a_ray_this_process_runs_already_is_checked_against_its_nodes(tmp_path, monkeypatch):
    # run_study uses a Ray the caller started (ray.init in a notebook): its check compared resources.cpus
    # with os.cpu_count(), so a trial that no node of that Ray can hold was accepted and Ray Tune waited forever
    import ray

    from ablate.config import ConfigError
    from ablate.sweep import run_study

    nodes = [{"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 1.0}}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    study = load_study(tiny_study(tmp_path, seeds=1, extra="resources: {cpus: 2}"))
    with pytest.raises(ConfigError, match=re.escape("each trial asks for 2 CPUs on one node, but the Ray this process "
                                                    "runs already has no such node (its nodes: 1 CPUs, 0 GPUs)")):
        run_study(study, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "refused before anything is written"
    from ablate.cluster import check_resources

    nodes.append({"NodeID": "b" * 56, "Alive": True, "Resources": {"CPU": 2.0}})
    check_resources(study)  # (a node that holds a trial: accepted)


def test_ray_started_here_gets_the_cpus_this_process_may_use_not_the_hosts(tmp_path, monkeypatch):
    # in a Slurm job, under taskset or in a container, os.cpu_count() is the host's: Ray started with it ran
    # one trial per host CPU on the few CPUs given, and resources.cpus beyond those were accepted
    import ray

    import ablate.cluster as cluster
    from ablate.config import ConfigError

    import ray._private.utils

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **kwargs: 64)  # (no container limit)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # (2 CPUs of the 64)
    study = load_study(tiny_study(tmp_path, seeds=1, extra="resources: {cpus: 4}"))
    with pytest.raises(ConfigError, match=re.escape("resources.cpus=4, but Ray runs here with 2 CPU(s)")):
        cluster.check_resources(study)
    asked = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: asked.update(kwargs))
    cluster.init_ray(study)
    assert asked["num_cpus"] == 2
    cluster.init_ray(study, num_cpus=3)  # (given: as given)
    assert asked["num_cpus"] == 3
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **kwargs: 1)  # a container limited to 1 CPU
    cluster.init_ray(study)
    assert asked["num_cpus"] == 1


def test_a_ray_client_address_and_a_version_mismatch_are_refused_in_one_line(monkeypatch):
    import ray

    from ablate.cluster import check_reachable, init_ray
    from ablate.config import ConfigError

    with pytest.raises(ConfigError, match=r"--address ray://10\.0\.0\.1:10001: Ray Client \(ray://\) is not supported"):
        check_reachable("ray://10.0.0.1:10001")
    mismatch = ("Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n    Python: 3.11.9\nThis process on "
                "node 10.0.0.2 was started with:\n    Ray: 2.60.0\n    Python: 3.11.9\n")

    def init(**kwargs):
        raise RuntimeError(mismatch)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ConfigError, match=r"(?s)the cluster runs other versions of Ray or Python than this driver, and every "
                                          r"node and the driver need the same: Version mismatch.*Ray: 2\.59\.0") as error:
        init_ray(load_study(tiny_study(Path(tempfile.mkdtemp()), seeds=1)), "10.0.0.1:6379")
    assert error.value.__cause__ is None  # (one message, no traceback chain)


SIGTERM_WITH_THE_LOCK_HELD = """\
import os, signal, sys, threading, time
import ablate.cluster as S
S.SIGTERM_BOOKKEEPING_S = 1.0
S._shutdown_ray_within = lambda seconds: open(sys.argv[1], "w").close()  # (Ray's shutdown: a marker here)
lock = threading.Lock()

def describe():  # needs a lock that the interrupted main thread holds (an Optuna journal's, say)
    with lock:
        return "never said"

if sys.argv[2] == "closed":
    os.close(1)  # (a pipe that the scheduler's signal closed first)
with S.exit_on_sigterm(describe, fallback="ablate run s.yaml --resume"):
    with lock:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
"""


@pytest.mark.parametrize("stdout", ["open", "closed"])
def test_the_sigterm_message_cannot_hang_the_exit_nor_skip_rays_shutdown(tmp_path, stdout):
    # the handler runs on the main thread, which the signal may have cut off holding a lock the message needs:
    # made there, it waited for ever (a scheduler's SIGKILL then ended the run without a word, Ray's agents left
    # running); a message that could not be printed skipped Ray's shutdown
    marker = tmp_path / "ray-shut-down"
    done = subprocess.run([sys.executable, "-c", SIGTERM_WITH_THE_LOCK_HELD, str(marker), stdout], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 143 and marker.exists(), done.stdout + done.stderr
    if stdout == "open":
        assert done.stdout.strip() == ("terminated (SIGTERM): what finished is stored (this message could not say more: "
                                       "it took more than 1 s); continue with: ablate run s.yaml --resume")


def test_the_cluster_check_names_a_node_that_does_not_answer_or_dies_and_goes_on(tmp_path, monkeypatch, capsys, one_ray):
    import time

    import ray

    import ablate.cluster as cluster

    def slow(*args):  # (a node busy with other work, or stopped)
        import time

        time.sleep(60)

    study = load_study(tiny_study(tmp_path, seeds=1))
    monkeypatch.setattr(cluster, "_node_view", slow)
    monkeypatch.setattr(cluster, "NODE_CHECK_S", 3.0)
    capsys.readouterr()
    start = time.monotonic()
    cluster.check_cluster_nodes(study, {"checkpoints": tmp_path / "checkpoints"})
    assert time.monotonic() - start < 15
    assert "(no answer within 3 s) not checked for what their trials need" in capsys.readouterr().err
    alive = ray.nodes
    calls = []

    def dying():  # the node is reported dead once the check is sent
        calls.append(1)
        return [dict(n, Alive=len(calls) == 1) for n in alive()]

    monkeypatch.setattr(ray, "nodes", dying)
    monkeypatch.setattr(cluster, "NODE_CHECK_S", 60.0)
    start = time.monotonic()
    cluster.check_cluster_nodes(study, {"checkpoints": tmp_path / "checkpoints"})
    assert time.monotonic() - start < 15
    assert "(died) not checked for what their trials need" in capsys.readouterr().err
    assert not list((tmp_path / "checkpoints").iterdir()), "the marker files are removed"


@pytest.mark.parametrize("address", ["127.0.0.1", "headnode"])
def test_an_address_without_its_port_is_refused_in_one_line(address):
    # (Ray's own answer to it is a traceback: "ValueError: Invalid address format")
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    with pytest.raises(ConfigError, match=rf"--address '{address}': expected HOST:PORT of the Ray head \(e\.g\. "
                                          rf"{address}:6379"):
        check_reachable(address)
    check_reachable("auto")  # (left to Ray)


@pytest.mark.parametrize("address", ["::1:6379", "fe80::1"])
def test_an_ipv6_address_without_brackets_is_refused_with_the_brackets_to_write(address):
    # (it was probed - "nothing answers there", or passed where something answered - and Ray refused it with a
    # traceback, "ValueError: Invalid address format": Ray reads an IPv6 host only as [ADDRESS]:PORT)
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    with pytest.raises(ConfigError, match=rf"--address '{address}': an IPv6 address goes in brackets before the port, "
                                          r"as Ray reads it: \[ADDRESS\]:PORT \(e\.g\. \[fe80::1\]:6379\), or auto"):
        check_reachable(address, timeout_s=1.0)


def test_a_dashboard_address_is_refused_in_one_line():
    # (Ray hands any scheme to a Ray Client builder: a traceback blaming RAY_ADDRESS)
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    with pytest.raises(ConfigError, match=r"--address http://10\.0\.0\.1:8265: expected HOST:PORT of the Ray head's GCS"):
        check_reachable("http://10.0.0.1:8265")


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_the_cluster_check_names_gpu_nodes_whose_torch_is_built_without_cuda(tmp_path, monkeypatch, capsys, one_ray,
                                                                          device):
    # nodes with GPUs but a CPU-only torch: every device: cuda trial failed there one by one (device: auto
    # trials trained on the CPU, each holding a GPU) although the nodes were checked before any trial
    import dataclasses
    import socket

    import ablate.cluster as cluster
    from ablate.cluster import check_cluster_nodes
    from ablate.config import ConfigError

    (tmp_path / "gpu.yaml").write_text(f"name: gpu\ntasks: [etth1]\nseeds: 1\nbudget: {{epochs: 1, device: {device}}}\n"
                                       f"resources: {{cpus: 1, gpus: 1}}\n")
    study = load_study(tmp_path / "gpu.yaml")
    holding = cluster._trial_nodes
    monkeypatch.setattr(cluster, "_trial_nodes",  # (this machine's node stands for a GPU node)
                        lambda s: holding(dataclasses.replace(s, resources={"cpus": 1, "gpus": 0})))
    view = cluster._node_view
    monkeypatch.setattr(cluster, "_node_view", lambda *a: {**view(*a), "gpu_build": False})
    node = f"{socket.gethostname()} ("
    capsys.readouterr()
    if device == "cuda":
        with pytest.raises(ConfigError, match=rf"each trial holds 1 GPU\(s\), but torch on node\(s\) {re.escape(node)}.*"
                                              rf"is built without CUDA.*run on device: cuda and would fail there"):
            check_cluster_nodes(study, {})
    else:
        check_cluster_nodes(study, {})
        err = capsys.readouterr().err
        assert f"but torch on node(s) {node}" in err and "trials there train on the CPU while each holds a GPU" in err, err
    monkeypatch.setattr(cluster, "_node_view", lambda *a: {**view(*a), "gpu_build": True})
    check_cluster_nodes(study, {})  # a CUDA build: nothing to say
    assert "built without CUDA" not in capsys.readouterr().err


def _listener(answer: bytes | None):
    """A TCP server on a free port of 127.0.0.1 that accepts connections and sends ``answer`` to each
    once it has read something (None: it stays silent); returns (port, stop)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    held = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            if answer is not None:
                conn.recv(64)
                conn.sendall(answer)
        for conn in held:
            conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], stop.set


@pytest.mark.parametrize("answer", [None, b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_an_address_where_something_else_than_a_ray_gcs_listens_is_refused_at_once(monkeypatch, answer):
    # (a head's other port - the dashboard's 8265, ssh's 22 -, or a silent listener: the TCP check passed and
    # ray.init retried there for a quarter of an hour, printing Ray's warnings)
    import time

    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    port, stop = _listener(answer)
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError) as error:
            check_reachable(f"127.0.0.1:{port}", timeout_s=1.0)
        assert time.monotonic() - start < 5
        said = "no gRPC answer within 1 s" if answer is None else f"it answered {answer[:9]!r}"
        assert str(error.value) == (
            f"--address 127.0.0.1:{port}: something listens there, but not a Ray head's GCS ({said}): give the port "
            f"`ray start --head` printed (the GCS's, 6379 by default; not the dashboard's 8265 nor the Ray Client's "
            f"10001). Nothing was run.")
        monkeypatch.setenv("RAY_USE_TLS", "1")  # (a TLS GCS answers no plain HTTP/2: not probed)
        check_reachable(f"127.0.0.1:{port}", timeout_s=1.0)
    finally:
        stop()


def test_an_address_answering_as_a_grpc_server_passes_the_check(monkeypatch, one_ray):
    import ray

    from ablate.cluster import check_reachable

    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    port, stop = _listener(bytes([0, 0, 0x18, 4, 0, 0, 0, 0, 0]))  # (a SETTINGS frame, as a Ray 2.60 GCS answers)
    try:
        check_reachable(f"127.0.0.1:{port}", timeout_s=5.0)
    finally:
        stop()
    check_reachable(ray.get_runtime_context().gcs_address, timeout_s=5.0)  # (a real GCS: Ray's own, started here)


def test_address_auto_is_checked_as_the_ray_address_it_stands_for(monkeypatch):
    # Ray reads `--address auto` as $RAY_ADDRESS: unchecked, an unreachable one hung `ablate run` for minutes, and a
    # ray:// one ended in a traceback ("Ray Client requires pip package `ray[client]`")
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    with pytest.raises(ConfigError, match=r"^--address auto, from \$RAY_ADDRESS, ray://10\.0\.0\.1:10001: Ray Client "
                                          r"\(ray://\) is not supported"):
        check_reachable("auto")
    port, stop = _listener(None)
    stop()  # (a port nothing listens on any more)
    import time

    time.sleep(0.5)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"^--address auto, from \$RAY_ADDRESS, 127\.0\.0\.1:{port}: nothing answers "
                                          rf"there \(ConnectionRefusedError"):
        check_reachable("auto", timeout_s=1.0)
    for unset in ("", "auto", "local"):  # (no address to check: left to Ray, as before)
        monkeypatch.setenv("RAY_ADDRESS", unset)
        check_reachable("auto")


def test_a_cluster_ray_cannot_join_is_refused_in_one_line(monkeypatch):
    # (a gRPC server that is not a GCS - the sandbox's proxy, a Ray Client port -, or `auto` finding no Ray: Ray's
    # ConnectionError reached the user as a traceback, exit code 1)
    import ray

    from ablate.cluster import init_ray
    from ablate.config import ConfigError

    def init(**kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.RpcError: RPC error: Received http2 header with status: 404")
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ConfigError) as error:
        init_ray(load_study(tiny_study(Path(tempfile.mkdtemp()), seeds=1)), "10.0.0.1:6379")
    assert str(error.value) == (
        "--address 10.0.0.1:6379: Ray could not join a cluster there (Failed to connect to Ray cluster at "
        "10.0.0.1:6379: ray.exceptions.RpcError: RPC error: Received http2 header with status: 404). Give the address "
        "`ray start --head` printed (HEAD_IP:6379, the GCS's port), with the head running. Nothing was run.")
    assert error.value.__cause__ is None


def test_ray_address_in_the_environment_without_address_is_said_to_be_unused(monkeypatch, capsys):
    # (`ray job submit` and Ray's docs set RAY_ADDRESS; ablate without --address starts its own Ray here, as it
    # should, but said nothing: the trials ran on one machine, the cluster idle)
    import ray

    from ablate.cluster import init_ray

    asked = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: asked.update(kwargs))
    study = load_study(tiny_study(Path(tempfile.mkdtemp()), seeds=1))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert init_ray(study, num_cpus=1) and asked["address"] == "local"
    assert capsys.readouterr().err == (
        "ablate: note: RAY_ADDRESS=10.0.0.1:6379 is set, but without --address ablate runs its trials on a Ray it "
        "starts on this machine; give --address auto (or --address 10.0.0.1:6379) to run them on that cluster\n")
    monkeypatch.delenv("RAY_ADDRESS")
    assert init_ray(study, num_cpus=1) and asked["address"] == "local"
    assert capsys.readouterr().err == ""


def _piecewise_listener(pieces: list[tuple[float, bytes]]):
    """A TCP server on a free port of 127.0.0.1 that accepts one connection, reads the client's
    first bytes, then sends each ``(delay_s, data)`` of ``pieces`` after its delay, and closes;
    returns (port, stop)."""
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            for delay, data in pieces:
                time.sleep(delay)
                conn.sendall(data)
            stop.wait(5)
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], stop.set


def test_a_grpc_answer_that_comes_in_pieces_passes_the_check_and_a_closed_connection_is_said_so(monkeypatch):
    # (TCP may hand the GCS's SETTINGS frame over in pieces: one recv(9) read its first 2 bytes, and a real Ray head
    # was refused as "not a Ray head's GCS (it answered b'\x00\x00')")
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    settings = bytes([0, 0, 0x18, 4, 0, 0, 0, 0, 0])
    for pieces in ([(0, settings[:2]), (0.3, settings[2:])], [(0, settings[:4]), (0.2, settings[4:7]), (0.2, b"\0\0")],
                   [(0.5, settings)]):
        port, stop = _piecewise_listener(pieces)
        try:
            check_reachable(f"127.0.0.1:{port}", timeout_s=3.0)
        finally:
            stop()
    port, stop = _piecewise_listener([(0.2, b"SSH-2.0"), (0.2, b"-OpenSSH_9.6\r\n")])  # (pieces of no gRPC answer)
    try:
        with pytest.raises(ConfigError, match=r"\(it answered b'SSH-2\.0-O'\)"):
            check_reachable(f"127.0.0.1:{port}", timeout_s=3.0)
    finally:
        stop()
    port, stop = _piecewise_listener([])  # (reads the preface and closes: no timeout was waited for)
    stop()
    with pytest.raises(ConfigError) as error:
        check_reachable(f"127.0.0.1:{port}", timeout_s=3.0)
    assert str(error.value) == (
        f"--address 127.0.0.1:{port}: something listens there, but not a Ray head's GCS (it closed the connection "
        f"without a gRPC answer): give the port `ray start --head` printed (the GCS's, 6379 by default; not the "
        f"dashboard's 8265 nor the Ray Client's 10001). Nothing was run.")


@pytest.mark.parametrize("given", ["http://127.0.0.1:8265", "ray://10.0.0.1:10001"])
def test_the_ray_address_note_does_not_advise_an_address_that_is_refused(monkeypatch, capsys, given):
    # (Ray's docs export RAY_ADDRESS=http://HEAD:8265 for `ray job submit`: the note advised --address auto or
    # --address http://HEAD:8265, both refused by check_reachable as no HOST:PORT of a GCS)
    import ray

    from ablate.cluster import check_reachable, init_ray
    from ablate.config import ConfigError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setenv("RAY_ADDRESS", given)
    assert init_ray(load_study(tiny_study(Path(tempfile.mkdtemp()), seeds=1)), num_cpus=1)
    assert capsys.readouterr().err == (
        f"ablate: note: RAY_ADDRESS={given} is set, but without --address ablate runs its trials on a Ray it starts on "
        f"this machine; to run them on that cluster, run ablate on one of its nodes with --address HEAD_IP:6379 (the "
        f"head's GCS port; a ray:// or http:// address is Ray Client's or the dashboard's, which ablate does not join)\n")
    for refused in ("auto", given):  # (what the note said before)
        with pytest.raises(ConfigError):
            check_reachable(refused)


@pytest.mark.parametrize("beyond", [0, 65536])
def test_a_port_out_of_range_is_refused_not_probed_modulo_65536(monkeypatch, beyond):
    # (port+65536 reached the listener on port: a GCS there passed the check, and Ray was given a port that is none)
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    port, stop = _listener(bytes([0, 0, 0x18, 4, 0, 0, 0, 0, 0]))  # (answers as a GCS)
    try:
        given = f"127.0.0.1:{port + beyond}"
        if not beyond:
            check_reachable(given, timeout_s=5.0)
            return
        with pytest.raises(ConfigError) as error:
            check_reachable(given, timeout_s=5.0)
        assert str(error.value) == (f"--address '{given}': port {port + beyond} is no TCP port (1 to 65535): give the "
                                    f"port `ray start --head` printed (6379 by default)")
    finally:
        stop()
    with pytest.raises(ConfigError, match=r"port 0 is no TCP port"):
        check_reachable("127.0.0.1:0")


def test_a_port_of_other_digits_than_ascii_ones_is_refused_as_not_host_port():
    # ("²".isdigit() is True, int("²") raises: a raw ValueError instead of the address advice)
    from ablate.cluster import check_reachable
    from ablate.config import ConfigError

    with pytest.raises(ConfigError, match=r"'127\.0\.0\.1:²': expected HOST:PORT of the Ray head"):
        check_reachable("127.0.0.1:²")
