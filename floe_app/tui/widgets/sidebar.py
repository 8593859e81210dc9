"""The list of conversations, with a full-text search box above it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, ListItem, ListView

from floe_app.store import Conversation


class ConversationItem(ListItem):
    def __init__(self, conversation: Conversation) -> None:
        super().__init__(Label(conversation.title, markup=False))
        self.conversation = conversation


class Sidebar(Vertical):
    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search chats  (Ctrl+F)", id="search")
        yield ListView(id="conversations")

    @property
    def search_box(self) -> Input:
        return self.query_one("#search", Input)

    @property
    def list_view(self) -> ListView:
        return self.query_one("#conversations", ListView)

    async def show(self, conversations: list[Conversation], selected: int | None) -> None:
        view = self.list_view
        await view.clear()
        await view.extend(ConversationItem(c) for c in conversations)
        ids = [c.id for c in conversations]
        view.index = ids.index(selected) if selected in ids else None
