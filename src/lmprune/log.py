"""lmprune's one logger: `lmprune: MESSAGE` lines on stderr, from rank 0 alone under torchrun.

Library modules log to `logger` (or `logging.getLogger("lmprune")`). The handler is installed on import, so
the library's progress and warnings reach stderr as they always did (a caller who wants them elsewhere
removes `lmprune.log._handler` or sets the logger's level); the command line calls `configure` once it knows
its rank."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lmprune")


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a test's capture, a rank's own file), not to
    the one it was when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


class _Rank0:
    """Under torchrun every process runs the same steps: rank 0 alone reports progress, while an error is
    printed by whichever process meets it (the others may never reach rank 0's next exchange)."""

    def __init__(self, rank0: bool) -> None:
        self.rank0 = rank0

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank0 or record.levelno >= logging.ERROR


_handler = _Stderr()
_handler.setFormatter(logging.Formatter("lmprune: %(message)s"))


def configure(rank0: bool) -> None:
    """Send lmprune's messages to stderr, progress only if `rank0` (this process speaks for the run).
    Called again (another in-process run, another rank), it replaces its own earlier setting."""
    for old in list(_handler.filters):
        _handler.removeFilter(old)
    _handler.addFilter(_Rank0(rank0))
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the handler above prints each line once, whatever the host's root logger does


configure(rank0=True)
