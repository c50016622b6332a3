"""Activation cache for fixed teachers: per-example outputs on local disk, bounded, never stale.

A fixed teacher (target, hybrid, a waypoint snapshot) gives the same outputs for the same example
every time, so later epochs and other runs (Tune trials) can read them instead of running the
teacher again. Entries live under ``root/<namespace>/<example id>.safetensors``; the namespace is a
hash of everything that changes the outputs: the teacher's files (path, sizes, modification
times), the data set and tokenisation (``data_key``), the served layers, the logits flag and the
dtype. A changed teacher, data set, layer selection or dtype therefore lands in a new namespace
and never reads a stale entry.

Each entry holds one example's states at its real (unpadded) positions, so it can be placed into
a batch padded to any length. Writes are atomic (temporary file + rename), so concurrent replicas
on one node can share the folder. The total size is bounded by ``max_bytes``: the least recently
used entries are evicted first.

Limits: keys are example ids of the training split as the data pipeline numbers them; the
trajectory teacher changes every step and is never cached.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raylin.atomic import save_atomic
from raylin.fingerprint import fingerprint
from raylin.models.teachers import resolve_teacher_path

WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf")


def teacher_fingerprint(name_or_path: str) -> str:
    """Identity of a teacher checkpoint: its resolved path and every weight/config file's size and mtime."""
    path = Path(resolve_teacher_path(name_or_path))
    parts = [str(path.resolve()) if path.exists() else str(name_or_path)]
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in WEIGHT_SUFFIXES:
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return fingerprint(parts)


def cache_namespace(teacher: str, data_key: str, layers: tuple[int, ...] | None, logits: bool, dtype: str, states: str,
                    weights_dtype: str = "float32") -> str:
    identity = {"teacher": teacher_fingerprint(teacher), "data": data_key, "layers": layers, "logits": logits,
                "dtype": dtype, "states": states}
    if weights_dtype != "float32":  # a teacher computing in 16 bits gives other activations (float32 keys unchanged)
        identity["weights_dtype"] = weights_dtype
    return fingerprint(identity, 20)


class ActivationCache:
    """Disk cache of per-example teacher outputs with least-recently-used eviction."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"teacher_service.cache_max_gb must be > 0, got a budget of {max_bytes} bytes.")
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, int] = OrderedDict()  # oldest use first
        files = sorted(self.root.glob("*/*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
        for file in files:
            self._entries[file] = file.stat().st_size
        self.total_bytes = sum(self._entries.values())
        self.hits = self.misses = self.evictions = 0

    def _file(self, namespace: str, example_id: int) -> Path:
        return self.root / namespace / f"{int(example_id)}.safetensors"

    def get(self, namespace: str, example_id: int) -> dict[str, torch.Tensor] | None:
        file = self._file(namespace, example_id)
        if file not in self._entries and not file.exists():
            self.misses += 1
            return None
        try:
            tensors = load_file(file)
        except (OSError, RuntimeError):  # evicted by another replica between the check and the read
            self._entries.pop(file, None)
            self.misses += 1
            return None
        if file not in self._entries:  # written by another replica sharing the folder
            self._entries[file] = file.stat().st_size
            self.total_bytes += self._entries[file]
        self._entries.move_to_end(file)
        self.hits += 1
        return tensors

    def put(self, namespace: str, example_id: int, tensors: dict[str, torch.Tensor]) -> None:
        file = self._file(namespace, example_id)
        file.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(file, lambda staging: save_file({k: v.contiguous() for k, v in tensors.items()}, staging))
        size = file.stat().st_size
        if size > self.max_bytes:  # one entry larger than the whole budget is not kept
            file.unlink(missing_ok=True)
            return
        self.total_bytes += size - self._entries.pop(file, 0)
        self._entries[file] = size
        while self.total_bytes > self.max_bytes and self._entries:
            oldest, oldest_size = self._entries.popitem(last=False)
            oldest.unlink(missing_ok=True)
            self.total_bytes -= oldest_size
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_evictions": self.evictions,
                "cache_bytes": self.total_bytes, "cache_entries": len(self._entries)}
