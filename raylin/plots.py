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

from raylin.atomic import save_atomic


def _pyplot():
    """pyplot on the headless backend. Imported on first use, not at module import: modules that
    plot (sweeps among them) also run in every Tune trial process, which never draws."""
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on servers and in CI
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(path: str | Path, rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.0, 4.0),
           dpi: int = 80) -> Iterator[list]:
    """Axes ``rows`` x ``cols`` (each panel ``size`` inches), saved to ``path`` atomically with a
    tight layout when the block ends without an error; the figure is closed either way."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    try:
        yield axes
        fig.tight_layout()
        save_atomic(Path(path), lambda staging: fig.savefig(staging, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def colours(names: list[str]) -> dict[str, tuple]:
    """A stable colour per name (tab10, cycling)."""
    return {name: _pyplot().get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
