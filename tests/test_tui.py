"""The Textual app driven with Pilot, on the real model and a real SQLite file."""

import asyncio

import pytest
from textual import events
from textual.app import App
from textual.widgets import Markdown

from floe_app.session import ChatSession
from floe_app.store import Store
from floe_app.tui.app import FloeApp
from floe_app.tui.screens.confirm import ConfirmScreen
from floe_app.tui.screens.help import HelpScreen
from floe_app.tui.screens.rename import RenameScreen
from floe_app.tui.widgets.chat import TAIL_STEP, ChatView, MessageView, ReplyTail, finished_end
from floe_app.tui.widgets.prompt import PromptInput
from floe_app.tui.widgets.sidebar import ConversationItem
from floe_app.tui.widgets.status import StatusBar

SIZE = (110, 36)


async def wait_until(pilot, predicate, timeout=60.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached in time")


async def send(pilot, app, text):
    prompt = app.query_one(PromptInput)
    prompt.text = text
    await pilot.press("enter")
    await pilot.pause()
    await wait_until(pilot, lambda: not app.generating)


def make_app(paths, config, tmp_path, model_override=None, env=None):
    session = ChatSession.open(paths, config, model_override=model_override, env=env)
    return FloeApp(session, export_dir=tmp_path)


@pytest.mark.slow
async def test_typing_a_message_streams_a_reply_into_the_view_and_the_store(paths, config,
                                                                           tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"Hi", "ctrl+j", *"there")
        assert app.query_one(PromptInput).text == "Hi\nthere"
        await pilot.press("enter")
        await pilot.pause()
        assert app.generating or app.store.messages(app.conversation_id)
        await wait_until(pilot, lambda: not app.generating)
        messages = app.store.messages(app.conversation_id)
        assert [(m.role, m.status) for m in messages] == [("user", "complete"),
                                                          ("assistant", "complete")]
        assert messages[0].content == "Hi\nthere"
        views = list(app.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[1].body.source.strip() == messages[1].content.strip() != ""
        status = app.query_one(StatusBar)
        assert status.model == "SmolLM2-135M-Instruct.Q4_1"
        assert "tok/s" in status.render() and status.last_stats["tokens"] > 0
        assert app.query_one(PromptInput).text == ""
        items = list(app.query(ConversationItem))
        assert [i.conversation.title for i in items] == ["Hi"]


async def test_empty_message_sends_nothing(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("space", "enter")
        await pilot.pause()
        assert not app.generating and app.store.conversations() == []
        assert any("Type a message first" in n.message for n in app._notifications)


@pytest.mark.slow
async def test_a_huge_paste_is_clipped_with_a_visible_notice(paths, config, tmp_path):
    config.model.context_tokens = 1024  # reading a full 4k window takes ~20 s on 2 cores
    app = make_app(paths, config, tmp_path)
    paste = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 1800)[:100_000]
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        app.post_message(events.Paste(paste))  # as a terminal delivers it
        await pilot.pause()
        assert prompt.text == paste
        await pilot.press("enter")
        await pilot.pause()
        await wait_until(pilot, lambda: not app.generating)
        notices = [v for v in app.query(MessageView) if v.role == "notice"]
        assert len(notices) == 1 and "100,000 characters" in notices[0].content
        assert "1,024-token context window" in notices[0].content
        assert app.store.messages(app.conversation_id)[0].content == paste


@pytest.mark.slow
async def test_escape_stops_the_reply_and_keeps_what_was_written(paths, config, tmp_path):
    config.chat.max_tokens = 400
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = "Tell me a long story about a lighthouse."
        await pilot.press("enter")
        await wait_until(pilot, lambda: any(
            m.content for m in app.store.messages(app.conversation_id)
            if m.role == "assistant") or not app.generating)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.generating)
        reply = app.store.messages(app.conversation_id)[-1]
        assert reply.status == "stopped" and reply.stats["tokens"] < 400
        assert list(app.query(MessageView))[-1].status == "stopped"


@pytest.mark.slow
async def test_escape_pressed_at_once_after_sending_stops_that_reply(paths, config, tmp_path,
                                                                    monkeypatch):
    """Esc while the reply's views are still being mounted, before its thread has started:
    it must stop this reply, not set the finished reply's cancel event."""
    config.chat.max_tokens = 400
    app = make_app(paths, config, tmp_path)
    mount = ChatView.add_message
    pressed = []

    async def esc_while_mounting(self, role, *args, **kwargs):
        if role == "assistant" and not pressed:
            pressed.append(app.chat_pane.stop())  # what Esc does, at this very moment
        return await mount(self, role, *args, **kwargs)

    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Hi")  # a first reply, whose cancel event Esc must not reach
        monkeypatch.setattr(ChatView, "add_message", esc_while_mounting)
        await send(pilot, app, "Tell me a long story about a lighthouse.")
        await wait_until(pilot, lambda: not app.generating)
        assert pressed == [True]  # Esc came while the reply was going, before its thread
        reply = app.store.messages(app.conversation_id)[-1]
        assert reply.status == "stopped" and reply.stats["finish_reason"] == "cancelled"
        assert list(app.query(MessageView))[-1].status == "stopped"


async def test_an_empty_chat_says_what_to_do(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        hint = app.query_one("#empty-hint")
        assert "still loading" in str(hint.render())
        await wait_until(pilot, lambda: app.query_one(StatusBar).model != "no model")
        shown = str(hint.render())
        assert "press Enter" in shown and "F4" in shown and "F2" in shown and "F1" in shown
        assert "The model is ready." in shown
        app.query_one(PromptInput).text = "/memories"
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.query("#empty-hint"))
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert "The model is ready." in str(app.query_one("#empty-hint").render())


@pytest.mark.slow
async def test_new_rename_search_and_delete_conversations(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Penguins live in Antarctica")
        first = app.conversation_id
        await pilot.press("ctrl+n")
        assert app.conversation_id is None and not list(app.query(MessageView))
        await send(pilot, app, "Cactus care tips")
        second = app.conversation_id
        assert second != first

        await pilot.press("ctrl+r")
        assert isinstance(app.screen, RenameScreen)
        rename_input = app.screen.query_one("#title")
        rename_input.value = "Desert plants"
        await pilot.press("enter")
        await pilot.pause()
        assert app.store.conversation(second).title == "Desert plants"

        await pilot.press("ctrl+f")
        await pilot.press(*"antarctica")
        await pilot.pause()
        titles = [i.conversation.title for i in app.query(ConversationItem)]
        assert titles == ["Penguins live in Antarctica"]
        await pilot.press("enter")  # focus the list, then open the hit
        await pilot.press("enter")
        await pilot.pause()
        assert app.conversation_id == first

        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")  # cancel keeps it
        assert app.store.conversation(first) is not None
        await pilot.press("f8")
        await pilot.click("#yes")
        await pilot.pause()
        assert app.store.conversation(first) is None
        assert app.conversation_id == second


@pytest.mark.slow
async def test_copy_and_export_the_conversation(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Name a fruit")
        reply = app.store.messages(app.conversation_id)[-1].content
        await pilot.press("f5")
        assert app.clipboard == reply
        await pilot.press("ctrl+s")
        exported = (tmp_path / f"floe-{app.conversation_id}.md").read_text()
        assert exported.startswith("# Name a fruit") and reply in exported


async def test_missing_model_is_shown_and_the_message_is_kept(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path, model_override=str(tmp_path / "gone.gguf"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "model error" in app.query_one(StatusBar).state)
        await send(pilot, app, "hello?")
        notices = [v.content for v in app.query(MessageView) if v.role == "notice"]
        assert notices and "model file not found" in notices[0]
        assert app.store.messages(app.conversation_id)[0].content == "hello?"


async def test_an_unsaved_message_goes_back_into_the_box(paths, config, tmp_path):
    import sqlite3

    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        cid = app.session.new_conversation()
        await app.open_conversation(cid)
        app.store.busy_timeout_s = 0.2
        app.store.db.conn.execute("PRAGMA busy_timeout = 200")
        blocker = sqlite3.connect(paths.database)
        blocker.execute("begin immediate")
        try:
            await send(pilot, app, "do not lose me")
        finally:
            blocker.rollback()
            blocker.close()
        assert app.query_one(PromptInput).text == "do not lose me"
        assert app.store.messages(cid) == []


async def test_an_interrupted_reply_is_shown_as_interrupted(paths, config, tmp_path):
    store = Store(paths.database)
    cid = store.create_conversation("Earlier")
    store.add_message(cid, "user", "question")
    reply = store.add_message(cid, "assistant", "half an answ", status="streaming")
    store.db["messages"].update(reply, {"writer_pid": 2**22 + 12345})  # no such process
    store.close()
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.interrupted == 1
        views = list(app.query(MessageView))
        assert views[-1].status == "interrupted" and views[-1].content == "half an answ"
        assert "interrupted" in str(views[-1].query_one(".author").render())


async def test_help_lists_every_key_and_palette_has_every_action(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        described = [action for _, action in app.screen.keys]
        for binding in FloeApp.BINDINGS:
            assert binding.description in described
        assert "Send the message" in described
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {b.description for b in FloeApp.BINDINGS} <= titles


@pytest.mark.slow
async def test_fused_chat_in_the_tui_with_mode_switch_and_ledger(paths, cloud_config, tmp_path):
    from floe_app.tui.screens.ledger import LedgerScreen

    app = make_app(paths, cloud_config, tmp_path, env={})
    async with app.run_test(size=SIZE) as pilot:
        status = app.query_one(StatusBar)
        assert status.mode == "fused"  # auto: a cloud is configured
        await pilot.press("f4")
        assert status.mode == "cloud" and app.chat_pane.pending_mode == "cloud"
        await pilot.press("f4", "f4")
        assert status.mode == "fused"
        await send(pilot, app, "What is the capital of France?")
        reply = app.store.messages(app.conversation_id)[-1]
        assert reply.mode == "fused" and reply.stats["cloud"]["requests"] >= 1
        assert app.store.conversation(app.conversation_id).mode == "fused"
        assert "requests" in status.render()
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert isinstance(app.screen, LedgerScreen)
        sent = app.screen.query_one("#sent").text
        assert "What is the capital of France?" in sent
        await pilot.press("escape")
        await pilot.press("f4")  # fused -> cloud for this conversation
        assert app.store.conversation(app.conversation_id).mode == "cloud"


async def test_mode_switch_without_a_cloud_explains_why(paths, config, tmp_path):
    app = make_app(paths, config, tmp_path, env={})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        assert app.query_one(StatusBar).mode == "local"
        assert any("no cloud is configured" in n.message for n in app._notifications)
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert app.screen.query_one("#empty")


REPLY = ("Hello, **world**.\n\n- one\n- two\n\n```python\nx = 1\n\ny = 2\n```\n"
         "Done, *nearly*.\n\nThe end.")


def blocks(markdown):
    """What a Markdown widget shows: its blocks, in order, with their text."""
    from textual.widgets.markdown import MarkdownBlock

    return [(type(b).__name__, b._content.plain) for b in markdown.query(MarkdownBlock)]


class StreamHost(App):
    def compose(self):
        yield MessageView("assistant", status="streaming")


@pytest.mark.parametrize("text, end", [
    ("One.\n\nTwo", len("One.\n\n")),
    ("One.\nTwo.\n", 0),  # one paragraph, not yet over
    ("One.\n\n```\nx\n\ny\n", len("One.\n\n")),  # a blank line inside a fence
    ("```\nx\n\ny\n```\nTwo", len("```\nx\n\ny\n```\n")),  # the fence is closed
    ("````md\n```\n\n````\n", len("````md\n```\n\n````\n")),  # a shorter run inside
    ("One.\n\n  ", len("One.\n\n")),  # a line still being written
])
def test_finished_blocks_end_at_a_blank_line_outside_a_fence(text, end):
    assert finished_end(text) == end


async def test_a_streaming_reply_shows_finished_blocks_as_markdown_and_the_rest_as_text():
    async with StreamHost().run_test(size=SIZE) as pilot:
        view = pilot.app.query_one(MessageView)
        await view.start_stream()
        tail = view.query_one(ReplyTail)
        for piece in ["Hello", ",", " **world**", ".", "\n\n", "- one", "\n- two"]:
            view.feed(piece)  # as the reply thread does, token by token
        assert view.body.source == "" and tail.content == ""  # nothing before the frame
        await view.flush()
        await pilot.pause()
        assert blocks(view.body) == [("MarkdownParagraph", "Hello, world.")]
        assert tail.content == "- one\n- two" and tail.display  # as written, Markdown and all
        view.feed("\n\n```python\nx = 1\n\ny")
        await view.flush()
        assert view.body.source == "Hello, **world**.\n\n- one\n- two\n\n"
        assert tail.content == "```python\nx = 1\n\ny"  # a fence is not split at its blank line
        view.feed(" = 2\n```\nDone")
        await view.flush()
        # The closed fence fits the lines the tail already has: it waits there, as written,
        # for the next layout (when the tail must grow) rather than costing one of its own.
        assert tail.content == "```python\nx = 1\n\ny = 2\n```\nDone"
        assert view.body.source == "Hello, **world**.\n\n- one\n- two\n\n"
        view.feed(", nearly.\n\nThe\nend\nof\nit")
        await view.flush()
        await pilot.pause()
        fences = [b for b in blocks(view.body) if b[0] == "MarkdownFence"]
        assert fences == [("MarkdownFence", "x = 1\n\ny = 2")]
        assert blocks(view.body)[-1] == ("MarkdownParagraph", "Done, nearly.")
        assert tail.content == "The\nend\nof\nit"


async def test_a_finished_stream_is_the_markdown_of_the_whole_reply():
    pieces = [REPLY[i:i + 3] for i in range(0, len(REPLY), 3)]
    async with StreamHost().run_test(size=SIZE) as pilot:
        view = pilot.app.query_one(MessageView)
        await view.start_stream()
        for i, piece in enumerate(pieces):
            view.feed(piece)
            if i % 4 == 3:  # a frame every fourth token
                await view.flush()
        await view.end_stream()
        await pilot.pause()
        assert not view.query(ReplyTail)  # the tail is gone, its text in the Markdown
        assert view.body.source == REPLY
        whole = Markdown(REPLY)
        await pilot.app.mount(whole)
        await pilot.pause()
        assert blocks(view.body) == blocks(whole) == [
            ("MarkdownParagraph", "Hello, world."), ("MarkdownBulletList", ""),
            ("MarkdownParagraph", "one"), ("MarkdownParagraph", "two"),
            ("MarkdownFence", "x = 1\n\ny = 2"), ("MarkdownParagraph", "Done, nearly."),
            ("MarkdownParagraph", "The end.")]


async def test_a_reply_that_ends_while_a_frame_is_still_appending_shows_each_block_once():
    """Frames (a timer) and reply events (messages) both flush; Textual's Markdown.append
    must not run twice at once, or the second re-parses from a stale line: blocks twice."""
    async with StreamHost().run_test(size=SIZE) as pilot:
        view = pilot.app.query_one(MessageView)
        await view.start_stream()
        half = REPLY.index("```python")
        view.feed(REPLY[:half])
        frame = asyncio.ensure_future(view.flush())
        await asyncio.sleep(0)  # the frame is appending its finished blocks
        view.feed(REPLY[half:])
        await view.end_stream()
        await frame
        await pilot.pause()
        assert [b[1] for b in blocks(view.body)].count("Hello, world.") == 1
        assert view.body.source == REPLY


async def test_the_unfinished_block_asks_for_a_layout_only_when_its_height_steps_up():
    """A layout re-arranges and repaints the whole screen; a frame that only lengthens the
    reply's last lines needs a repaint of the tail alone."""
    async with StreamHost().run_test(size=(40, 12)) as pilot:
        view = pilot.app.query_one(MessageView)
        await view.start_stream()
        tail = view.query_one(ReplyTail)
        tail.show("Hello")
        await pilot.pause()
        assert tail.size.height == TAIL_STEP
        tail.show("Hello there, " * 4)  # a few lines, within the step
        assert not tail._layout_required
        await pilot.pause()
        tail.show("word " * 40)  # more lines than the step: taller
        assert tail._layout_required
        await pilot.pause()
        assert tail.size.height == 2 * TAIL_STEP
