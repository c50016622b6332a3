"""``raylin bench cluster``: what the teacher service moves between processes on 1, 2 and 3 nodes.

For each node count N, a Ray cluster of N two-CPU worker nodes and a head without CPUs is started
on this machine (``ray.cluster_utils.Cluster``: separate raylets and node ids), and a short real
conversion runs on it: all-MiniLM-L6 (shipped asset) → Linformer, target guidance with a fixed
teacher, N training workers of 1.5 CPUs and the per-batch size held per worker (weak scaling), so
Ray Train places one worker and one teacher replica (0.5 CPU) on each node. What is recorded comes
from the run's own files (teacher_service.json, train_log.jsonl):

- per node: its replica's forwards, requests, bytes and sequence positions served, and how many of
  those bytes went to another node (node-local serving: none);
- bytes per served position against the formula ``states × hidden × bytes per element`` (exact
  when only hidden states are served, as here), which is what the paper extrapolation uses;
- step time and the time rank 0 waited for the teacher, and the overlap: the share of the
  replica's serving time hidden behind the student's step by prefetch.

The nodes share this machine's two cores, so step times show contention, not a cluster's speed:
read the bytes, counts and overlap. ``paper_extrapolation`` then applies the formula to the paper
configs in raylin/configs/paper (their teachers' widths, batch, length and served layers).

Writes cluster.json and cluster.png. Starts and stops its own clusters (their own processes;
refuses to run inside an existing Ray session).
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from raylin.atomic import write_text_atomic
from raylin.bench import SHIPPED_CONFIGS
from raylin.config import config_from_dict
from raylin.models.teachers import paper_teacher_architecture
from raylin.plots import figure
from raylin.tasks import TASK_KINDS
from raylin.teacher.bank import COMPACT_DTYPES
from raylin.train.run_files import read_train_log
from raylin.train.trainer import TEACHER_STATS, fit

log = logging.getLogger(__name__)

NODE_CPUS = 2
WORKER_CPUS = 1.5  # one worker per node: 2 CPUs hold a worker and the node's 0.5-CPU replica
REPLICA_CPUS = 0.5
OBJECT_STORE_BYTES = 200 * 2**20
TEACHER = "asset:all-minilm-l6"
TEACHER_SHAPE = {"hidden": 384, "layers": 6}
PER_WORKER_BATCH = 8
NETWORK_BYTES_PER_S = 12.5e9  # a 100 Gb/s link, to put a per-step volume in seconds

SPEECH_FRAMES_PER_S = 50  # wav2vec2's feature encoder: one frame per 20 ms
UNCROPPED_SECONDS = 10.0  # assumed utterance length where CTC clips are never cropped (marked length_assumed)
PAPER_WORKERS_PER_NODE = 4  # the paper configs' stated resources: one 4-GPU node
PAPER_CONFIGS = SHIPPED_CONFIGS / "paper"


@contextmanager
def local_cluster(nodes: int, cpus: int = NODE_CPUS, object_store_bytes: int = OBJECT_STORE_BYTES) -> Iterator[Cluster]:
    """A head without CPUs (the driver, Ray Train's controller) and ``nodes`` worker nodes of
    ``cpus`` CPUs, all on this machine, with this process connected; stopped by its own processes
    (``Cluster.shutdown``), never by ``ray stop``. Raises if this process is already in a Ray session."""
    if ray.is_initialized():
        raise RuntimeError("local_cluster starts its own Ray cluster: call it outside a Ray session (ray.shutdown()).")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": object_store_bytes})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus, object_store_memory=object_store_bytes)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def bench_config(nodes: int, steps: int, out: Path, max_length: int) -> dict:
    """The conversion run on ``nodes`` nodes: one worker per node, a fixed teacher, hidden states only."""
    return {
        "teacher": TEACHER, "target_teacher": TEACHER, "output_dir": str(out), "name": f"cluster-{nodes}",
        "plan": {"mixer": "linformer", "linformer": {"k": 16}},
        "data": {"max_length": max_length, "max_train_examples": PER_WORKER_BATCH * nodes * steps, "max_eval_examples": 16},
        "guidance": {"mode": "target"},
        "loss": {"alpha_layer": 1.0, "alpha_out": 0.0},
        "train": {"num_workers": nodes, "cpus_per_worker": WORKER_CPUS, "batch_size": PER_WORKER_BATCH * nodes,
                  "max_steps": steps, "checkpoint_every": steps, "lr": 1e-3, "warmup_steps": 1, "zero_stage": 2},
        "teacher_service": {"cpus": REPLICA_CPUS, "dtype": "bfloat16"},
    }


def measure(nodes: int, steps: int, folder: Path, max_length: int) -> dict:
    """One conversion on a fresh ``nodes``-node cluster; its per-node traffic from the run's files."""
    out = folder / f"nodes-{nodes}"
    config = config_from_dict(bench_config(nodes, steps, out, max_length))
    with local_cluster(nodes):
        result = fit(config)
    if result.error is not None:
        raise RuntimeError(f"the {nodes}-node conversion failed: {result.error}") from result.error
    stats = json.loads((out / TEACHER_STATS).read_text())
    train_log = read_train_log(out)
    element = COMPACT_DTYPES[config.teacher_service.dtype].itemsize
    formula = (TEACHER_SHAPE["layers"] + 1) * TEACHER_SHAPE["hidden"] * element  # every hidden state, no logits
    per_node = []
    for replica in stats["replicas"]:
        own = replica["served"].get(replica["node_id"], {})
        positions = sum(counts["positions"] for counts in replica["served"].values())
        per_node.append({
            "node_id": replica["node_id"],
            "teacher_forwards": replica["forwards"],
            "requests": sum(counts["requests"] for counts in replica["served"].values()),
            "bytes": replica["transfer_bytes"],
            "bytes_per_step": replica["transfer_bytes"] / steps,
            "cross_node_bytes": replica["transfer_bytes"] - own.get("bytes", 0),
            "positions": positions,
            "bytes_per_position": replica["transfer_bytes"] / positions if positions else 0.0,
            "serving_s_per_step": sum(counts["seconds"] for counts in replica["served"].values()) / steps,
        })
    # Step 1 includes start-up (the replicas' model load): timing starts at step 2.
    step_s = [b["wall_s"] - a["wall_s"] for a, b in itertools.pairwise(train_log[1:])]
    wait_s = [record["teacher_wait_s"] for record in train_log[2:]]
    step_median, wait_median = statistics.median(step_s), statistics.median(wait_s)
    serving = statistics.mean(node["serving_s_per_step"] for node in per_node)
    return {
        "nodes": nodes, "workers": nodes, "steps": steps, "per_worker_batch": PER_WORKER_BATCH, "max_length": max_length,
        "replicas": len(per_node), "per_node": per_node,
        "cross_node_bytes": sum(node["cross_node_bytes"] for node in per_node),
        "formula_bytes_per_position": formula,
        "formula_matches": all(node["bytes"] == node["positions"] * formula for node in per_node),
        "step_s_median": step_median, "teacher_wait_s_median": wait_median, "serving_s_per_step": serving,
        "overlap": max(0.0, 1 - wait_median / serving) if serving else 0.0,
    }


def paper_extrapolation(configs: Path = PAPER_CONFIGS) -> list[dict]:
    """Served bytes per step for each paper config, by the formula the benchmark checks: positions per
    worker (batch / workers × length, or seconds × 50 frames for speech) × served states × hidden ×
    2 bytes (bf16), plus per-position logits when the KL term is on (causal LM, CTC)."""
    rows = []
    for path in sorted(configs.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        teacher = paper_teacher_architecture(data["teacher"])
        if teacher is None:
            continue
        loss, train, section = data.get("loss", {}), data.get("train", {}), data.get("data", {})
        element = COMPACT_DTYPES[data.get("teacher_service", {}).get("dtype", "bfloat16")].itemsize
        speech = "max_length" not in section
        seconds = section.get("max_seconds", UNCROPPED_SECONDS)  # CTC clips are never cropped
        length = int(seconds * SPEECH_FRAMES_PER_S) if speech else section["max_length"]
        layers = loss.get("layers")
        states = (len(layers) if layers else teacher.num_hidden_layers + 1) if loss.get("alpha_layer", 1.0) > 0 else 0
        # Per-position logits (causal LM, CTC) when the KL term is on; a classifier's are per example.
        kind = TASK_KINDS[data.get("task", {}).get("type", "sequence_classification")]
        per_position_logits = kind.language_model or kind.transcribes
        logits = teacher.vocab_size if loss.get("alpha_out", 0.0) > 0 and per_position_logits else 0
        positions = train["batch_size"] // train["num_workers"] * length
        per_worker = positions * (states * teacher.hidden_size + logits) * element
        per_node = per_worker * min(train["num_workers"], PAPER_WORKERS_PER_NODE)
        rows.append({
            "config": path.stem, "teacher": data["teacher"], "hidden": teacher.hidden_size, "served_states": states,
            "positions_per_worker_step": positions, "length_assumed": speech and "max_seconds" not in section,
            "bytes_per_worker_step": per_worker, "bytes_per_node_step": per_node,
            "network_s_per_node_step": per_node / NETWORK_BYTES_PER_S,
        })
    return rows


def run_cluster_benchmark(out: str | Path, nodes: tuple[int, ...] = (1, 2, 3), steps: int = 10,
                          max_length: int = 64) -> dict:
    """Measure each node count in ``nodes`` (fresh clusters, one after another), extrapolate to the
    paper configs, write cluster.json and cluster.png under ``out``; returns what it wrote."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="raylin-bench-cluster-") as folder:
        for count in nodes:
            log.info("cluster benchmark: %d node(s)", count)
            runs.append(measure(count, steps, Path(folder), max_length))
    result = {"machine_note": "all nodes share this machine's cores: step times show contention, not cluster speed",
              "runs": runs, "paper": paper_extrapolation()}
    write_text_atomic(out / "cluster.json", json.dumps(result, indent=1))
    plot(result, out / "cluster.png")
    return result


def summarize(result: dict) -> list[dict]:
    """One row per node count: the figures the docs quote."""
    return [{"nodes": run["nodes"], "replicas": run["replicas"],
             "bytes_per_step_per_node": [node["bytes_per_step"] for node in run["per_node"]],
             "forwards_per_node": [node["teacher_forwards"] for node in run["per_node"]],
             "cross_node_bytes": run["cross_node_bytes"], "formula_matches": run["formula_matches"],
             "step_s_median": round(run["step_s_median"], 3), "teacher_wait_s_median": round(run["teacher_wait_s_median"], 4),
             "overlap": round(run["overlap"], 3)} for run in result["runs"]]


def plot(result: dict, path: Path) -> None:
    runs = result["runs"]
    with figure(path, rows=1, cols=3, size=(4.2, 3.4), dpi=110) as axes:
        traffic, forwards, timing = axes[0]
        for run in runs:
            xs = [run["nodes"] + offset for offset in _offsets(len(run["per_node"]))]
            traffic.bar(xs, [node["bytes_per_step"] / 2**20 for node in run["per_node"]], width=0.18, color="tab:blue")
            traffic.bar(xs, [node["cross_node_bytes"] / run["steps"] / 2**20 for node in run["per_node"]], width=0.18,
                        color="tab:red")
            forwards.bar(xs, [node["teacher_forwards"] for node in run["per_node"]], width=0.18, color="tab:green")
        labels = [run["nodes"] for run in runs]
        traffic.set(xlabel="nodes (one bar per node)", ylabel="MiB served per step", xticks=labels,
                    title="activations per node (red: crossed nodes)")
        forwards.set(xlabel="nodes (one bar per node)", ylabel="teacher forwards", xticks=labels, title="forwards per node")
        timing.plot(labels, [run["step_s_median"] for run in runs], marker="o", label="step (median)")
        timing.plot(labels, [run["teacher_wait_s_median"] for run in runs], marker="o", label="waited for the teacher")
        timing.plot(labels, [run["serving_s_per_step"] for run in runs], marker="o", label="replica serving time")
        timing.set(xlabel="nodes (sharing 2 cores)", ylabel="seconds", xticks=labels, title="per step")
        timing.legend(fontsize=7)


def _offsets(count: int) -> list[float]:
    return [0.2 * (i - (count - 1) / 2) for i in range(count)]
