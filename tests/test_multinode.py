"""Conversions on a Ray cluster of several nodes, all on this machine (``ray.cluster_utils.Cluster``:
a head and worker nodes as separate raylets with their own node ids). What each test asserts comes
from what the run records: the teacher replicas' placement in teacher_service.json (the replica's
node, and the bytes it served to each requesting node) and the train log.

Nodes: a head with no CPUs (the driver and Ray Train's controller live there, as on cluster/aws.yaml)
and two 2-CPU worker nodes. A training worker takes 1.5 CPUs, so Ray Train's PACK placement puts one
worker on each node, and each node keeps 0.5 CPU for its teacher replica. The cluster is started and
stopped by its own processes (``Cluster.shutdown``), never by ``ray stop``.
"""

from __future__ import annotations

import json
import time

import pytest
import ray
import torch

from conftest import discarded_steps, losses_of, run_config, steps_logged
from raylin.bench.cluster import local_cluster
from raylin.bench.recovery import remove_node_when_stalled, served_nodes
from raylin.train.trainer import TEACHER_STATS, fit

pytestmark = pytest.mark.multinode

NODE = {"num_cpus": 2, "object_store_memory": 200 * 1024 ** 2}
PER_NODE = {"train.cpus_per_worker": 1.5, "teacher_service.cpus": 0.5}


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2, cpus=NODE["num_cpus"], object_store_bytes=NODE["object_store_memory"]) as cluster:
        yield cluster


def worker_nodes() -> set[str]:
    """The node ids of the alive nodes that can hold a training worker."""
    return {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1.5}


def placement(out) -> list[dict]:
    return json.loads((out / TEACHER_STATS).read_text())["replicas"]


def test_fixed_teacher_is_served_node_locally(teachers, cluster, tmp_path):
    """Two workers on two nodes: one replica per node, each serving only its own node's worker."""
    result = fit(run_config(teachers, tmp_path / "run", **PER_NODE))
    assert result.error is None
    replicas = placement(tmp_path / "run")
    nodes = worker_nodes()
    assert len(nodes) == 2
    assert {replica["node_id"] for replica in replicas} == nodes  # exactly one replica on each worker node
    assert len(replicas) == 2
    for replica in replicas:
        # Every byte a replica served went to a worker on its own node: no activation crossed nodes.
        assert set(replica["served"]) == {replica["node_id"]}
        assert replica["served"][replica["node_id"]]["bytes"] == replica["transfer_bytes"] > 0
        assert replica["served"][replica["node_id"]]["requests"] == 12  # one request per step per worker
        assert replica["forwards"] > 0
        # What `raylin bench cluster` extrapolates by: bf16 states x hidden per served position, and
        # per-example logits (12 requests of 4 rows, 2 labels). Tiny teacher: 2 layers, width 32.
        served = replica["served"][replica["node_id"]]
        assert served["bytes"] == served["positions"] * (2 + 1) * 32 * 2 + 12 * 4 * 2 * 2


@pytest.mark.slow
def test_trajectory_teacher_keeps_one_replica_and_says_where(teachers, cluster, tmp_path):
    guidance = {"mode": "trajectory", "teacher_update_every": 2, "teacher_lr": 1e-3}
    result = fit(run_config(teachers, tmp_path / "run", guidance=guidance, **PER_NODE))
    assert result.error is None
    (replica,) = placement(tmp_path / "run")  # one replica for the whole run: it trains on the global batch
    assert replica["node_id"] in worker_nodes()
    assert set(replica["served"]) == worker_nodes()  # both workers' nodes asked it
    assert all(counts["requests"] == 12 for counts in replica["served"].values())


@pytest.mark.slow
def test_align_tasks_spread_over_the_nodes_and_read_their_own_replica(teachers, cluster, tmp_path):
    """Two block tasks small enough to share a node still land on two, each served node-locally."""
    from raylin.train.align import run_align

    config = run_config(teachers, tmp_path / "aligned", align={"enabled": True, "steps": 5, "num_workers": 2},
                        **{"train.cpus_per_worker": 0.5, "teacher_service.cpus": 0.5})
    replicas = run_align(config)["teacher"]["replicas"]
    assert len(replicas) == 2 and {replica["node_id"] for replica in replicas} <= worker_nodes()
    for replica in replicas:
        assert set(replica["served"]) == {replica["node_id"]}
        assert replica["served"][replica["node_id"]]["requests"] == 5 + 2  # its steps, and the held-out batch before and after


@pytest.mark.slow
def test_tune_trials_on_different_nodes_share_one_replica_per_node_and_the_cache(teachers, cluster, tmp_path):
    """Three one-worker trials, two at a time: the first two land on the two nodes, each served by
    its own node's replica of the sweep's one pool; the third runs once a slot frees and reads every
    example from the activation cache the first two wrote (one folder: these nodes share a disk)."""
    import yaml

    from raylin.tune.search import run_sweep

    data = run_config(teachers, tmp_path / "sweep", **PER_NODE).to_dict()
    data["data"] |= {"max_train_examples": 48}  # 6 steps x batch 8: every trial sees each example once
    data["train"] |= {"num_workers": 1, "max_steps": 6, "checkpoint_every": 6}
    data["teacher_service"] |= {"cache": True, "cache_dir": str(tmp_path / "cache")}
    data["tune"] = {"metric": "loss", "mode": "min", "scheduler": "fifo",
                    "space": {"loss.alpha_layer": {"grid": [0.5, 1.0, 2.0]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = run_sweep(path)
    assert summary["trials"] == 3 and summary["stopped_early"] == 0
    stats = json.loads((tmp_path / "sweep" / "tune" / TEACHER_STATS).read_text())
    replicas = stats["replicas"]
    assert {replica["node_id"] for replica in replicas} == worker_nodes()  # one replica on each node
    assert len(replicas) == 2 and stats["teacher_loads"] == 2  # once per node, not once per trial
    for replica in replicas:
        assert set(replica["served"]) == {replica["node_id"]}  # trials on both nodes, each served locally
    assert sum(replica["served"][replica["node_id"]]["requests"] for replica in replicas) == 3 * 6
    examples = 3 * 48
    assert stats["cache_hits"] + stats["cache_misses"] == examples
    assert stats["cache_hits"] >= 48  # the third trial ran no teacher forward of its own
    assert stats["examples_forwarded"] == stats["cache_misses"] <= 2 * 48


@pytest.mark.slow
def test_a_lost_worker_node_resumes_from_shared_storage_and_ends_as_the_uninterrupted_run(
        teachers, cluster, tmp_path, monkeypatch):
    """A node with a worker and a replica is lost after the step-6 checkpoint; Ray Train restarts the
    worker group on the survivor and a spare node, which gets its own replica, and the run resumes
    from the checkpoint in shared storage (train.storage_path) to the uninterrupted run's losses."""
    shared = {"train.storage_path": str(tmp_path / "shared"), "train.max_failures": 2, **PER_NODE}
    plain = fit(run_config(teachers, tmp_path / "plain", **shared, name="plain"))
    cluster.add_node(**NODE)  # the spare: a replacement the run has not used yet
    cluster.wait_for_nodes()
    removed: list[str] = []
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "stall:8")  # holds still after step 8, past the step-6 checkpoint
    watcher = remove_node_when_stalled(cluster, tmp_path / "lost", 8, removed, lambda: min(served_nodes()))
    result = fit(run_config(teachers, tmp_path / "lost", **shared, name="lost"))
    watcher.join(timeout=60)
    assert result.error is None and removed
    assert removed[0] not in worker_nodes()
    assert steps_logged(tmp_path / "lost") == list(range(1, 13))  # each step once
    assert discarded_steps(tmp_path / "lost")[0] == 7  # steps after the step-6 checkpoint ran twice: it resumed from there
    assert losses_of(tmp_path / "lost") == losses_of(tmp_path / "plain")
    assert result.metrics["eval_accuracy"] == plain.metrics["eval_accuracy"]
    replicas = placement(tmp_path / "lost")  # the lost node's replica is gone with it
    assert {replica["node_id"] for replica in replicas} == worker_nodes()  # survivor and spare
    for replica in replicas:
        assert set(replica["served"]) == {replica["node_id"]}


@pytest.mark.slow
def test_a_lost_teacher_node_restarts_the_trajectory_replica_elsewhere_and_the_run_resumes(
        teachers, cluster, tmp_path, monkeypatch):
    """The trajectory teacher's one replica (1 CPU: only a node without a worker has room) is lost
    with its node after the step-6 checkpoint. Ray restarts it on the spare node; having lost the
    teacher's training it refuses to serve, Ray Train restarts the run from the checkpoint, which
    reloads the teacher's state, and the run ends with the uninterrupted run's losses (to rounding)."""
    guidance = {"mode": "trajectory", "teacher_update_every": 2, "teacher_lr": 1e-3}
    shared = {"train.storage_path": str(tmp_path / "shared"), "train.max_failures": 2, "guidance": guidance,
              "train.cpus_per_worker": 1.5, "teacher_service.cpus": 1.0}
    for _ in range(2):  # the teacher's node, and the spare its replica restarts on
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    plain = fit(run_config(teachers, tmp_path / "plain", **shared, name="plain"))
    assert plain.error is None

    def teacher_node() -> str:
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-global")]
        return ray.get(ray.get_actor(name, namespace="raylin").ping.remote())

    removed: list[str] = []
    monkeypatch.setenv("RAYLIN_TEST_FAULT", "stall:8")
    watcher = remove_node_when_stalled(cluster, tmp_path / "lost", 8, removed, teacher_node)
    result = fit(run_config(teachers, tmp_path / "lost", **shared, name="lost"))
    watcher.join(timeout=60)
    assert result.error is None and removed
    (replica,) = placement(tmp_path / "lost")
    assert replica["node_id"] != removed[0]  # restarted on the spare
    assert not set(replica["served"]) & {removed[0]}  # the teacher's node held no worker
    assert steps_logged(tmp_path / "lost") == list(range(1, 13))  # each step once
    assert discarded_steps(tmp_path / "lost")[0] == 7  # resumed from step 6
    # The replica sums the workers' micro-batch gradients in the order they arrive, which varies
    # between any two runs: equal to float rounding (seen: 6e-8 relative at step 9), not bitwise.
    torch.testing.assert_close(torch.tensor(losses_of(tmp_path / "lost")), torch.tensor(losses_of(tmp_path / "plain")),
                               rtol=1e-5, atol=1e-6)


# ----- the autoscaler, with Ray's fake multi-node provider ----------------------------------------


def _stop_processes_under(temp_dir: str) -> None:
    """End what a head started in its private ``temp_dir`` (the fake provider's nodes included):
    every process whose command line names that folder, and their children."""
    import psutil

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            mine += [process, *process.children(recursive=True)]
    for process in mine:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)


@pytest.mark.slow
@pytest.mark.assets
def test_the_autoscaler_adds_nodes_for_a_submitted_conversion_and_removes_them_when_idle(teachers, tmp_path):
    """cluster/local-autoscaler.yaml: the head starts alone with no CPUs; `ray job submit` of a
    conversion with two 1.5-CPU workers makes the autoscaler add nodes; the job SUCCEEDS; the idle
    nodes are removed again; each added node had its own teacher replica."""
    import os
    import signal
    import socket
    import subprocess
    import tempfile

    import yaml
    from test_jobs import BIN, ROOT, free_port, ray_cli, submit, wait_for

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "token", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # The fake provider's nodes join the GCS at Ray's default port, as `ray start --head` uses it.
    gcs = 6379
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", gcs)) == 0:
            pytest.skip(f"port {gcs} is taken: another Ray head runs on this machine")
    dashboard = free_port()
    log_path = tmp_path / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=0", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             f"--autoscaling-config={ROOT / 'cluster' / 'local-autoscaler.yaml'}", "--include-dashboard=true",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={free_port()}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    address = f"http://127.0.0.1:{dashboard}"

    def alive_workers() -> int:
        status = ray_cli(env, "status", "--address", f"{ray.util.get_node_ip_address()}:{gcs}").stdout
        active = status.split("Active:")[1].split("Pending:")[0] if "Active:" in status else ""
        return sum(" cpu_2x" in line for line in active.splitlines())

    try:
        deadline = time.monotonic() + 120
        while ray_cli(env, "job", "list", "--address", address).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(2)
        assert alive_workers() == 0  # the head starts alone
        out = tmp_path / "run"
        config = {
            "teacher": teachers["source"], "target_teacher": teachers["target"], "output_dir": str(out),
            "plan": {"mixer": "linformer", "linformer": {"k": 16}},
            "data": {"max_length": 48, "max_train_examples": 128, "max_eval_examples": 64},
            "train": {"num_workers": 2, "cpus_per_worker": 1.5, "max_steps": 4, "batch_size": 8,
                      "checkpoint_every": 4, "lr": 1e-3, "warmup_steps": 1, "storage_path": str(tmp_path / "shared")},
            "teacher_service": {"cpus": 0.5},
        }
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        logs = wait_for(address, env, submit(address, env, "python", "jobs/convert.py", str(path)), timeout_s=900)
        assert json.loads((out / "metrics.json").read_text())["steps"] == 4, logs[-2000:]
        replicas = placement(out)
        # One replica on each node the autoscaler added (the head has no CPUs for them), each serving
        # its own node. (The fake provider's node ids share a 51-character prefix: replicas named by
        # a prefix of the id once collapsed into one, serving both nodes.)
        assert len(replicas) == 2 and all(set(r["served"]) == {r["node_id"]} for r in replicas), replicas
        deadline = time.monotonic() + 180  # idle_timeout_minutes: 0.25, then the autoscaler's next pass
        while alive_workers() and time.monotonic() < deadline:
            time.sleep(3)
        assert alive_workers() == 0, "idle nodes were not removed"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        _stop_processes_under(temp_dir)
