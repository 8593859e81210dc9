"""Floe plugin: `/attach PATH` adds a text file to the chat as local-only context."""

from __future__ import annotations

from pathlib import Path

from floe_app.errors import FloeError
from floe_app.hookspecs import hookimpl

MAX_BYTES = 64_000  # a small local model's context window holds about this much text


def read_text_file(path: Path, limit: int = MAX_BYTES) -> str:
    """The file's text, or a FloeError saying in one line why it cannot be attached."""
    if not path.is_file():
        raise FloeError(f"no such file: {path}")
    size = path.stat().st_size
    if size > limit:
        raise FloeError(f"{path.name} is {size:,} bytes; /attach takes at most {limit:,}")
    data = path.read_bytes()
    if b"\0" in data:
        raise FloeError(f"{path.name} looks binary; /attach takes text files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FloeError(f"{path.name} is not UTF-8 text; /attach takes text files only") \
            from None


def attach(args: str, context) -> str:
    if not args:
        raise FloeError("usage: /attach PATH")
    path = Path(args).expanduser()
    text = read_text_file(path)
    context.attach(f"Contents of the file {path.name}", text)
    return (f"Attached {path.name} ({len(text):,} characters) to this chat: the local model"
            " sees it, a cloud never does.")


@hookimpl
def register_commands(register):
    register("attach", attach, "attach a text file as private context: /attach PATH")
