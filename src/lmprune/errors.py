"""The one exception type the CLI turns into a single clear line on stderr."""


class LmpruneError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
