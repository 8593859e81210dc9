"""floe-clock, loaded through its real entry point."""

import os
import subprocess
import sys
from datetime import datetime

import pytest
from floe_clock import now_text

from floe_app.config import Config
from floe_app.plugins import Plugins
from floe_app.session import ChatSession, Finished
from floe_app.store import Store


@pytest.fixture
def plugins():
    return Plugins(env={"FLOE_PLUGINS": "clock"})


def test_entry_point_registers_both_hooks(plugins):
    assert plugins.problems == []
    assert plugins.infos["clock"].hooks == ["register_commands", "register_context_providers"]
    assert plugins.infos["clock"].version == "0.1.0"


def test_time_command_and_date_context(plugins, tmp_path):
    session = ChatSession(Store(tmp_path / "floe.db"), Config(), plugins=plugins)
    shown = session.run_command(None, "/time")
    assert shown.startswith(datetime.now().astimezone().strftime("%A"))
    assert "/time: the current date and time" in session.run_command(None, "/help")
    [context] = plugins.context()
    assert context.startswith("The current date and time is ")


def test_the_local_model_is_told_the_date(plugins, tmp_path):
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = 4
    session = ChatSession(Store(tmp_path / "floe.db"), config, plugins=plugins)
    cid = session.new_conversation()
    engine = session.engine()
    seen = []
    generate = engine.generate

    def spy(tokens, *args, **kwargs):
        seen.append(engine.detokenize(tokens))
        return generate(tokens, *args, **kwargs)

    engine.generate = spy
    events = list(session.reply(cid, "What day is it?"))
    assert isinstance(events[-1], Finished)
    assert "The current date and time is" in seen[0]


def test_now_text_format():
    assert now_text(datetime(2026, 11, 25, 9, 5).astimezone()).startswith(
        "Wednesday 25 November 2026, 09:05")


def test_cli_runs_the_plugin_command(tmp_path):
    env = {**os.environ, "FLOE_HOME": str(tmp_path), "FLOE_PLUGINS": "clock"}
    result = subprocess.run([sys.executable, "-m", "floe_app", "time"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(datetime.now().year) in result.stdout
    listing = subprocess.run([sys.executable, "-m", "floe_app", "plugins", "list"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert "clock 0.1.0  register_commands, register_context_providers" in listing.stdout
