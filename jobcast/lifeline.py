"""Children of `jobcast serve` stop when serve is gone, even when it was SIGKILLed.

Serve holds the only write end of a pipe and hands the read end to each Python child, naming
it in JOBCAST_LIFELINE_FD. The kernel closes the write end whatever way serve dies, so the
child's read returns EOF: the child then stops gracefully, and exits outright if that takes
longer than PARENT_GONE_EXIT_S (a thread stuck in a model must not keep it alive). A `jobcast
api` or `jobcast worker` started by hand gets no lifeline and watches nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("jobcast.lifeline")

LIFELINE_ENV = "JOBCAST_LIFELINE_FD"
PARENT_GONE_EXIT_S = 3.0
"""From the parent's death to this process's exit at the latest (the promise is 5 s)."""
PARENT_GONE_GRACE_S = 1.0
"""What a worker's running jobs get to finish once serve is gone; unfinished ones are redelivered."""


class Lifeline:
    """The supervisor's end: a pipe whose write end never leaves this process."""

    def __init__(self) -> None:
        # os.pipe() descriptors are not inheritable: only the read end, passed on purpose, is.
        self.read_fd, self._write_fd = os.pipe()

    def env(self) -> dict[str, str]:
        """What tells a child which descriptor to watch."""
        return {LIFELINE_ENV: str(self.read_fd)}

    def close(self) -> None:
        """Release both ends (the children have been stopped)."""
        os.close(self.read_fd)
        os.close(self._write_fd)


def watch_parent(on_parent_gone: Callable[[], None]) -> None:
    """If serve started this process, call `on_parent_gone` (from a thread) once serve is gone.

    `on_parent_gone` must begin a graceful stop and return; the process exits
    PARENT_GONE_EXIT_S later if it is still running.
    """
    value = os.environ.pop(LIFELINE_ENV, "")  # not for this process's own children
    if not value:
        return
    fd = int(value)

    def wait_for_eof() -> None:
        while os.read(fd, 1):  # serve never writes; anything read is ignored
            pass
        log.warning("jobcast serve is gone: stopping")
        try:
            on_parent_gone()
        except Exception:  # the deadline below still holds
            log.exception("could not begin a graceful stop")
        time.sleep(PARENT_GONE_EXIT_S)
        log.error("still running %.0f s after serve died: exiting now", PARENT_GONE_EXIT_S)
        os._exit(1)

    threading.Thread(target=wait_for_eof, name="lifeline", daemon=True).start()
