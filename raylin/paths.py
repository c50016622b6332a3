"""Whether a folder path can hold a run's or a benchmark's output, checked before any work starts.
Light to import: the command line checks its options with it before anything heavy loads."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be a folder this user writes (it is a file, sits under a file, or its
    nearest existing parent is not writable), or None when it exists as a writable folder or can be
    made. Touches nothing."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_file():
        return f"{'it is' if existing == path else 'it is under'} the file {str(existing)!r}; choose a folder path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{str(existing)!r} is not writable by this user; choose a folder you can write, "
                "e.g. under your home or ./outputs")
    return None
