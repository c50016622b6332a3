"""What a process and a training worker hold in memory: the peak resident set, and the model states
(parameters and optimizer) DeepSpeed leaves on a worker. ``raylin bench scale`` reports both."""

from __future__ import annotations

import json
import resource
import threading
from pathlib import Path

import torch

from raylin.atomic import write_text_atomic
from raylin.train.collective import gather_across_workers


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM from /proc (reset when the process was
    exec'd), else ru_maxrss, which on Linux carries the forking parent's peak across exec."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_used_mb() -> float:
    """Memory in use on this machine in MiB (MemTotal - MemAvailable from /proc/meminfo): every
    process of a local Ray cluster together, page cache that can be dropped left out."""
    fields = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return (fields["MemTotal"] - fields["MemAvailable"]) / 1024


class MachineMemoryPeak:
    """Samples ``machine_used_mb`` every ``interval_s`` on a thread while the ``with`` block runs:
    ``peak_mb`` and ``baseline_mb`` (at entry) afterwards. Limits: Linux only; a peak shorter than the
    interval can be missed; other programs on the machine count too."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.baseline_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, machine_used_mb())

    def __enter__(self) -> "MachineMemoryPeak":
        self.baseline_mb = self.peak_mb = machine_used_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _base_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO's partitioned optimizers hold it as ``.optimizer``)."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def model_state_bytes(engine) -> dict[str, int]:
    """What this worker holds of the model states, by tensor storage, each storage counted once:
    ``parameters`` (its ZeRO-3 partition, ``ds_tensor``, else the whole parameter), ``optimizer``
    (the optimizer's own parameters where ZeRO keeps flat master partitions, their gradients, and its
    state, e.g. Adam's moments). Limits: DeepSpeed's communication buckets and the model's
    gradients outside the optimizer's parameters (ZeRO-2 reduces them into its partitions) are not
    counted; nor are activations."""
    seen: set[int] = set()

    def size(tensor) -> int:
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return 0
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    parameters = sum(size(getattr(p, "ds_tensor", p)) for p in engine.module.parameters())
    base = _base_optimizer(engine.optimizer)
    optimizer = 0
    for group in base.param_groups:
        for p in group["params"]:
            optimizer += size(p) + size(p.grad)
    for state in base.state.values():
        optimizer += sum(size(value) for value in state.values())
    return {"parameters": parameters, "optimizer": optimizer}


MEMORY_REPORT = "memory.json"  # in the output folder, written by rank 0 when the loop ends


def write_memory_report(engine, config, output_dir: Path, rank: int) -> None:
    """Every worker's peak resident memory and model-state bytes (``model_state_bytes``), gathered
    to rank 0, which writes OUTPUT_DIR/memory.json (all workers call this: it is a collective)."""
    states = model_state_bytes(engine)
    mine = torch.tensor([peak_rss_mb(), states["parameters"] / 2**20, states["optimizer"] / 2**20], dtype=torch.float64)
    every = gather_across_workers(mine).tolist()
    if rank == 0:
        report = {"zero_stage": config.train.zero_stage, "workers": len(every),
                  "peak_rss_mb": [round(w[0], 1) for w in every], "parameters_mb": [round(w[1], 2) for w in every],
                  "optimizer_mb": [round(w[2], 2) for w in every]}
        write_text_atomic(output_dir / MEMORY_REPORT, json.dumps(report, indent=1))
