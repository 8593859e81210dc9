"""Settings' "Test connection": the cloud the fields describe is probed off the UI thread
and the answer shown in one line, whatever it is."""

from textual.app import App

from floe_app.config import Config
from floe_app.session import ChatSession
from floe_app.tui.screens.settings import SettingsScreen
from tests.support.cloud_server import free_port
from tests.test_tui_settings import click, open_tab, type_into


class CloudSettingsHost(App):
    def __init__(self, session):
        super().__init__()
        self.session = session

    def on_mount(self):
        self.push_screen(SettingsScreen(self.session.config, None, self.session.test_cloud))


async def test_test_connection_probes_what_the_fields_say(store, paths):
    session = ChatSession(store, Config(), env={}, paths=paths)
    host = CloudSettingsHost(session)
    async with host.run_test(size=(120, 60)) as pilot:
        screen = host.screen
        status = screen.query_one("#cloud-status")
        await open_tab(pilot, "Cloud")
        await type_into(pilot, "#cloud-base_url", f"http://127.0.0.1:{free_port()}/v1")
        await type_into(pilot, "#cloud-model", "some-model")
        await click(pilot, "#test-cloud")
        for _ in range(100):
            await pilot.pause(0.05)
            if "Cannot use" in str(status.render()):
                break
        line = str(status.render())
        assert line.startswith("Cannot use this cloud:") and "could not be reached" in line
        assert "\n" not in line
        assert session.config.cloud.base_url == ""  # nothing saved by testing
        await type_into(pilot, "#cloud-base_url", "not a url")
        await click(pilot, "#test-cloud")
        assert "cloud.base_url: expected" in str(screen.query_one("#cloud-base_url-error").render())
