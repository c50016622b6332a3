"""`raylin tune` as a Ray job: a Ray Tune sweep over the config's tune: section (add --resume to continue one).

    ray job submit --working-dir . -- python jobs/tune.py CONFIG.yaml [--set key=value ...]

The same command works against a laptop's local Ray (`ray start --head`, then RAY_ADDRESS
http://127.0.0.1:8265) and a remote cluster; jobs/README.md explains runtime environments and
where outputs go.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the uploaded copy of raylin wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylin.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("tune"))
