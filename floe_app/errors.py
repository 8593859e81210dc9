"""Errors Floe reports to the user as one line (never a traceback)."""


class FloeError(Exception):
    """A failure the user can act on; str() is the one-line message shown."""


class UsageError(FloeError):
    """The command was called wrongly (exit code 2, like argparse's own errors)."""


class ModelError(FloeError):
    """The model file is missing, unreadable or not a usable GGUF."""


class StoreBusyError(FloeError):
    """Another Floe process holds the database's write lock for too long."""


def one_line(message: BaseException | str, limit: int | None = 300) -> str:
    """A message on one line, at most `limit` characters (None: all of it). A file name, a
    server's answer or a plugin's message may hold newlines and control characters: they
    become spaces."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(message)).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text[:limit]
