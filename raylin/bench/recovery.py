"""``raylin bench faults``: how often a conversion survives each fault, at seeded random points.

For every fault kind, ``trials`` short conversions (default 10) run with the fault injected once
(raylin.fault_injection) at a step drawn from the trial's seed, and each is compared with the uninterrupted
run of the same config:

| kind             | fault                                                  | survived when                        |
|------------------|--------------------------------------------------------|--------------------------------------|
| worker-kill      | a training worker's process ends before step S         | the run finishes                     |
| teacher-kill     | a teacher replica's process ends on step S's request   | the run finishes                     |
| checkpoint-crash | rank 0's process ends while writing step S's checkpoint | the run finishes                     |
| nan              | step S's loss is NaN (``train.max_failures: 0``)        | it stops before the update, says why, and its last checkpoint is the one before S |
| node-lost        | the node of a seeded choice among the teacher replicas' nodes is removed without a graceful shutdown while the run stalls before step S (a local multi-node cluster: a head without CPUs, two 2-CPU worker nodes and a spare added back after each loss) | the run finishes |

*identical*: every step's logged losses, the evaluation metrics and every student tensor equal the
uninterrupted run's bit for bit (for ``nan``: the losses up to its last checkpoint and that
checkpoint's student tensors equal the uninterrupted run's checkpoint of the same step).

The conversions are tiny (a two-layer BERT of width 32 with all-MiniLM-L6's tokenizer → Linformer,
target guidance with a served teacher, 2 workers under ZeRO-2, 12 steps, checkpoints at 4, 8, 12)
so a soak of 50 trials takes about 45 minutes on two cores (42 measured at c6df340). Writes faults.json after every trial;
starts and stops its own Ray (refuses to run inside a Ray session).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
import transformers
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from raylin.assets import asset_path
from raylin.atomic import write_text_atomic
from raylin.bench.cluster import local_cluster
from raylin.config import RunConfig, config_from_dict
from raylin.fault_injection import FAULT_ENV
from raylin.train.checkpoint import STATE_FILE
from raylin.train.run_files import STUDENT_DIR, read_train_log
from raylin.train.trainer import fit, storage_path

log = logging.getLogger(__name__)

STEPS = 12
CHECKPOINT_EVERY = 4
NODE_CPUS = 2
PER_NODE = {"cpus_per_worker": 1.5}  # one worker per node; the node's replica takes the other 0.5 CPU


@dataclass(frozen=True)
class FaultKind:
    """One kind of fault: the raylin.fault_injection switch it sets and the steps it is drawn from."""

    fault: str  # the KIND of RAYLIN_TEST_FAULT
    steps: tuple[int, ...]  # the step S a trial's seed draws from
    stops: bool = False  # the promise is to stop cleanly, not to finish
    nodes: bool = False  # needs a multi-node cluster


# Steps are the loop's 0-based step index, except checkpoint-crash (the checkpoint's step, 1-based).
FAULT_KINDS: dict[str, FaultKind] = {
    "worker-kill": FaultKind("crash", tuple(range(1, STEPS))),
    "teacher-kill": FaultKind("teacher-crash", tuple(range(1, STEPS))),
    "checkpoint-crash": FaultKind("crash-in-checkpoint", tuple(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))),
    # From the first checkpoint on, so that there is a last good checkpoint to keep.
    "nan": FaultKind("nan", tuple(range(CHECKPOINT_EVERY, STEPS)), stops=True),
    "node-lost": FaultKind("stall", tuple(range(1, STEPS)), nodes=True),
}


@dataclass
class Trial:
    kind: str
    seed: int
    step: int
    survived: bool = False
    identical: bool = False
    wall_s: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


def tiny_text_teacher(folder: str | Path, seed: int = 0) -> str:
    """A two-layer BERT classifier of width 32 with all-MiniLM-L6's tokenizer (a shipped asset),
    saved to ``folder``; dropout off so that runs are deterministic across worker counts."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(asset_path("all-minilm-l6"))
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def soak_config(source: str, target: str, out: Path, kind: FaultKind, storage: Path | None = None) -> RunConfig:
    """The conversion every trial of ``kind`` runs (and its uninterrupted reference)."""
    train = {"num_workers": 2, "zero_stage": 2, "max_steps": STEPS, "batch_size": 8, "checkpoint_every": CHECKPOINT_EVERY,
             "keep_checkpoints": STEPS // CHECKPOINT_EVERY, "lr": 1e-3, "warmup_steps": 2, "cpus_per_worker": 0.5,
             "max_failures": 0 if kind.stops else 2}
    if kind.nodes:
        train |= PER_NODE | {"storage_path": str(storage)}
    return config_from_dict({
        "teacher": source, "target_teacher": target, "output_dir": str(out), "name": out.name,
        "plan": {"mixer": "linformer", "linformer": {"k": 16}},
        "data": {"max_length": 48, "max_train_examples": 256, "max_eval_examples": 64},
        "guidance": {"mode": "target"}, "loss": {"alpha_layer": 1.0, "alpha_out": 0.5},
        "train": train, "teacher_service": {"cpus": 0.5 if kind.nodes else 1.0},
    })


def checkpoints(config: RunConfig) -> dict[int, Path]:
    """The run's kept checkpoints by step (a local storage_path)."""
    root = Path(storage_path(config))
    found = {}
    for folder in root.glob(f"{config.run_name}/checkpoint_*"):
        state = folder / STATE_FILE
        if state.is_file():
            found[json.loads(state.read_text())["step"]] = folder
    return found


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The student's tensors in a checkpoint: DeepSpeed's module state (every checkpoint has it),
    and the published student's safetensors where the checkpoint is the final one."""
    module = torch.load(checkpoint / "engine" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    weights = {f"engine.{k}": v for k, v in module.items()}
    student = checkpoint / STUDENT_DIR / "model.safetensors"
    if student.is_file():
        weights |= {f"student.{k}": v for k, v in load_file(str(student)).items()}
    return weights


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class Reference:
    """The uninterrupted run a kind's trials are compared with."""

    losses: list[float]
    metrics: dict
    weights: dict[int, dict[str, torch.Tensor]]  # step -> student tensors of its checkpoint

    @classmethod
    def run(cls, config: RunConfig) -> Reference:
        result = fit(config)
        if result.error is not None:
            raise RuntimeError(f"the uninterrupted reference run failed: {result.error}") from result.error
        kept = checkpoints(config)
        return cls([r["loss"] for r in read_train_log(config.output_dir)], _eval_metrics(result.metrics),
                   {step: _weights(folder) for step, folder in kept.items()})


def _eval_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("eval_")}


@contextmanager
def _fault(spec: str) -> Iterator[None]:
    """RAYLIN_TEST_FAULT for this process and the Ray workers it starts from now on."""
    os.environ[FAULT_ENV] = spec
    try:
        yield
    finally:
        os.environ.pop(FAULT_ENV, None)


def served_nodes() -> set[str]:
    """The node ids of the nodes holding a fixed-teacher replica (its actor's name ends in one)."""
    return {actor["name"].rsplit("-", 1)[-1] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("raylin-teacher-") and not actor["name"].endswith("-global")}


def remove_node_when_stalled(cluster: Cluster, out: Path, step: int, removed: list[str],
                             choose: Callable[[], str], timeout_s: float = 600,
                             stop: threading.Event | None = None) -> threading.Thread:
    """A watcher that, once the run stalls before ``step`` (fault ``stall:STEP``), removes the node
    whose id ``choose()`` names, without a graceful shutdown: a lost machine. It removes nothing
    when ``stop`` is set or ``timeout_s`` passes first (the run ended before the stall). (Nodes can
    be removed from any thread, added only from the main one.)"""
    stop = stop or threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not (out / f".fault-stall-{step}").exists():
            if stop.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.2)
        chosen = choose()
        node = next(n for n in cluster.list_all_nodes() if n.node_id == chosen)
        removed.append(node.node_id)
        cluster.remove_node(node, allow_graceful=False)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_trial(name: str, seed: int, teachers: tuple[str, str], folder: Path, reference: Reference,
              cluster: Cluster | None = None) -> Trial:
    """One conversion with fault ``name`` at the step ``seed`` draws; compared with ``reference``."""
    kind = FAULT_KINDS[name]
    rng = random.Random(f"{name}:{seed}")
    trial = Trial(name, seed, rng.choice(kind.steps))
    out = folder / f"{name}-{seed}"
    config = soak_config(*teachers, out, kind, storage=folder / "shared")
    started = time.monotonic()
    removed: list[str] = []
    watcher, finished = None, threading.Event()
    if kind.nodes:
        watcher = remove_node_when_stalled(cluster, out, trial.step, removed, lambda: rng.choice(sorted(served_nodes())),
                                           stop=finished)
    with _fault(f"{kind.fault}:{trial.step}"):
        try:
            result = fit(config)
            error = result.error
        except Exception as exc:  # a stopped run raises from fit (nan, max_failures: 0)
            error, result = exc, None
    finished.set()  # a watcher still waiting (the run ended before its stall) removes no later trial's node
    if watcher is not None:
        watcher.join()
        trial.extra["removed_node"] = removed[0] if removed else None
    trial.wall_s = round(time.monotonic() - started, 1)
    fired = (out / f".fault-{kind.fault}-{trial.step}").exists() and (not kind.nodes or bool(removed))
    losses = [r["loss"] for r in read_train_log(out)]
    kept = checkpoints(config)
    if not fired:
        trial.detail = "the fault did not fire"
    elif kind.stops:
        last = max(kept, default=0)
        expected = trial.step // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        trial.survived = error is not None and "Loss is nan" in str(error) and last == expected
        trial.identical = trial.survived and losses[:last] == reference.losses[:last] and _same_weights(
            _weights(kept[last]), reference.weights[last])
        said = [line for line in str(error).splitlines() if "Loss is nan" in line] if error else []
        trial.detail = f"stopped: {(said or [str(error)])[0].strip()[:200]}" if error else "did not stop"
        trial.extra["last_checkpoint"] = last
    else:
        trial.survived = error is None
        final = max(kept, default=0)
        trial.identical = trial.survived and losses == reference.losses and final == STEPS and (
            _eval_metrics(result.metrics) == reference.metrics) and _same_weights(_weights(kept[final]), reference.weights[STEPS])
        if error is not None:
            trial.detail = f"failed: {str(error).splitlines()[0][:200]}"
        elif not trial.identical:
            diffs = [abs(a - b) for a, b in zip(losses, reference.losses)]
            trial.detail = f"differs: max |loss diff| {max(diffs, default=float('nan')):.3g}, steps {len(losses)}"
    trial.extra["steps_logged"] = len((out / "train_log.jsonl").read_text().splitlines()) if (out / "train_log.jsonl").exists() else 0
    log.info("fault soak: %s seed %d step %d: survived=%s identical=%s (%.0f s) %s", name, seed, trial.step,
             trial.survived, trial.identical, trial.wall_s, trial.detail)
    return trial


def _summary(trials: list[Trial], kinds: list[str]) -> list[dict]:
    rows = []
    for name in kinds:
        mine = [t for t in trials if t.kind == name]
        rows.append({"kind": name, "fault": FAULT_KINDS[name].fault, "trials": len(mine),
                     "survived": sum(t.survived for t in mine), "identical": sum(t.identical for t in mine),
                     "seeds": [t.seed for t in mine], "steps": [t.step for t in mine],
                     "wall_s": [t.wall_s for t in mine],
                     "failures": [{"seed": t.seed, "step": t.step, "detail": t.detail} for t in mine if not t.identical],
                     "extra": [t.extra for t in mine]})
    return rows


def _write(out: Path, trials: list[Trial], kinds: list[str], trials_per_kind: int) -> dict:
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} "
                   f"({torch.cuda.device_count() or 'no'} GPU{'s' if torch.cuda.device_count() != 1 else ''})",
        "conversion": f"tiny BERT -> linformer, 2 workers ZeRO-2, {STEPS} steps, checkpoints every {CHECKPOINT_EVERY}",
        "trials_per_kind": trials_per_kind,
        "kinds": _summary(trials, kinds),
    }
    write_text_atomic(out / "faults.json", json.dumps(result, indent=1))
    return result


def check_kinds(kinds: list[str] | None) -> list[str]:
    """``kinds`` (default: all of FAULT_KINDS), or ValueError naming the unknown ones and the choices."""
    kinds = list(kinds or FAULT_KINDS)
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"Unknown fault kind(s) {unknown}; choose from {sorted(FAULT_KINDS)}.")
    return kinds


def run_fault_benchmark(out: str | Path, trials: int = 10, kinds: list[str] | None = None, first_seed: int = 0) -> dict:
    """``trials`` runs of each fault kind in ``kinds`` (default all), seeds ``first_seed`` on;
    writes faults.json under ``out`` after every trial and returns what it wrote. Single-node kinds
    run on a local Ray of 2 CPUs, node-lost on a local multi-node cluster; both are started and
    stopped here."""
    kinds = check_kinds(kinds)
    if ray.is_initialized():
        raise RuntimeError("raylin bench faults starts its own Ray: run it outside a Ray session.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="raylin-bench-faults-") as scratch:
        folder = Path(scratch)
        teachers = (tiny_text_teacher(folder / "source", 0), tiny_text_teacher(folder / "target", 1))
        single = [k for k in kinds if not FAULT_KINDS[k].nodes]
        if single:
            ray.init(address="local", num_cpus=NODE_CPUS, include_dashboard=False, log_to_driver=False)
            try:
                for name in single:
                    kind = FAULT_KINDS[name]
                    reference = Reference.run(soak_config(*teachers, folder / f"{name}-reference", kind))
                    for seed in range(first_seed, first_seed + trials):
                        done.append(run_trial(name, seed, teachers, folder, reference))
                        _write(out, done, kinds, trials)
            finally:
                ray.shutdown()
        if "node-lost" in kinds:
            kind = FAULT_KINDS["node-lost"]
            with local_cluster(2, cpus=NODE_CPUS) as cluster:
                reference = Reference.run(soak_config(*teachers, folder / "node-lost-reference", kind, storage=folder / "shared"))
                for seed in range(first_seed, first_seed + trials):
                    cluster.add_node(num_cpus=NODE_CPUS)  # the spare the run restarts on after the loss
                    cluster.wait_for_nodes()
                    done.append(run_trial("node-lost", seed, teachers, folder, reference, cluster))
                    _write(out, done, kinds, trials)
    return _write(out, done, kinds, trials)


def summary_lines(result: dict) -> list[str]:
    """One line per kind: survived and identical out of trials."""
    return [f"{row['kind']:<17} survived {row['survived']}/{row['trials']}  identical {row['identical']}/{row['trials']}"
            f"  steps {row['steps']}" for row in result["kinds"]]
