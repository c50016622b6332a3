"""Progress of a long stage on the driver's console, read from the files the workers write.

Training rank 0 appends one record per step to ``train_log.jsonl``; each align task appends one
per step to its own file. The driver follows those files in a thread (``follow``) and shows one
progress display per stage: step, loss, tokens/s and ETA. On a terminal it is a tqdm bar that
redraws in place; elsewhere (CI logs, ``ray job logs``, a pipe) it is a ``[raylin]`` line at every
tenth of the stage and at its end, so a log holds a handful of lines, each printed once.

Reading the workers' files instead of their consoles means the workers' output need not reach the
driver at all (raylin.train.trainer starts Ray with ``log_to_driver`` only under ``--verbose``), and
works wherever the run's output folder is reachable from the driver, which multi-node runs need
anyway. A record whose step is not above the last one shown means the workers restarted from a
checkpoint; the display says so and goes on from there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

POLL_S = 0.5
LINES_PER_STAGE = 10  # without a terminal: a line at every tenth of the stage, and the last


def append_record(path: str | Path, record: dict) -> None:
    """Append ``record`` to the JSON-lines file ``path`` as one line in one write, so that a follower
    reads whole records only (it waits for the newline)."""
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


@dataclass
class _Tail:
    """New complete lines of a file that another process appends to."""

    path: Path
    offset: int = 0

    def records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as file:
                # A resumed run cuts what a lost attempt logged past its checkpoint (raylin.train.run_files.
                # set_aside_unconfirmed): read on from the new end; the next record is a step already shown.
                self.offset = min(self.offset, os.fstat(file.fileno()).st_size)
                file.seek(self.offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class StageProgress:
    """The display of one stage of ``total`` steps: ``update(step, record)`` with the steps done so
    far and the record of the last (``loss``, ``tokens`` counted so far), ``restarted`` when the
    workers went back to a checkpoint. Called from one thread at a time."""

    def __init__(self, label: str, total: int, terminal: bool | None = None):
        self.label, self.total = label, max(1, total)
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.terminal &= log.isEnabledFor(logging.INFO)  # --quiet: no bar either
        self.first: tuple[int, float, int] | None = None  # (step, time, tokens) of the first record seen
        self.next_line = 0  # without a terminal: the next tenth to print at
        self.bar = (tqdm(total=self.total, desc=f"[raylin] {label}", unit="step", file=sys.stderr, dynamic_ncols=True,
                         bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}")
                    if self.terminal else None)

    def update(self, step: int, record: dict, restarted: bool = False) -> None:
        # The workers' own clock where the record has one (train logs: wall_s of training), so that
        # records read together in one poll still give their real rate.
        now = float(record["wall_s"]) if isinstance(record.get("wall_s"), (int, float)) else time.monotonic()
        if restarted:
            log.info("%s: the workers restarted from a checkpoint and resumed at step %d", self.label, step)
            self.first = None
            self.next_line = step
        if self.first is None:
            self.first = (step, now, int(record.get("tokens", 0)))
        rate = self._tokens_per_s(step, now, int(record.get("tokens", 0)))
        eta = self._eta(step, now)
        loss = record.get("loss")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(", ".join(part for part in (
                f"loss {loss:.4g}" if isinstance(loss, float) else "",
                f"{rate:,.0f} tok/s" if rate else "") if part), refresh=True)
        elif step >= self.next_line or step == self.total:
            log.info("%s: step %d/%d%s%s%s", self.label, step, self.total,
                     f", loss {loss:.4g}" if isinstance(loss, float) else "",
                     f", {rate:,.0f} tokens/s" if rate else "", f", ETA {_clock(eta)}" if eta is not None else "")
            self.next_line = (step * LINES_PER_STAGE // self.total + 1) * self.total / LINES_PER_STAGE

    def _tokens_per_s(self, step: int, now: float, tokens: int) -> float:
        first_step, first_time, first_tokens = self.first
        return (tokens - first_tokens) / (now - first_time) if step > first_step and now > first_time else 0.0

    def _eta(self, step: int, now: float) -> float | None:
        first_step, first_time, _ = self.first
        if step <= first_step or now <= first_time:
            return None
        return (self.total - step) * (now - first_time) / (step - first_step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def follow(label: str, total: int, files: list[Path], step_key: str = "step", terminal: bool | None = None) -> Iterator[None]:
    """Show the progress of a stage of ``total`` steps while the body runs, from the records the
    workers append to ``files`` (JSON lines with ``step_key`` and optionally ``loss`` and
    ``tokens``). Several files (parallel tasks) count their steps together. Records already in the
    files when the body starts (a resumed run's earlier steps) count as done, without a line each."""
    tails = [_Tail(Path(f)) for f in files]
    progress = StageProgress(label, total * len(files), terminal)
    done_by_file = [0] * len(files)
    for i, tail in enumerate(tails):  # what a resumed run did before
        done_by_file[i] = max((int(r.get(step_key, 0)) for r in tail.records()), default=0)
    progress.next_line = sum(done_by_file) + 1
    stop = threading.Event()

    def poll() -> None:
        for i, tail in enumerate(tails):
            for record in tail.records():
                step = int(record.get(step_key, 0))
                restarted = step <= done_by_file[i]  # the workers went back to a checkpoint
                done_by_file[i] = step
                progress.update(sum(done_by_file), record, restarted)

    def run() -> None:
        while not stop.wait(POLL_S):
            try:
                poll()
            except (OSError, ValueError) as error:  # the display must never end the run
                log.debug("progress display: %s", error)

    thread = threading.Thread(target=run, name=f"raylin-progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            poll()  # the last records
        except (OSError, ValueError):
            pass
        progress.close()
