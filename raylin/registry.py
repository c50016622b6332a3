"""Name lookups in raylin's registries (tasks, guidance modes, mixers, benchmarks): one message for
an unknown name, naming the config key and the choices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def registry_entry(registry: Mapping[str, T], name: str, key: str) -> T:
    """``registry[name]``; ValueError "KEY 'NAME' is unknown; choose one of (...)" for an unknown name."""
    try:
        return registry[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list where a name belongs)
        raise ValueError(f"{key} {name!r} is unknown; choose one of {tuple(registry)}.") from None
