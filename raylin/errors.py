"""Errors that mean bad input from the environment rather than a bug: the command line prints their
message (what is wrong and what to do) without a traceback. Importing this module loads nothing
heavy, so ``raylin.cli`` can catch them at its top level."""

from __future__ import annotations


class RayClusterUnreachable(RuntimeError):
    """The Ray cluster this process would connect to answers nothing: it was stopped or it died."""
