"""The library's one logger, `lmprune`, and the command line's handler for it.

Library modules log to `logger` (or a child, `logging.getLogger("lmprune.x")`) and never print. Messages
go to the stderr of the moment (so a test's captured stderr gets them too), as written, as the library's
warnings always did; the command line calls `configure` once it knows its rank, so that torchrun's other
ranks do not repeat every line.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lmprune")


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a message is emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure(rank0: bool) -> None:
    """Messages of level INFO and above to stderr, as written; none from a rank other than 0."""
    for handler in [h for h in logger.handlers if isinstance(h, _CurrentStderr)]:
        logger.removeHandler(handler)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not rank0:
        handler.addFilter(lambda record: False)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


configure(rank0=True)
