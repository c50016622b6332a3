"""Atomic writes: a reader, a crash or a concurrent writer never sees a half-written file or folder.

Every file or folder raylin publishes (configs, metrics, reports, students, aligned blocks, caches,
checkpoints' side files) is written through one of these:

* ``save_atomic(path, write)`` / ``write_text_atomic(path, text)``: a file, staged next to its
  target and renamed onto it (POSIX ``rename`` replaces a file in one step);
* ``replace_folder(target, build)``: a folder built in a staging sibling, then swapped in. A folder
  cannot be renamed onto a non-empty one, so the old folder is first renamed aside and deleted only
  once the new one is in place: at every instant one whole version exists on disk (the old one,
  possibly under its aside name, until the swap completes);
* ``build_once(target, marker, build)``: a cache folder made once; of two concurrent builders the
  first to finish wins.

Limits: atomic on one POSIX file system (staging always sits next to the target for that reason);
on object stores (s3://, gs://) Ray Train's own checkpoint upload is used instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What open() and mkdir() would give under this process's umask, read once at import (os.umask is
# process-wide). mkstemp and mkdtemp make 0600 / 0700 entries, which other users, and other
# nodes' processes running as another user, could not read.
_UMASK = _umask()
_FILE_MODE, _DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def save_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(staging)`` into a temporary file next to ``path``, then rename it onto ``path``
    (the parent folder is created; the file gets the umask's usual permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(staging))
        os.chmod(staging, _FILE_MODE)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    save_atomic(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def replace_folder(target: str | Path, build: Callable[[Path], None]) -> Path:
    """``build(staging)`` fills a fresh folder next to ``target``, which then replaces ``target``
    whole (see the module docstring); a failed build leaves ``target`` untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming.", dir=target.parent))
    try:
        build(staging)
        os.chmod(staging, _DIR_MODE)
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, aside / target.name)
            os.replace(staging, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_once(target: str | Path, marker: str, build: Callable[[Path], None]) -> Path:
    """The folder ``target``, made by ``build(staging)`` in a temporary folder next to it and moved
    into place whole, unless ``target/marker`` already exists. Readers never see a partial folder;
    of two processes building at once, the first to finish wins and the other's work is dropped."""
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        os.chmod(staging, _DIR_MODE)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / marker).exists():  # a concurrent build that won the race is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
