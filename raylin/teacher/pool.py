"""The teacher service: teachers in Ray actors, layer activations through the object store.

``TeacherReplica`` is a Ray actor holding a ``TeacherBank``. Training workers (and alignment
tasks) send it ``TeacherRequest``s and get ObjectRefs of compact numpy arrays back, which a worker
on the same node maps without a copy. Requests are submitted a step ahead (prefetch), so the
teacher's forward for step s+1 runs while the student computes step s.

``TeacherPool`` names the replicas of one teacher configuration: one replica per node, created on
first use by whichever worker of that node asks (``replica()``), pinned to the node, so
activations never cross the network. The trajectory teacher is stateful and trains on the global
batch: it has exactly one replica for the whole run. Replicas restart when their process dies
(``max_restarts``) and Ray replays the lost request (``max_task_retries``); fixed teachers give the
same answer again. A restarted trajectory replica has lost its training state, so it refuses
requests until the run reloads it from the last checkpoint (the training worker fails, and Ray
Train restarts the run from that checkpoint).

Pools are keyed by their spec: runs (and Tune trials) with the same fixed teacher, outputs and
dtype share replicas; ``TeacherPool.shutdown()`` ends them. Replicas are detached actors in the
``raylin`` namespace so they outlive a restarted worker; whoever created the pool shuts it down.

Limits: a fractional ``gpus`` lets replicas share a GPU with training workers; a node without a
replica gets one when a worker there first asks, which takes a model load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raylin.fingerprint import fingerprint
from raylin.teacher.bank import TeacherBank, TeacherOutput, TeacherRequest, TeacherSpec, pack, teacher_loader, unpack

NAMESPACE = "raylin"


class TeacherReplica:
    """One teacher holder (wrapped by ``ray.remote`` in ``TeacherPool.replica``)."""

    def __init__(self, spec: TeacherSpec, use_gpu: bool):
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.bank = TeacherBank(spec, teacher_loader(spec), device)
        if spec.target is not None:
            self.bank.model("target")  # load now, so a worker's first request does not wait for it
        # A restarted trajectory replica has lost the teacher's training since the last checkpoint.
        self.needs_state = spec.source is not None and ray.get_runtime_context().was_current_actor_reconstructed
        self._updated: asyncio.Condition | None = None
        # requester's node id -> {requests, bytes, positions (tokens or frames served), seconds serving}
        self.served: dict[str, dict[str, float]] = {}

    async def serve(self, request: TeacherRequest, requester_node: str = "") -> dict:
        """The teacher's outputs for ``request``, packed for the object store. ``requester_node``:
        the asking process's node id, counted in ``placement()`` (what crosses nodes)."""
        started = time.perf_counter()
        message = await self._serve(request)
        counts = self.served.setdefault(requester_node, {"requests": 0, "bytes": 0, "positions": 0, "seconds": 0.0})
        counts["requests"] += 1
        counts["bytes"] += sum(a.nbytes for a in (message["hidden"], message["logits"]) if a is not None)
        counts["positions"] += served_positions(message)
        counts["seconds"] += time.perf_counter() - started
        return message

    async def _serve(self, request: TeacherRequest) -> dict:
        if request.teacher != "trajectory":
            return pack(self.bank.compute(request), self.bank.spec.dtype)
        if self.needs_state:
            raise RuntimeError(
                "The trajectory teacher's replica restarted and lost its training state; the run must restart "
                "from its last checkpoint (Ray Train does this when train.max_failures > 0)."
            )
        if self._updated is None:
            self._updated = asyncio.Condition()
        async with self._updated:
            # Serve step s only after every update before s: workers run up to one step apart.
            await self._updated.wait_for(lambda: self.bank.updated_through >= self.bank.last_update_before(request.step))
            message = pack(self.bank.compute(request), self.bank.spec.dtype)
            self._updated.notify_all()
        return message

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state)
        self.needs_state = False

    @property
    def transfer_bytes(self) -> int:
        return sum(counts["bytes"] for counts in self.served.values())

    def stats(self) -> dict:
        return self.bank.stats() | {"transfer_bytes": self.transfer_bytes}

    def placement(self) -> dict:
        """Where this replica runs and whom it served: {node_id, forwards, transfer_bytes, served:
        {requester node id: {requests, bytes, positions, seconds}}}. ``positions``: the sequence
        positions (tokens, frames) of the served states; ``seconds``: wall time spent serving,
        cache reads and the teacher's forwards included."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "forwards": self.bank.forwards,
                "transfer_bytes": self.transfer_bytes, "served": self.served}

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()


def served_positions(message: dict) -> int:
    """Sequence positions (rows x length) in a packed message: of its states, else of per-position
    logits; 0 when it holds per-example logits only."""
    if message["hidden"] is not None:
        return int(message["hidden"].shape[1] * message["hidden"].shape[2])
    logits = message["logits"]
    return int(logits.shape[0] * logits.shape[1]) if logits is not None and logits.ndim == 3 else 0


@dataclass(frozen=True)
class TeacherPool:
    """The replicas of one teacher spec; cheap to pickle into workers, trials and tasks."""

    spec: TeacherSpec
    cpus: float = 1.0
    gpus: float = 0.0
    max_restarts: int = 3
    owner: str = ""  # run name for stateful (trajectory) pools: never shared between runs

    @property
    def name(self) -> str:
        identity = dataclasses.asdict(dataclasses.replace(self.spec, fault=None, fault_dir=None))
        identity |= {"cpus": self.cpus, "gpus": self.gpus, "owner": self.owner if self.spec.source else ""}
        return "raylin-teacher-" + fingerprint(identity, 12)

    @property
    def single_replica(self) -> bool:
        return self.spec.source is not None  # the trajectory teacher trains on the global batch

    def replica(self, node_id: str | None = None):
        """The replica on ``node_id`` (default: this process's node), created on first use."""
        options = dict(namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                       max_restarts=self.max_restarts, max_task_retries=-1,
                       num_cpus=self.cpus, num_gpus=self.gpus, max_concurrency=64)
        if self.single_replica:
            name = f"{self.name}-global"
            # Created from a Ray Train worker, it would otherwise land in the worker group's
            # placement group, which has no room for it (and is removed with the run).
            options["scheduling_strategy"] = "DEFAULT"
        else:
            node_id = node_id or ray.get_runtime_context().get_node_id()
            # The whole node id: ids can share long prefixes (Ray's fake autoscaling provider
            # numbers its nodes ff...f00001, ff...f00002), and a shared name means a shared replica.
            name = f"{self.name}-{node_id}"
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return ray.remote(TeacherReplica).options(name=name, **options).remote(self.spec, self.gpus > 0)

    def replicas(self) -> list:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith(self.name)]
        return [ray.get_actor(name, namespace=NAMESPACE) for name in sorted(names)]

    def _answers(self, method: str, timeout_s: float = 30.0) -> list:
        """Every reachable replica's answer to ``method``. A replica lost with its node (its
        restart has nowhere to go: it is pinned there) is left out after ``timeout_s``."""
        refs = [getattr(replica, method).remote() for replica in self.replicas()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        answers = []
        for ref in ready:
            try:
                answers.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                pass
        return answers

    def stats(self) -> dict[str, int]:
        """Counters summed over the reachable replicas: teacher forwards, cache hits/misses, bytes served."""
        totals: dict[str, int] = {}
        for stats in self._answers("stats"):
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def placement(self) -> list[dict]:
        """Every reachable replica's node and the nodes it served (TeacherReplica.placement): with
        node-local serving each replica serves its own node only."""
        return sorted(self._answers("placement"), key=lambda p: p["node_id"])

    def report(self) -> dict:
        """What a run records of its pool (teacher_service.json, the align summary): the summed
        counters and, under ``replicas``, each replica's placement."""
        return self.stats() | {"replicas": self.placement()}

    def shutdown(self) -> None:
        for replica in self.replicas():
            ray.kill(replica, no_restart=True)


class ServedTeachers:
    """The training worker's side of the service: same interface as InProcessTeachers."""

    def __init__(self, pool: TeacherPool, device: torch.device, rank: int, world: int):
        self.pool, self.device, self.rank, self.world = pool, device, rank, world
        self.replica = pool.replica()
        ray.get(self.replica.ping.remote())  # wait for the model load here, not inside step 0's timing
        self.node_id = ray.get_runtime_context().get_node_id()
        self._refs: dict[int, object] = {}

    def submit(self, request: TeacherRequest) -> None:
        request.micro_batches = self.world  # the replica trains the trajectory teacher on the global batch
        self._refs[request.step] = self.replica.serve.remote(request, self.node_id)

    def result(self, step: int) -> TeacherOutput:
        return unpack(ray.get(self._refs.pop(step)), self.device)

    def state_dict(self) -> dict:
        # One replica holds the trajectory teacher for every worker: rank 0 saves it.
        return ray.get(self.replica.state_dict.remote()) if self.rank == 0 and self.pool.single_replica else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.rank == 0:
            ray.get(self.replica.load_state_dict.remote(state))

    def stats(self) -> dict[str, int]:
        return ray.get(self.replica.stats.remote())

    def close(self) -> None:
        self._refs.clear()
