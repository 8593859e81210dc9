"""Plugins through real entry points, including ones that break, raise or hang.

The faulty plugins are installed the way pip would leave them: a `*.dist-info` folder with
an `entry_points.txt` next to their modules, on sys.path (PYTHONPATH for subprocesses).
"""

import json
import textwrap

import pytest

from floe_app.config import Config
from floe_app.errors import FloeError
from floe_app.plugins import Plugins
from floe_app.session import ChatSession, Finished
from floe_app.store import Store
from tests.conftest import run_floe

MODULES = {
    "plug_broken": "raise ImportError('needs a library that is not installed')\n",
    "plug_raises": """
        from floe_app.hookspecs import hookimpl

        @hookimpl
        def register_commands(register):
            raise RuntimeError("bug in the plugin")
    """,
    "plug_hangs": """
        import time
        from floe_app.hookspecs import hookimpl

        @hookimpl
        def register_context_providers(register):
            time.sleep(30)
    """,
    "plug_good": """
        from floe_app.hookspecs import hookimpl

        @hookimpl
        def register_commands(register):
            register("echo", lambda args, context: args.upper(), "shout it back")
            register("boom", lambda args, context: 1 / 0, "always fails")

        @hookimpl
        def register_context_providers(register):
            register("motto", lambda: "The user's motto is carpe diem.")

        @hookimpl
        def register_redaction_rules(register):
            register("tickets", r"TICKET-\\d+")
    """,
    "plug_flaky": """
        from floe_app.hookspecs import hookimpl

        @hookimpl
        def register_context_providers(register):
            register("flaky", lambda: 1 / 0)
    """,
}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    for module, source in MODULES.items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        info = folder / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        name = module.removeprefix("plug_")
        (info / "entry_points.txt").write_text(f"[floe]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_faulty_plugins_are_reported_in_one_line_and_disabled(plugin_dir):
    plugins = Plugins(env={}, timeout_s=0.5)
    assert set(plugins.infos) >= {"broken", "raises", "hangs", "good"}
    assert "could not be loaded (ImportError" in plugins.infos["broken"].error
    commands = plugins.commands()
    assert "failed in register_commands (RuntimeError: bug" in plugins.infos["raises"].error
    assert set(commands) >= {"echo", "boom"}
    context = plugins.context()
    assert "no answer within 0.5 s" in plugins.infos["hangs"].error
    assert "The user's motto is carpe diem." in context
    assert all("\n" not in p and p.endswith("it is disabled") for p in plugins.problems)
    assert not plugins.infos["good"].error and plugins.manager.get_plugin("broken") is None


def test_a_command_that_raises_disables_its_plugin_and_nothing_else(plugin_dir, tmp_path):
    plugins = Plugins(env={"FLOE_PLUGINS": "good"})
    session = ChatSession(Store(tmp_path / "floe.db"), Config(), plugins=plugins)
    assert session.run_command(None, "/echo hello") == "HELLO"
    with pytest.raises(FloeError, match=r"plugin good failed in /boom .*ZeroDivisionError"):
        session.run_command(None, "/boom")
    with pytest.raises(FloeError, match="no command /echo"):
        session.run_command(None, "/echo again")


def test_floe_plugins_limits_what_loads(plugin_dir):
    assert set(Plugins(env={"FLOE_PLUGINS": "good"}).infos) == {"good"}
    assert Plugins(env={"FLOE_PLUGINS": ""}).infos == {}


def test_the_built_in_commands_are_a_plugin_loaded_whatever_floe_plugins_says(plugin_dir,
                                                                               tmp_path):
    none = Plugins(env={"FLOE_PLUGINS": ""})
    assert set(none.commands()) == {"remember", "memories", "forget", "help"}
    assert none.infos == {}  # not an installed plugin: floe plugins list leaves it out
    session = ChatSession(Store(tmp_path / "floe.db"), Config(),
                          plugins=Plugins(env={"FLOE_PLUGINS": "good"}))
    assert session.run_command(None, "/remember I like tea").startswith("Remembered (note 1)")
    assert session.run_command(None, "/memories") == "1. I like tea"
    listed = session.run_command(None, "/help").splitlines()
    assert listed[:4] == ["/remember: remember a fact about you: /remember TEXT",
                          "/memories: list what Floe remembers",
                          "/forget: forget a memory note: /forget N",
                          "/help: list every command"]
    assert any(line.startswith("/echo: ") for line in listed[4:])
    assert session.run_command(None, "/") == session.run_command(None, "/help")


def test_plugin_redaction_rules_and_context_reach_the_right_places(plugin_dir, tmp_path,
                                                                     engine):
    plugins = Plugins(env={"FLOE_PLUGINS": "good"})
    session = ChatSession(Store(tmp_path / "floe.db"), Config(), plugins=plugins)
    cid = session.new_conversation()
    assert "The user's motto is carpe diem." in session.private_notes(cid)
    from floe_app.engine.redact import Redactor

    redactor = Redactor(patterns=plugins.redaction_patterns())
    assert redactor.redact("see TICKET-4521 today") == "see [TERM_1] today"


def test_the_cli_keeps_working_with_faulty_plugins(plugin_dir, tmp_path):
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text("[chat]\ntemperature = 0.0\nmax_tokens = 8\n")
    env = {"PYTHONPATH": str(plugin_dir), "FLOE_PLUGINS": "broken,raises,good"}
    listing = run_floe("plugins", "list", "--json", env_home=home, extra_env=env)
    assert listing.returncode == 0
    infos = {i["name"]: i for i in json.loads(listing.stdout)}
    assert infos["broken"]["error"] and infos["raises"]["error"] and not infos["good"]["error"]
    answer = run_floe("ask", "hi", env_home=home, extra_env=env)
    assert answer.returncode == 0 and answer.stdout.strip()
    assert "floe: warning: plugin broken could not be loaded" in answer.stderr
    echo = run_floe("echo", "quiet", "please", env_home=home, extra_env=env)
    assert echo.returncode == 0 and echo.stdout.strip() == "QUIET PLEASE"
    unknown = run_floe("no-such-thing", env_home=home, extra_env=env)
    assert unknown.returncode == 2


async def test_slash_commands_in_the_tui(plugin_dir, paths, config, tmp_path, monkeypatch):
    from floe_app.tui.app import FloeApp
    from floe_app.tui.widgets.chat import MessageView
    from floe_app.tui.widgets.prompt import PromptInput

    monkeypatch.setenv("FLOE_PLUGINS", "good,raises")
    app = FloeApp(ChatSession.open(paths, config), export_dir=tmp_path)
    async with app.run_test(size=(110, 36)) as pilot:
        for _ in range(100):
            if app.session.plugins is not None:
                break
            await pilot.pause(0.05)
        app.query_one(PromptInput).text = "/echo hi there"
        await pilot.press("enter")
        for _ in range(100):
            notices = [v.content for v in app.query(MessageView) if v.role == "notice"]
            if notices:
                break
            await pilot.pause(0.05)
        assert notices == ["`/echo hi there`\n\nHI THERE"]
        assert app.store.messages(app.conversation_id) == []  # commands never reach a model
        assert any("plugin raises failed" in n.message for n in app._notifications)
        app.query_one(PromptInput).text = "/nope"
        await pilot.press("enter")
        for _ in range(100):
            notices = [v.content for v in app.query(MessageView) if v.role == "notice"]
            if len(notices) == 2:
                break
            await pilot.pause(0.05)
        assert notices[1].startswith("`/nope` failed")


def test_a_reply_still_works_when_a_context_provider_raises(tmp_path, engine, plugin_dir):
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = 4
    config.model.context_tokens = engine.n_ctx
    session = ChatSession(Store(tmp_path / "floe.db"), config,
                          plugins=Plugins(env={"FLOE_PLUGINS": "flaky"}), engine=engine)
    events = list(session.reply(session.new_conversation(), "hello"))
    assert isinstance(events[-1], Finished) and events[-1].status == "complete"
    assert "failed in context provider flaky (ZeroDivisionError" in session.plugins.problems[0]
