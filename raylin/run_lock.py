"""One run per output folder at a time.

A run (``raylin convert``, ``raylin finetune``, the demo's stages, ``raylin tune``) holds an
exclusive ``flock`` on ``OUTPUT_DIR/.raylin-run.lock`` from before Ray starts until it ends. A
second start of a run into the same folder (a double-submitted job, a command run twice) is refused
at once with ``RunInProgress``, naming the folder and the holder (process id, host, command, since
when), or waits its turn with ``wait=True`` (``--wait``) and then finds the first run's results.

The kernel drops an ``flock`` when its process ends, however it ends (SIGKILL, a lost node's
processes, a crash), so a holder that died never leaves a stale lock: the next start takes it. The
file names the holder for the message; a releasing holder deletes it, and a taker checks that the
file it locked is still the one at the path (a waiter may hold the deleted one), so two runs never
both believe they hold the folder.

Limits: ``flock`` is local to one host, and on NFS (v4, or v3 with lockd) it is the server's lock;
drivers on two machines with an output folder on storage without locking are not kept apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from raylin.errors import RunInProgress

log = logging.getLogger(__name__)

LOCK_FILE = ".raylin-run.lock"


def _holder_text(fd: int) -> str:
    """The holder the lock file names, in words (what a waiting or refused start says)."""
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(raw)
        return (f"process {holder['pid']} on {holder['host']} since {holder['since']} "
                f"({holder.get('command') or 'raylin'})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not written yet)"


def _take(path: Path, wait: bool) -> int:
    """An open descriptor of ``path`` holding its exclusive flock; RunInProgress when another holds it
    and ``wait`` is false, else blocks until it is free."""
    said = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # a holder that made the folder removes it when left empty
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder_text(fd)
            if not wait:
                os.close(fd)
                raise RunInProgress(
                    f"output_dir {path.parent} is in use by a run in progress: {holder}. A second run into one "
                    "folder would mix both runs' files; wait for it (add --wait to start when it ends), or choose "
                    "another output_dir (--set output_dir=...).") from None
            if not said:
                log.info("output_dir %s is in use by %s; waiting for it to end (--wait)", path.parent, holder)
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder ends or releases
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        os.close(fd)  # the holder deleted this file as it released: take the one at the path now


@contextlib.contextmanager
def hold_output_dir(out: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold ``out`` for one run while the body runs (module doc); the folder is made if missing and,
    when it was made here and is left empty, removed again. Raises RunInProgress (``wait`` false)."""
    out = Path(out)
    missing = [folder for folder in (out, *out.parents) if not folder.exists()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    try:
        fd = _take(path, wait)
    except BaseException:
        _remove_empty(missing)
        raise
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the unlock: a waiter then finds its file gone and takes a new one
        os.close(fd)
        _remove_empty(missing)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a start made, deepest first, where nothing was left in them."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
