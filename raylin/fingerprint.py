"""One fingerprint for every cache key and identity check in raylin.

Caches (activation cache, token ids, teacher scores, aligned blocks, synthesised speech, teacher
pools) and the resume check key their entries by ``fingerprint(identity)``: the SHA-256 of the
identity's canonical JSON. Everything an entry depends on goes into its identity; nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def _plain(value: Any) -> Any:
    if callable(getattr(value, "to_dict", None)):  # objects that say their own plain form (Plan, RunConfig)
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)  # paths, dtypes, enums: their text form


def fingerprint(identity: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``identity`` as canonical JSON (sorted keys;
    objects with ``to_dict`` as its result, dataclasses as their fields, sets sorted, other objects by ``str``). Equal identities give equal
    fingerprints in every process and run; tuples and lists fingerprint alike."""
    text = json.dumps(identity, sort_keys=True, default=_plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dotted(data: dict, prefix: str = "") -> dict[str, Any]:
    """``data`` flattened to dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``), the form
    ``--set`` overrides take: for naming what differs between two configs and for trackers' params.
    An empty mapping stays a value, so ``{}`` and a missing key differ."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
