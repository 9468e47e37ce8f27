"""The base of jaxsplit's own error types.

Every error that jaxsplit raises for bad input (a config, a data file, a checkpoint, a run
folder, a mask file) derives from `JaxsplitError`; the command line prints those as a message
and exits with status 2, and shows the traceback of anything else (a bug). Each concrete error
class also keeps its historical builtin base (mostly `ValueError`), so `except ValueError`
code keeps working.
"""

from __future__ import annotations

__all__ = ["JaxsplitError", "RunLockedError", "RunFolderError"]


class JaxsplitError(Exception):
    """Bad input that jaxsplit explains in its message (the CLI: exit status 2, no traceback)."""


class RunLockedError(JaxsplitError, RuntimeError):
    """A run folder is being written by another jaxsplit process."""


class RunFolderError(JaxsplitError, FileNotFoundError):
    """A run folder that does not exist or lacks what a stage needs."""
