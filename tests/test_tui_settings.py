"""Settings (F2) driven as a user would: tabs clicked, switches flipped, choices picked,
text typed; each bad value's error shown beside its field."""

from textual.app import App
from textual.widgets import Select, Switch, TabbedContent

from floe_app.config import Config, load_config, setting_specs
from floe_app.tui.screens.settings import SettingsScreen
from tests.test_tui import SIZE, make_app


class SettingsHost(App):
    """A tiny app that opens only the settings screen."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.result = "unset"

    def on_mount(self):
        self.push_screen(SettingsScreen(self.config), lambda r: setattr(self, "result", r))


async def open_tab(pilot, title):
    tabs = pilot.app.screen.query_one(TabbedContent)
    await pilot.click(tabs.get_tab(f"tab-{title.lower()}"))
    await pilot.pause()
    assert tabs.active == f"tab-{title.lower()}"


async def click(pilot, selector):
    """Scroll the field into view, as a user would, and click it."""
    pilot.app.screen.query_one(selector).scroll_visible(animate=False)
    await pilot.pause()
    await pilot.click(selector)
    await pilot.pause()


async def type_into(pilot, selector, text):
    await click(pilot, selector)
    await pilot.press("ctrl+a", "ctrl+k", *text)  # to the start, delete the rest, type


CHOICES = {spec.key: spec.choices for spec in setting_specs()}


async def choose(pilot, selector, value):
    """Open the list and pick `value` with the arrow keys."""
    select = pilot.app.screen.query_one(selector, Select)
    options = CHOICES[selector.removeprefix("#").replace("-", ".", 1)]
    steps = options.index(value) - options.index(select.value)
    await click(pilot, selector)
    await pilot.press(*(["down"] * steps if steps > 0 else ["up"] * -steps), "enter")
    await pilot.pause()
    assert select.value == value


def error_beside(screen, key):
    return str(screen.query_one(f"#{key.replace('.', '-')}-error").render())


async def test_settings_are_grouped_in_tabs_with_switches_and_choices():
    host = SettingsHost(Config())
    async with host.run_test(size=SIZE) as pilot:
        screen = host.screen
        titles = [str(tab.label) for tab in screen.query_one(TabbedContent).query("ContentTab")]
        assert titles == ["Chat", "Model", "Cloud", "Learning", "Federation", "Privacy"]
        assert isinstance(screen.query_one("#privacy-local_only"), Switch)
        assert isinstance(screen.query_one("#learning-paused"), Switch)
        assert screen.query_one("#chat-mode", Select).value == "auto"
        await choose(pilot, "#chat-mode", "cloud")  # one of "auto", "local", "cloud", "fused"
        await open_tab(pilot, "Federation")
        pane = screen.query_one("#tab-federation")
        first = pane.query("Switch, Input, Select").first()
        assert first.id == "federation-enabled"  # the opt-in comes first


async def test_each_bad_value_is_named_beside_its_field_and_nothing_is_saved():
    host = SettingsHost(Config())
    async with host.run_test(size=SIZE) as pilot:
        screen = host.screen
        await type_into(pilot, "#chat-temperature", "very hot")
        await open_tab(pilot, "Model")
        await type_into(pilot, "#model-threads", "many")
        await open_tab(pilot, "Privacy")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.screen is screen and host.result == "unset"
        assert error_beside(screen, "chat.temperature") == \
            "chat.temperature: expected a number from 0 to 2 (0 = always the likeliest token)"
        assert error_beside(screen, "model.threads").startswith(
            "model.threads: expected a whole number from 0 to 256")
        assert error_beside(screen, "chat.max_tokens") == ""  # a good value says nothing
        assert str(screen.query_one("#error").render()).endswith("(and 1 more)")
        # The first bad field is shown and focused.
        assert screen.query_one(TabbedContent).active == "tab-chat"
        assert screen.focused is screen.query_one("#chat-temperature")
        await type_into(pilot, "#chat-temperature", "0.3")
        await open_tab(pilot, "Model")
        await type_into(pilot, "#model-threads", "3")
        await open_tab(pilot, "Chat")
        await click(pilot, "#chat-system_prompt")
        await pilot.press("f7", *"Answer like a pirate.")  # select all, type over it
        await pilot.press("ctrl+s")
        await pilot.pause()
    assert host.result.chat.temperature == 0.3 and host.result.model.threads == 3
    assert host.result.chat.system_prompt == "Answer like a pirate."


async def test_switches_choices_and_lists_are_saved():
    host = SettingsHost(Config())
    async with host.run_test(size=SIZE) as pilot:
        await choose(pilot, "#chat-mode", "fused")
        await open_tab(pilot, "Privacy")
        await click(pilot, "#privacy-local_only")
        await type_into(pilot, "#privacy-redact_terms", "Biscotti, Ada Lovelace ,")
        await open_tab(pilot, "Cloud")
        await type_into(pilot, "#cloud-base_url", "http://127.0.0.1:9/v1")
        await choose(pilot, "#cloud-endpoint", "completions")
        await open_tab(pilot, "Learning")
        await click(pilot, "#learning-auto")
        await pilot.press("ctrl+s")
        await pilot.pause()
    result = host.result
    assert result.chat.mode == "fused" and result.cloud.endpoint == "completions"
    assert result.privacy.local_only is True and result.learning.auto is False
    assert result.privacy.redact_terms == ["Biscotti", "Ada Lovelace"]
    assert result.cloud.base_url == "http://127.0.0.1:9/v1"


async def test_settings_screen_cancel_changes_nothing():
    host = SettingsHost(Config())
    async with host.run_test(size=SIZE) as pilot:
        await type_into(pilot, "#chat-max_tokens", "5")
        await pilot.press("escape")
        await pilot.pause()
    assert host.result is None


async def test_settings_saved_from_the_app_reach_the_file_and_the_session(paths, config,
                                                                          tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        assert isinstance(app.screen, SettingsScreen)
        await type_into(pilot, "#chat-max_tokens", "77")
        await pilot.press("ctrl+s")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not isinstance(app.screen, SettingsScreen)
        assert app.session.config.chat.max_tokens == 77
        assert load_config(paths)[0].chat.max_tokens == 77


async def test_opting_in_and_out_of_federated_rounds_in_settings(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await open_tab(pilot, "Federation")
        status = str(app.screen.query_one("#federation-status").render())
        assert "Sync: not running" in status and "epsilon 0.00 at delta 1e-05" in status
        assert "Privacy: no federation round received yet" in status  # then its paragraph
        assert app.screen.query_one("#federation-require", Select).value == "any"
        await click(pilot, "#federation-enabled")
        await type_into(pilot, "#federation-address", "federation.example.org:9092")
        await pilot.press("ctrl+s")
        await app.workers.wait_for_complete()
        await pilot.pause()
        # Saved, but the service refuses a remote federation without TLS, and says so.
        assert load_config(paths)[0].federation.enabled
        assert any("Federated sync:" in n.message and "TLS certificate" in n.message
                   for n in app._notifications)
        await pilot.press("f2")
        await open_tab(pilot, "Federation")
        assert app.screen.query_one("#federation-enabled", Switch).value is True
        await click(pilot, "#federation-enabled")
        await pilot.press("ctrl+s")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not load_config(paths)[0].federation.enabled
        assert any("nothing more is uploaded" in n.message for n in app._notifications)
