"""raylin's console: every module logs to ``logging.getLogger(__name__)`` (under "raylin"), and
``setup_logging`` gives that tree one handler, in the driver and in every Ray worker process.

Lines read ``[raylin] message`` on stderr. The handler does not propagate to the root logger, so
libraries that configure the root (Ray Train's worker logging among them) do not print raylin's
lines a second time. Long stages show their progress from the driver (raylin.progress). The Ray
workers' output, raylin's worker lines included, reaches the console only under ``--verbose``
(raylin.train.trainer starts Ray with ``log_to_driver`` then), with Ray's ``(RayTrainWorker pid=...)``
prefix.
"""

from __future__ import annotations

import logging
import os
import sys

import huggingface_hub
import transformers

_HANDLER_NAME = "raylin-console"
# The console level, set by `raylin --verbose / --quiet` in the driver and carried to every Ray
# worker in its environment (raylin.train.trainer forwards it), so workers log at the driver's level.
LEVEL_ENV = "RAYLIN_LOG_LEVEL"
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
# Libraries' start-up chatter, hidden below --verbose: transformers' weight-load reports and
# advisory warnings, and Hugging Face progress bars (one weight-loading bar per worker). Set in
# the environment, so the libraries read them at import, here and in every Ray worker (the
# trainer forwards them); a value the user set is kept.
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when the handler was made: a
    handler made before stderr was redirected (a test's capture, ``contextlib.redirect_stderr``)
    would otherwise write to the old stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


def setup_logging(level: str | None = None) -> logging.Logger:
    """Attach raylin's console handler once per process, at ``level`` (quiet: warnings and errors
    only; normal: progress; verbose: debug), by default this process's RAYLIN_LOG_LEVEL, else
    normal. Below verbose, also quiets the libraries (``QUIET_LIBRARIES``) for what imports them next."""
    level = level or os.environ.get(LEVEL_ENV) or "normal"
    if level not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={level!r} is not a log level; use one of {sorted(LEVELS)}.")
    logger = logging.getLogger("raylin")
    if not any(handler.get_name() == _HANDLER_NAME for handler in logger.handlers):
        handler = _ConsoleHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("[raylin] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    logger.propagate = False
    if level != "verbose":
        for name, value in QUIET_LIBRARIES.items():
            os.environ.setdefault(name, value)
        # This process imported transformers before it could read the environment (``import raylin``
        # does): quiet its copy directly. Processes started from here read the environment.
        if os.environ["TRANSFORMERS_VERBOSITY"] == QUIET_LIBRARIES["TRANSFORMERS_VERBOSITY"]:
            transformers.utils.logging.set_verbosity_error()
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == QUIET_LIBRARIES["HF_HUB_DISABLE_PROGRESS_BARS"]:
            transformers.utils.logging.disable_progress_bar()
            huggingface_hub.utils.disable_progress_bars()
    return logger
