"""Finding and calling plugins (entry point group `floe`), so that none can take Floe down.

Each plugin is loaded on its own and every call into it runs with a time limit: a plugin
that fails to import, raises or hangs is reported in one line and disabled, and Floe goes
on without it. FLOE_PLUGINS=name,name loads only those; FLOE_PLUGINS= (empty) loads none.
The built-in commands (default_plugins/) are registered whatever FLOE_PLUGINS says.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from floe_app import hookspecs
from floe_app.default_plugins import memory_commands
from floe_app.errors import FloeError, one_line

ENTRY_POINT_GROUP = "floe"
CALL_TIMEOUT_S = 3.0


@dataclass
class Command:
    name: str
    function: Callable[[str, Any], str]
    help: str
    plugin: str


@dataclass
class PluginInfo:
    name: str
    version: str
    hooks: list[str] = field(default_factory=list)
    error: str = ""


def allowed_plugins(env: dict[str, str]) -> set[str] | None:
    """None: load every installed plugin; otherwise only the names listed."""
    value = env.get("FLOE_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def call_with_timeout(function: Callable[[], Any], timeout_s: float) -> Any:
    """Run function in a thread; raise TimeoutError if it has not returned in time (the
    thread is left behind as a daemon: Python cannot stop it, but Floe stops waiting)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="floe-plugin")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _failure(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}", 200)


class Plugins:
    """The installed plugins, loaded once; use `problems` to tell the user what went wrong."""

    def __init__(self, env: dict[str, str] | None = None,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        import os

        self.timeout_s = timeout_s
        self.manager = pluggy.PluginManager("floe")
        self.manager.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.problems: list[str] = []
        self._commands: dict[str, Command] | None = None
        # The built-in commands first, whatever FLOE_PLUGINS says.
        self.manager.register(memory_commands, name=memory_commands.NAME)
        allowed = allowed_plugins(dict(os.environ) if env is None else env)
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and entry.name not in allowed:
                continue
            self._load(entry)

    def _load(self, entry: Any) -> None:
        version = entry.dist.version if entry.dist is not None else "?"
        info = self.infos[entry.name] = PluginInfo(entry.name, version)
        try:
            module = call_with_timeout(entry.load, self.timeout_s)
            self.manager.register(module, name=entry.name)
        except Exception as exc:
            self._disable(entry.name, f"could not be loaded ({_failure(exc)})")
            return
        info.hooks = sorted(caller.name for caller in self.manager.get_hookcallers(module) or [])

    def _disable(self, name: str, reason: str) -> None:
        if name in self.infos:  # (the built-in plugin has no entry point)
            self.infos[name].error = reason
        self.problems.append(f"plugin {name} {reason}; it is disabled")
        if self.manager.get_plugin(name) is not None:
            self.manager.unregister(name=name)
        if self._commands is not None:
            self._commands = {k: c for k, c in self._commands.items() if c.plugin != name}

    def _registrations(self, hook: str) -> list[tuple[str, tuple[Any, ...]]]:
        found: list[tuple[str, tuple[Any, ...]]] = []
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            calls: list[tuple[Any, ...]] = []
            try:
                call_with_timeout(lambda impl=impl, calls=calls: impl.function(
                    register=lambda *args: calls.append(args)), self.timeout_s)
            except Exception as exc:
                self._disable(impl.plugin_name, f"failed in {hook} ({_failure(exc)})")
                continue
            found += [(impl.plugin_name, call) for call in calls]
        return found

    def commands(self) -> dict[str, Command]:
        if self._commands is None:
            self._commands = {}
            for plugin, args in self._registrations("register_commands"):
                name, function, *rest = args
                self._commands[name] = Command(name, function, rest[0] if rest else "", plugin)
        return self._commands

    def run_command(self, name: str, args: str, context: Any) -> str:
        command = self.commands().get(name)
        if command is None:
            raise FloeError(f"no command /{name}; /help lists them")
        if command.plugin == memory_commands.NAME:  # Floe's own: no thread, no time limit
            return command.function(args, context)
        try:
            result = call_with_timeout(lambda: command.function(args, context), self.timeout_s)
        except FloeError:
            raise
        except Exception as exc:
            self._disable(command.plugin, f"failed in /{name} ({_failure(exc)})")
            raise FloeError(self.problems[-1]) from exc
        return "" if result is None else str(result)

    def context(self) -> list[str]:
        """Texts from every context provider, for the local model only."""
        texts = []
        for plugin, (name, function) in self._registrations("register_context_providers"):
            try:
                text = call_with_timeout(function, self.timeout_s)
            except Exception as exc:
                self._disable(plugin, f"failed in context provider {name} ({_failure(exc)})")
                continue
            if text:
                texts.append(str(text))
        return texts

    def redaction_patterns(self) -> list[re.Pattern[str]]:
        patterns = []
        for plugin, (name, pattern) in self._registrations("register_redaction_rules"):
            try:
                patterns.append(re.compile(pattern))
            except (re.error, TypeError) as exc:
                self._disable(plugin, f"gave a bad redaction rule {name} ({_failure(exc)})")
        return patterns
