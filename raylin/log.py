"""raylin's console: every module logs to ``logging.getLogger(__name__)`` (under "raylin"), and
``setup_logging`` gives that tree one handler, in the driver and in every Ray worker process.

Lines read ``[raylin] message`` on stderr. The handler does not propagate to the root logger, so
libraries that configure the root (Ray Train's worker logging among them) do not print raylin's
lines a second time. Limits: Ray forwards a worker's stderr to the driver's console with its
``(RayTrainWorker pid=...)`` prefix; that prefix is Ray's.
"""

from __future__ import annotations

import logging
import sys

_HANDLER_NAME = "raylin-console"


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Attach raylin's console handler once per process (INFO, or DEBUG with ``verbose``)."""
    logger = logging.getLogger("raylin")
    if not any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("[raylin] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return logger
