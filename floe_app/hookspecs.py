"""What a Floe plugin can add. A plugin is a Python package with an entry point in the
`floe` group pointing at a module that implements some of these hooks:

    # pyproject.toml
    [project.entry-points.floe]
    clock = "floe_clock"

    # floe_clock.py
    from floe_app.hookspecs import hookimpl

    @hookimpl
    def register_commands(register):
        register("time", lambda args, context: time.strftime("%H:%M"), "show the time")
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("floe")
hookimpl = pluggy.HookimplMarker("floe")


@hookspec
def register_commands(register: Any) -> None:
    """Add slash commands, usable as `/NAME ARGS` in the chat and `floe NAME ARGS`.

    Call `register(name, function, help)`. `function(args: str, context)` returns the text
    to show; `context.attach(label, text)` adds text to the conversation as private context
    (given to the local model only, never to a cloud).
    """


@hookspec
def register_context_providers(register: Any) -> None:
    """Add text the local model sees with every message (never sent to a cloud).

    Call `register(name, function)`; `function()` returns a short text, or None for nothing.
    """


@hookspec
def register_redaction_rules(register: Any) -> None:
    """Add what must never reach a cloud: `register(name, pattern)` with a regular
    expression; matches are replaced by placeholders before sending, restored in replies."""
