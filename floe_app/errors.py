"""Errors Floe reports to the user as one line (never a traceback)."""


class FloeError(Exception):
    """A failure the user can act on; str() is the one-line message shown."""


class UsageError(FloeError):
    """The command was called wrongly (exit code 2, like argparse's own errors)."""


class ModelError(FloeError):
    """The model file is missing, unreadable or not a usable GGUF."""


class StoreBusyError(FloeError):
    """Another Floe process holds the database's write lock for too long."""
