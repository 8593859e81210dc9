"""Errors Floe reports to the user as one line (never a traceback)."""


class FloeError(Exception):
    """A failure the user can act on; str() is the one-line message shown."""


class UsageError(FloeError):
    """The command was called wrongly (exit code 2, like argparse's own errors)."""


class ModelError(FloeError):
    """The model file is missing, unreadable or not a usable GGUF."""


class StoreBusyError(FloeError):
    """Another Floe process holds the database's write lock for too long."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]
