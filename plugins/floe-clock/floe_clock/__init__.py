"""Floe plugin: `/time` (and `floe time`), and today's date as local-only context."""

from __future__ import annotations

from datetime import datetime

from floe_app.hookspecs import hookimpl


def now_text(now: datetime | None = None) -> str:
    now = now or datetime.now().astimezone()
    return f"{now:%A %d %B %Y, %H:%M} ({now:%Z})"


@hookimpl
def register_commands(register):
    register("time", lambda args, context: now_text(), "the current date and time")


@hookimpl
def register_context_providers(register):
    # Small models cannot know the date: tell the local one (the cloud never sees this).
    register("date", lambda: f"The current date and time is {now_text()}.")
