"""What ``data.max_train_examples`` and ``data.max_eval_examples`` mean, for every data set.

* ``max_train_examples``: a seeded random subset of the training examples (``data.seed``).
  Examples are what a training index addresses: texts, clips, or language-model
  windows of ``data.max_length`` tokens.
* ``max_eval_examples`` (and an evaluation set's ``max_examples``): an even spread over the held-out
  examples, first and last included, so every part of the set is scored.

Unset (None) keeps everything. Exception: a corpus read through token shards (``pile``, ``corpus``:
raylin.data.shards) keeps its *first* windows in source order under both caps, so a stream is read
only as far as the caps need.
"""

from __future__ import annotations

import numpy as np


def subset_rows(size: int, cap: int | None, seed: int = 0, spread: bool = True) -> list[int] | None:
    """Rows to keep of ``size`` under a cap: None (all) when ``cap`` is None or not below ``size``;
    else an even spread (``spread``: held-out sets) or a seeded random choice, in row order."""
    if cap is None or cap >= size:
        return None
    if spread:
        return np.linspace(0, size - 1, cap).round().astype(int).tolist()
    return sorted(np.random.default_rng(seed).choice(size, cap, replace=False).tolist())


def train_rows(size: int, cap: int | None, seed: int) -> list[int]:
    """The training rows kept of ``size`` under ``max_train_examples`` = ``cap``: all, or a seeded random subset."""
    rows = subset_rows(size, cap, seed, spread=False)
    return list(range(size)) if rows is None else rows


def eval_rows(size: int, cap: int | None) -> list[int]:
    """The held-out rows kept of ``size`` under ``max_eval_examples`` = ``cap``: all, or an even spread."""
    rows = subset_rows(size, cap)
    return list(range(size)) if rows is None else rows
