"""One way to draw and save a results figure: a headless backend, a grid of axes, an atomic save.

    with figure(path, rows=1, cols=2, size=(5, 3.8)) as axes:
        axes[0][0].plot(...)

Every benchmark and sweep plot goes through ``figure``, so backends, layout and file writing stay
the same everywhere. Limits: PNG only (the format comes from the file name, as matplotlib reads it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: benchmarks run on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)

from raylin.atomic import save_atomic  # noqa: E402


@contextmanager
def figure(path: str | Path, rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.0, 4.0),
           dpi: int = 80) -> Iterator[list[list[plt.Axes]]]:
    """Axes ``rows`` x ``cols`` (each panel ``size`` inches), saved to ``path`` atomically with a
    tight layout when the block ends without an error; the figure is closed either way."""
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    try:
        yield axes
        fig.tight_layout()
        save_atomic(Path(path), lambda staging: fig.savefig(staging, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def colours(names: list[str]) -> dict[str, tuple]:
    """A stable colour per name (tab10, cycling)."""
    return {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
