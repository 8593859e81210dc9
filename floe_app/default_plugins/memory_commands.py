"""The built-in slash commands: /remember, /memories, /forget and /help.

A plugin like the installed ones (floe_app/hookspecs.py), registered by `Plugins` whatever
FLOE_PLUGINS says, as llm's default plugins are. `floe remember`, `floe memories` and
`floe forget` use the same texts through the functions below.
"""

from __future__ import annotations

from typing import Any

from floe_app.errors import FloeError
from floe_app.hookspecs import hookimpl
from floe_app.store import Store

NAME = "builtin"  # the plugin name its commands are registered under


def remembered(note_id: int) -> str:
    return (f"Remembered (note {note_id}). The local model knows it from now on; a cloud"
            " never sees it. /memories lists notes, /forget N removes one.")


def listed_memories(store: Store) -> str:
    return "\n".join(f"{i}. {text}" for i, text in store.memories()) or "No memory notes yet."


def forget(store: Store, which: str) -> str:
    """Forget memory note `which` (its number as typed); FloeError if there is none."""
    if not which.isdigit() or not store.delete_memory(int(which)):
        raise FloeError(f"no memory note {which or '?'}: /memories lists them")
    return f"Forgot note {which}."


def listed_commands(commands: dict[str, Any]) -> str:
    """Every command and its help, the built-in ones first."""
    ordered = sorted(commands.values(), key=lambda command: command.plugin != NAME)
    return "\n".join(f"/{command.name}: {command.help}" for command in ordered)


@hookimpl
def register_commands(register: Any) -> None:
    register("remember", lambda args, context: remembered(context.session.remember(args)),
             "remember a fact about you: /remember TEXT")
    register("memories", lambda args, context: listed_memories(context.session.store),
             "list what Floe remembers")
    register("forget", lambda args, context: forget(context.session.store, args),
             "forget a memory note: /forget N")
    register("help", lambda args, context: listed_commands(context.commands),
             "list every command")
