"""The conversation: one MessageView per message, the last reply streamed into Markdown."""

from __future__ import annotations

import threading

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.geometry import Size
from textual.reactive import reactive
from textual.widgets import Label, Markdown, Static
from textual.widgets._markdown import MarkdownParagraph  # not exported; textual < 9 pinned
from textual.widgets.markdown import MarkdownStream

from floe_app.engine.provenance import Spans, stretches
from floe_app.store import Message

ROLE_NAMES = {"user": "You", "assistant": "Floe", "notice": "Floe"}
RATINGS = {1: "👍 Floe learns from it", -1: "👎 never learned from"}
STATUS_NOTES = {"interrupted": "interrupted: Floe stopped before this reply finished",
                "stopped": "stopped", "error": "failed", "streaming": "writing…"}
# The provenance tint (Ctrl+T), the colours of `floe history show --provenance`.
TINTS = {"local": "", "private": "magenta", "agreed": "green", "overruled": "yellow",
         "batch": "cyan"}


class ReplyParagraph(MarkdownParagraph):
    """A paragraph that asks for a layout only when its height changes. A streaming reply
    grows its last paragraph every frame, and a layout re-arranges and repaints the whole
    screen, the largest part of a frame's 8-13 ms on the UI thread (profiled), taken from
    the cores llama.cpp decodes on; most frames only lengthen the last line."""

    def set_content(self, content: Content) -> None:
        width = self.content_size.width
        before = self._height(width)
        self._content = content
        self.update(content, layout=False)
        if not width or self._height(width) != before:
            self.refresh(layout=True)

    def _height(self, width: int) -> int:
        return self.get_content_height(Size(0, 0), Size(0, 0), width) if width else 0


class ReplyMarkdown(Markdown):
    BLOCKS = {**Markdown.BLOCKS, "paragraph_open": ReplyParagraph}


class MessageView(Vertical):
    """A message's author line and its Markdown body; the author line follows the status,
    rating and correction as they change."""

    status: reactive[str] = reactive("complete", init=False)
    rating: reactive[int | None] = reactive(None, init=False)
    corrected: reactive[bool] = reactive(False, init=False)
    # Show the reply tinted by where each stretch came from, instead of as Markdown.
    tinted: reactive[bool] = reactive(False, init=False)

    def __init__(self, role: str, content: str = "", status: str = "complete",
                 message_id: int | None = None, rating: int | None = None,
                 corrected: bool = False, provenance: Spans | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.set_reactive(MessageView.status, status)
        self.message_id = message_id  # known once the reply is stored
        self.set_reactive(MessageView.rating, rating)
        self.set_reactive(MessageView.corrected, corrected)
        self.provenance: Spans = provenance or []  # a fused reply's (characters, source)
        # For a reply: whether the message it answers reached the database.
        self.saved_user_message = False
        # While a reply streams: text from the reply thread, shown on the app's frame clock.
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(self._heading(), classes="author")
        if self.role == "user":  # what the user typed, line breaks and all
            yield Static(self.content, classes="text", markup=False)
        else:
            yield ReplyMarkdown(self.content, classes="body")
            yield Static("", classes="provenance", markup=False)

    def _heading(self) -> str:
        notes = [STATUS_NOTES.get(self.status, ""), RATINGS.get(self.rating, ""),
                 "corrected: Floe learns your version" if self.corrected else ""]
        shown = ", ".join(n for n in notes if n)
        return ROLE_NAMES.get(self.role, self.role) + (f"  ({shown})" if shown else "")

    def watch_status(self, status: str) -> None:
        self._show_heading()
        self.set_class(status != "complete", "unfinished")

    def watch_rating(self) -> None:
        self._show_heading()

    def watch_corrected(self) -> None:
        self._show_heading()

    def _show_heading(self) -> None:
        self.query_one(".author", Label).update(self._heading())

    def watch_tinted(self) -> None:
        self.show_provenance()

    def show_provenance(self, text: str | None = None) -> None:
        """Tinted while `tinted` and there is provenance to show (`text`: the reply's text,
        once known), else the Markdown."""
        if text is not None:
            self.content = text
        if self.role == "user":
            return  # what the user typed: no Markdown, no provenance
        tint = self.tinted and bool(self.provenance)
        if tint:
            shown = Text()
            for piece, source in stretches(self.content, self.provenance):
                shown.append(piece, style=TINTS[source])
            self.query_one(".provenance", Static).update(shown)
        self.query_one(".provenance", Static).display = tint
        self.body.display = not tint

    @property
    def body(self) -> Markdown:
        return self.query_one(".body", Markdown)

    # Streaming: the reply thread only queues text (cheap, any thread); the UI thread moves
    # it into the Markdown a frame at a time, so a reply costs one layout per frame rather
    # than one per token.

    def start_stream(self) -> None:
        self._stream = Markdown.get_stream(self.body)

    def feed(self, text: str) -> None:
        """Queue streamed text; safe to call from any thread."""
        with self._pending_lock:
            self._pending.append(text)

    async def flush(self) -> None:
        """Show the text queued since the last frame (UI thread)."""
        with self._pending_lock:
            text = "".join(self._pending)
            self._pending.clear()
        if text and self._stream is not None and self.is_attached:
            await self._stream.write(text)

    async def end_stream(self) -> None:
        await self.flush()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.stop()


class ChatView(VerticalScroll):
    """Scrolls with the reply as it streams, unless the user scrolls away."""

    tinted = False  # fused replies shown tinted by provenance (Ctrl+T), new ones too

    def on_mount(self) -> None:
        self.anchor()

    def set_tinted(self, tinted: bool) -> None:
        self.tinted = tinted
        for view in self.query(MessageView):
            view.tinted = tinted

    async def show_messages(self, messages: list[Message], hint: str = "") -> None:
        """The messages; with none, `hint` says what to do (it goes once one is added)."""
        await self.remove_children()
        if not messages and hint:
            await self.mount(Static(hint, id="empty-hint", markup=False))
        await self.mount_all(MessageView(m.role, m.content, m.status, m.id, m.rating,
                                         m.correction is not None,
                                         m.stats.get("provenance") if m.stats else None)
                             for m in messages)
        self.set_tinted(self.tinted)
        self.anchor()

    def update_hint(self, hint: str) -> None:
        for shown in self.query("#empty-hint").results(Static):
            shown.update(hint)

    async def add_message(self, role: str, content: str = "", status: str = "complete",
                          before: MessageView | None = None) -> MessageView:
        await self.query("#empty-hint").remove()
        view = MessageView(role, content, status)
        await self.mount(view, before=before)
        view.tinted = self.tinted
        self.anchor()
        return view

    def last_reply(self) -> MessageView | None:
        replies = [v for v in self.query(MessageView)
                   if v.role == "assistant" and v.message_id is not None]
        return replies[-1] if replies else None

    async def add_notice(self, text: str, before: MessageView | None = None) -> MessageView:
        return await self.add_message("notice", text, before=before)
