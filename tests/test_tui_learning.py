"""Teaching from the TUI: thumbs, corrections, the Learning screen, background training."""

import os
import signal

import pytest
from textual.app import App
from textual.widgets import DataTable, Switch, TextArea

from floe_app.config import load_config
from floe_app.personalize.status import TrainingStatus, read_status, write_status
from floe_app.tui.screens.correct import CorrectionScreen
from floe_app.tui.screens.learning import LearningScreen
from floe_app.tui.widgets.chat import MessageView
from tests.test_learning import register
from tests.test_tui import SIZE, make_app, send, wait_until


async def test_thumbs_and_a_correction_on_the_last_reply(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Name a fruit")
        reply = app.store.messages(app.conversation_id)[-1]
        view = list(app.query(MessageView))[-1]
        await pilot.press("f9")
        assert app.store.message(reply.id).rating == 1
        assert "👍" in str(view.query_one(".author").render())
        await pilot.press("f9")  # again: undone
        assert app.store.message(reply.id).rating is None
        await pilot.press("f10")
        assert app.store.message(reply.id).rating == -1
        await pilot.press("f3")
        assert isinstance(app.screen, CorrectionScreen)
        editor = app.screen.query_one(TextArea)
        assert editor.text == reply.content  # starts from what Floe said
        editor.text = "A mango."
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not isinstance(app.screen, CorrectionScreen)
        stored = app.store.message(reply.id)
        assert stored.correction == "A mango." and stored.content == reply.content
        assert "corrected" in str(view.query_one(".author").render())
        taught = app.session.learning.dataset().by_source()
        assert [e.answer for e in taught["correction"]] == ["A mango."]
    # Reopened, the marks are still shown.
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        heading = str(list(app.query(MessageView))[-1].query_one(".author").render())
        assert "👎" in heading and "corrected" in heading


async def test_nothing_to_rate_says_so(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f9")
        await pilot.pause()
        assert "No reply to rate yet." in [n.message for n in app._notifications]


class LearningHost(App):
    def __init__(self, session):
        super().__init__()
        self.session = session

    def on_mount(self):
        self.push_screen(LearningScreen(self.session.learning))


async def test_learning_screen_lists_examples_by_source_and_forgets_them(session, paths):
    session.remember("My cat is Tom")
    store = session.store
    conversation = store.create_conversation()
    store.add_message(conversation, "user", "Name a fruit")
    accepted = store.add_message(conversation, "assistant", "Apple")
    session.learning.rate(accepted, 1)
    store.add_message(conversation, "user", "2+2?")
    wrong = store.add_message(conversation, "assistant", "5")
    session.learning.correct(wrong, "4")
    host = LearningHost(session)
    async with host.run_test(size=SIZE) as pilot:
        table = host.screen.query_one("#examples", DataTable)
        sources = [table.get_row_at(i)[0] for i in range(table.row_count)]
        assert set(sources) == {"memory note", "accepted reply", "correction"}
        assert sources.count("memory note") >= 4
        table.focus()
        table.move_cursor(row=sources.index("accepted reply"))
        await pilot.press("delete")
        await pilot.pause()
        examples = session.learning.dataset().examples
        assert {e.source for e in examples} == {"memory", "correction"}
        table.move_cursor(row=0)
        await pilot.press("delete")  # a memory example: the note itself is forgotten
        await pilot.pause()
        assert store.memories() == []
        assert [table.get_row_at(i)[0] for i in range(table.row_count)] == ["correction"]
        # A job already running (this process, as far as its status file says): T says so
        # rather than starting a second one.
        write_status(paths.data_dir, TrainingStatus("training", pid=os.getpid()))
        await pilot.press("t")
        await pilot.pause()
        assert "Training is already running." in [n.message for n in host._notifications]


async def test_learning_switch_pauses_and_versions_are_used_and_rolled_back(
        session, engine, paths, tmp_path):
    v1 = register(session.registry, engine, tmp_path, 1)
    register(session.registry, engine, tmp_path, 2)
    host = LearningHost(session)
    async with host.run_test(size=SIZE) as pilot:
        switch = host.screen.query_one(Switch)
        assert switch.value is True
        switch.value = False
        await pilot.pause()
        assert session.config.learning.paused and load_config(paths)[0].learning.paused
        assert "paused" in str(host.screen.query_one("#learning-status").render())
        table = host.screen.query_one("#adapters", DataTable)
        assert [table.get_row_at(i)[1] for i in range(table.row_count)] == ["v2", "v1", "v0"]
        assert table.get_row_at(0)[0] == "*"
        table.focus()
        table.move_cursor(row=1)
        await pilot.press("enter")
        await pilot.pause()
        assert session.registry.active_version() == v1.version
        await pilot.press("r")
        await pilot.pause()
        assert session.registry.active_version() == 2  # back to the one used before
        switch.value = True
        await pilot.pause()
        assert not load_config(paths)[0].learning.paused


@pytest.mark.slow
async def test_teaching_in_the_tui_starts_background_training(paths, config, tmp_path):
    config.learning.auto, config.learning.delay_s = True, 0
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#prompt").text = "/remember My dog's name is Biscotti"
        await pilot.press("enter")
        def job_running():
            status = read_status(paths.data_dir)
            return status is not None and status.running

        await wait_until(pilot, job_running, 30)
        status = read_status(paths.data_dir)
        os.kill(status.pid, signal.SIGTERM)  # its own process: the app is not involved
        await wait_until(pilot, lambda: not job_running(), 30)
        assert "Learning what you taught, in the background." in [
            n.message for n in app._notifications]
