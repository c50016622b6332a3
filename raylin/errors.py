"""Errors that mean bad input from the environment rather than a bug: the command line prints their
message (what is wrong and what to do) without a traceback. Importing this module loads nothing
heavy, so ``raylin.cli`` can catch them at its top level."""

from __future__ import annotations


class RayClusterUnreachable(RuntimeError):
    """The Ray cluster this process would connect to answers nothing: it was stopped or it died."""


class ConfigError(ValueError):
    """A config (or a path, data source or output folder it names) that cannot run. ``problems``:
    every problem found, each naming the key and the fix; the message lists them one per line."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


class RunInProgress(RuntimeError):
    """Another run holds the output folder (raylin.run_lock): the message names the folder, the holder
    and the fix (``--wait``, or another output_dir)."""
