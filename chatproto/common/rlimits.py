"""
Process limits a server raises for itself at start.
"""

from __future__ import annotations

import resource

from twisted.logger import Logger

log = Logger()


def raiseOpenFilesLimit() -> int:
    """
    Raise the soft limit on open files to the hard limit (as nginx's
    C{worker_rlimit_nofile} would): every connection is a file descriptor,
    and Debian's default soft limit of 1024 is far below what one process
    holds.  Returns the limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warn(
                "cannot raise the open files limit from {soft} to {hard}: {e}",
                soft=soft, hard=hard, e=e,
            )
            return soft
        log.info("open files limit raised from {soft} to {hard}", soft=soft, hard=hard)
    return hard
