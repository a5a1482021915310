"""`cxrnode serve`'s entry: start-time checks, then one process or several listener processes.

Separate from node.runtime.serve (the single-process node) and node.runtime.listeners (several
receiving processes that reuse its parts), so that neither imports the other's caller.
"""

from __future__ import annotations

from node.runtime.config import Settings
from node.runtime.listeners import run_listeners
from node.runtime.preflight import check_start
from node.runtime.serve import restrict_file_modes, run_single


def serve(settings: Settings, source: str = "the configuration") -> int:
    """Run until SIGTERM/SIGINT; returns the exit status. Raises ConfigError, before anything starts,
    for every problem `cxrnode config check` also reports (`node.runtime.preflight`)."""
    restrict_file_modes(settings)
    check_start(settings, source)
    if settings.dicom.listeners > 1:
        # Several receiving processes on one port: one interpreter receives about one core's worth.
        return run_listeners(settings, settings.dicom.listeners)
    return run_single(settings)
