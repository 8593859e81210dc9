"""Ctrl+T tints each fused reply by where its stretches came from, and back."""

from textual.widgets import Markdown, Static

from floe_app.session import ChatSession
from floe_app.tui.app import FloeApp
from floe_app.tui.widgets.chat import MessageView

REPLY = "The capital of Australia is Canberra."
SPANS = [[len("The capital of Australia is "), "local"], [len("Canberra"), "overruled"],
         [1, "agreed"]]


async def test_ctrl_t_tints_fused_replies_by_source_and_back(paths, config, tmp_path):
    session = ChatSession.open(paths, config)
    store = session.store
    cid = session.new_conversation()
    store.add_message(cid, "user", "What is the capital of Australia?")
    fused = store.add_message(cid, "assistant", REPLY, mode="fused")
    store.update_message(fused, stats={"mode": "fused", "provenance": SPANS})
    store.add_message(cid, "assistant", "Hello there.", mode="local")
    app = FloeApp(session, export_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        pane = app.chat_pane
        await pane.open(cid)
        pane.prompt.focus()
        await pilot.pause()
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert pane.chat.tinted
        tinted, plain = [v for v in app.query(MessageView) if v.role == "assistant"]
        shown = tinted.query_one(".provenance", Static)
        assert shown.display and not tinted.query_one(Markdown).display
        text = shown.render()
        assert str(text) == REPLY
        styles = {text.plain[s.start:s.end]: str(s.style).removeprefix("ansi_") for s in text.spans}
        assert styles == {"Canberra": "yellow", ".": "green"}  # the local part plain
        # A reply without provenance (local) stays Markdown.
        assert plain.query_one(Markdown).display and not plain.query_one(".provenance").display
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert tinted.query_one(Markdown).display and not shown.display
