"""The conversation: one MessageView per message, the last reply streamed into Markdown."""

from __future__ import annotations

import asyncio
import threading

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Size
from textual.reactive import reactive
from textual.widgets import Label, Markdown, Static

from floe_app.engine.provenance import Spans, stretches
from floe_app.store import Message

ROLE_NAMES = {"user": "You", "assistant": "Floe", "notice": "Floe"}
RATINGS = {1: "👍 Floe learns from it", -1: "👎 never learned from"}
STATUS_NOTES = {"interrupted": "interrupted: Floe stopped before this reply finished",
                "stopped": "stopped", "error": "failed", "streaming": "writing…"}
# The provenance tint (Ctrl+T), the colours of `floe history show --provenance`.
TINTS = {"local": "", "private": "magenta", "agreed": "green", "overruled": "yellow",
         "batch": "cyan"}
# A streaming reply's unfinished block grows in steps of this many lines (blank below its
# text until filled): every change of height lays out the whole screen twice (Textual),
# 7-25 ms of the UI thread by the conversation's length. Measured per frame, steps of 1
# line against 3: 17 -> 14 ms, plain paragraphs 10 -> 7 ms (a new chat).
TAIL_STEP = 3


def finished_end(text: str) -> int:
    """Where the finished Markdown blocks of streamed `text` end: after its last blank line
    outside a code fence, or after a fence's closing line; 0 when none has finished."""
    end = position = 0
    fence = ""  # the open fence's run of ``` or ~~~
    for line in text.splitlines(keepends=True):
        position += len(line)
        if not line.endswith("\n"):
            break  # a line still being written
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                fence, end = "", position
        elif stripped.startswith(("```", "~~~")):
            fence = stripped[:len(stripped) - len(stripped.lstrip(stripped[0]))]
        elif not stripped:
            end = position
    return end


class ReplyTail(Static):
    """A streaming reply's unfinished block, as plain text: it changes every frame, and
    redoing it as Markdown re-parsed the block and rebuilt its widgets each time."""

    def __init__(self) -> None:
        super().__init__("", markup=False)
        self._lines = 0  # the height asked for

    def fits(self, text: str) -> bool:
        """Show `text` (a repaint of these lines only); False if it needs more lines than
        are laid out (show() then makes room)."""
        self.update(text, layout=False)
        return self._height() <= self._lines

    def show(self, text: str) -> None:
        """Show `text`, taller or shorter in steps of TAIL_STEP lines as it needs."""
        self.update(text, layout=False)
        lines = self._height()
        if lines != self._lines:  # a layout of the whole screen
            self._lines = lines
            self.styles.height = lines

    def _height(self) -> int:
        width = self.content_size.width
        lines = self.get_content_height(Size(0, 0), Size(0, 0), width) if width else 1
        return -(-max(lines, 1) // TAIL_STEP) * TAIL_STEP


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
        # While a reply streams: text from the reply thread, shown on the app's frame clock;
        # the finished blocks in the Markdown, the unfinished one in the tail.
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()
        self._unshown = ""  # streamed text not yet in the Markdown
        self._tail: ReplyTail | None = None
        self._flushing = asyncio.Lock()  # frames and reply events both flush: in order

    def compose(self) -> ComposeResult:
        yield Label(self._heading(), classes="author")
        if self.role == "user":  # what the user typed, line breaks and all
            yield Static(self.content, classes="text", markup=False)
        else:
            yield Markdown(self.content, classes="body")
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

    # Streaming: the reply thread only queues text (cheap, any thread); the UI thread shows
    # it a frame at a time, the finished blocks as Markdown and the unfinished one as plain
    # text. UI thread per frame (headless, 300 tokens at 75/s, medians of 3): re-parsing the
    # last block into new Markdown widgets every frame took 25 ms with a list and a code
    # block, 11 ms for plain paragraphs; this takes 14 and 7 ms (after 4 earlier exchanges:
    # 39 -> 20 ms, 19 -> 9 ms). Most of what is left is Textual's layouts, so a finished
    # block joins the Markdown only when the tail must grow anyway (one layout, not two):
    # 22 -> 18 layouts while a 300-token reply streams.

    async def start_stream(self) -> None:
        self._tail = ReplyTail()
        await self.mount(self._tail, after=self.body)

    def feed(self, text: str) -> None:
        """Queue streamed text; safe to call from any thread."""
        with self._pending_lock:
            self._pending.append(text)

    async def flush(self, last: bool = False) -> None:
        """Show the text queued since the last frame (UI thread); `last`: the reply is
        written, all of it goes into the Markdown."""
        async with self._flushing:
            with self._pending_lock:
                text = "".join(self._pending)
                self._pending.clear()
            tail = self._tail
            if tail is None or not (text or last) or not self.is_attached:
                return
            self._unshown += text
            if not last and tail.fits(self._unshown.rstrip("\n")):
                return  # finished blocks wait for the next layout, when the tail must grow
            end = len(self._unshown) if last else finished_end(self._unshown)
            done, self._unshown = self._unshown[:end], self._unshown[end:]
            with self.app.batch_update():  # no frame with a block in both or in neither
                if done:
                    await self.body.append(done)
                if last:
                    self._tail = None
                    await tail.remove()
                else:
                    tail.show(self._unshown.rstrip("\n"))

    async def end_stream(self) -> None:
        await self.flush(last=True)


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
