"""The benchmark harnesses behind ``raylin bench``, one module per command, and their grids
(grids/, package data):

    speed.py       ``raylin bench speed``: latency / memory against length; the shipped models
    throughput.py  ``raylin bench distill``: the distillation step against a plain loop; bf16 scores
    quality.py     ``raylin bench quality``: teacher vs students on text, LM and speech (grids/quality.yaml)
    cluster.py     ``raylin bench cluster``: teacher traffic per node on simulated nodes
    scale.py       ``raylin bench scale``: align-task peaks, ZeRO memory, a 1.1B conversion
    recovery.py    ``raylin bench faults``: the fault soak (faults injected by raylin.fault_injection)

What they measure with lives outside this package, where the runs use it too: scores and retention
in raylin.scoring, timings in raylin.timing, figures in raylin.plots. Nothing outside this package
imports it (the tests and the command line aside).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# The run configs raylin ships (raylin/configs/, package data, the files users run too), which the
# speed, distill, cluster and scale harnesses read: found in the installed package, not a checkout.
# A folder on disk, as pip installs raylin (not from a zip).
SHIPPED_CONFIGS = Path(str(resources.files("raylin") / "configs"))
