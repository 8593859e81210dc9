"""The open conversation and its message box: this pane owns the reply being written.

It holds the conversation id, the mode chosen before a new chat's first message, the reply
worker, the streaming views and the reply's cancel event, and tells the app what happened
in small messages (a chat was opened or created, a reply started or ended, a command ran).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.timer import Timer

from floe_app.errors import FloeError
from floe_app.session import ChatSession, Delta, Finished, Notice, Saved
from floe_app.tui.widgets.chat import ChatView, MessageView
from floe_app.tui.widgets.prompt import PromptInput

# How often streamed text reaches the screen. Each update lays out and repaints the
# conversation (~7 ms of Python on the UI thread), taken from the cores llama.cpp decodes
# on: measured on 2 cores against `floe ask` (80 tokens/s), 20 frames a second streamed at
# 0.70x, 10 at 0.77x, 5 at 0.83x, none until the end at 0.90x. Ten a second is still
# streaming to the eye (Rich's live displays refresh four times a second).
FRAME_S = 1 / 10


@dataclass
class Failed:
    """The reply could not be produced; `error` is the one-line reason."""

    error: str


class ChatPane(Vertical):
    """The conversation view and the message box below it."""

    class Opened(Message):
        """A conversation (or a new, empty chat: None) is now shown."""

        def __init__(self, conversation_id: int | None) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    class Created(Message):
        """The first message of a new chat created its conversation."""

    class ReplyStarted(Message):
        pass

    class ReplyEnded(Message):
        """The reply is stored and shown; `stats` is None when it failed."""

        def __init__(self, stats: dict[str, Any] | None) -> None:
            super().__init__()
            self.stats = stats

    class CommandRan(Message):
        def __init__(self, command: str, failed: bool) -> None:
            super().__init__()
            self.command = command
            self.failed = failed

    class Progress(Message, bubble=False):
        """From the reply worker to the pane itself, on the UI thread."""

        def __init__(self, view: MessageView,
                     event: Saved | Notice | Delta | Finished | Failed, text: str = "") -> None:
            super().__init__()
            self.view = view
            self.event = event
            self.text = text  # the user's message, given back to them if it was never saved

    class CommandOutput(Message, bubble=False):
        def __init__(self, command: str, text: str, failed: bool = False) -> None:
            super().__init__()
            self.command = command
            self.text = text
            self.failed = failed

    def __init__(self, session: ChatSession, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.conversation_id: int | None = None
        self.pending_mode: str | None = None  # chosen before the new chat's first message
        self.generating = False
        self.model_state = "loading"  # loading | ready | error: what the empty chat says
        # Created on the UI thread when a reply is sent, so Esc pressed before the reply
        # thread starts still stops this reply (not the previous one).
        self._cancel = threading.Event()
        self._streaming: set[MessageView] = set()
        self._frame: Timer | None = None  # the frame clock, running while a reply streams
        self.frame_s = FRAME_S  # 0: every token to the screen at once (benchmarks compare)

    def compose(self) -> ComposeResult:
        yield ChatView(id="chat")
        yield PromptInput(id="prompt")

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    async def open(self, conversation_id: int | None) -> None:
        """Show a conversation, or a new empty chat for None."""
        store = self.session.store
        conversation = store.conversation(conversation_id) if conversation_id else None
        self.conversation_id = conversation.id if conversation else None
        self.pending_mode = None
        await self.chat.show_messages(store.messages(conversation.id) if conversation else [],
                                      self.hint())
        self.post_message(self.Opened(self.conversation_id))

    def mode(self) -> tuple[str, str | None]:
        """The mode the next reply will use, and why it is not the one asked for."""
        conversation = self.session.store.conversation(self.conversation_id or 0)
        requested = None if conversation else self.pending_mode
        return self.session.resolve_mode(requested, conversation)

    def choose_mode(self, mode: str) -> None:
        """This chat's reply mode (before its first message: for the chat it starts)."""
        if self.conversation_id is None:
            self.pending_mode = mode
        else:
            self.session.store.set_conversation_mode(self.conversation_id, mode)

    def toggle_provenance(self) -> None:
        """Tint fused replies by where each stretch came from, or show them plainly."""
        tinted = not self.chat.tinted
        self.chat.set_tinted(tinted)
        if tinted:
            self.notify("Fused replies tinted: magenta private (the cloud was left out),"
                        " green the cloud agreed, yellow fusion overruled the local model,"
                        " cyan the cloud's text checked in a batch, plain the local model"
                        " alone. Ctrl+T again: plain.", timeout=8)

    def hint(self) -> str:
        """What an empty chat says: how to start, the main keys, whether the model is ready."""
        model = {"loading": "The model is still loading; you can type already.",
                 "error": "The model could not be loaded: choose one in settings (F2).",
                 }.get(self.model_state, "The model is ready.")
        return ("Type a message and press Enter to send it. F4 switches the reply mode"
                f" (local, fused, cloud), F2 opens settings, F1 lists every key. {model}")

    def set_model_state(self, state: str) -> None:
        self.model_state = state
        self.chat.update_hint(self.hint())

    def last_reply(self) -> MessageView | None:
        return self.chat.last_reply()

    def stop(self) -> bool:
        """Stop the reply being written; False when there is none."""
        if self.generating:
            self._cancel.set()
        return self.generating

    # Sending and streaming

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        text = event.text
        if not text.strip():
            self.notify("Type a message first.", severity="warning")
            return
        if self.generating:
            self.notify("Floe is still replying: wait, or press Esc to stop it.",
                        severity="warning")
            return
        is_command = text.lstrip().startswith("/")
        if self.conversation_id is None:
            self.conversation_id = self.session.new_conversation()
            if self.pending_mode and not is_command:
                self.session.store.set_conversation_mode(self.conversation_id,
                                                         self.pending_mode)
            self.post_message(self.Created())
        event.prompt.clear()
        if is_command:
            self.run_slash_command(self.conversation_id, text.strip())
            return
        # Before the first await: Esc pressed while the views mount stops this reply.
        self.generating = True
        self._cancel = cancel = threading.Event()
        self.post_message(self.ReplyStarted())
        chat = self.chat
        await chat.add_message("user", text)
        view = await chat.add_message("assistant", "", status="streaming")
        await view.start_stream()
        self._streaming.add(view)
        if self.frame_s > 0 and self._frame is None:
            self._frame = self.set_interval(self.frame_s, self.show_streamed_text)
        self.run_reply(self.conversation_id, text, view, cancel)

    @work(thread=True, exclusive=True, group="reply")
    def run_reply(self, conversation_id: int, text: str, view: MessageView,
                  cancel: threading.Event) -> None:
        first = True
        try:
            for event in self.session.reply(conversation_id, text, cancel):
                if isinstance(event, Delta):
                    view.feed(event.text)  # shown on the next frame
                    if not first and self.frame_s > 0:
                        continue
                    first = False  # the first words go to the screen at once
                self.post_message(self.Progress(view, event))
        except FloeError as exc:
            self.post_message(self.Progress(view, Failed(str(exc)), text))
        except Exception as exc:  # an engine bug must not take the chat down
            self.post_message(self.Progress(view, Failed(f"unexpected error: {exc!r}"), text))

    async def on_chat_pane_progress(self, message: Progress) -> None:
        view, event = message.view, message.event
        chat = self.chat
        if isinstance(event, Saved):
            view.saved_user_message = True
        elif isinstance(event, Delta):
            await view.flush()
        elif isinstance(event, Notice) and view.is_attached:
            await chat.add_notice(event.text, before=view)
        elif isinstance(event, Finished | Failed):
            self._streaming.discard(view)
            if not self._streaming and self._frame is not None:
                self._frame.stop()
                self._frame = None
            try:  # "done" only once the whole reply and its status show
                await view.end_stream()
                if isinstance(event, Finished):
                    view.message_id = event.message_id
                    view.status = event.status
                    view.provenance = event.stats.get("provenance") or []
                    view.show_provenance(event.text)
                else:
                    view.status = "error"
                    await chat.add_notice(f"**Could not reply:** {event.error}")
                    if not view.saved_user_message and not self.prompt.text:
                        self.prompt.text = message.text
                        self.notify("Your message was not saved; it is back in the message box.",
                                    severity="warning")
            finally:
                self.generating = False
                self.post_message(self.ReplyEnded(
                    event.stats if isinstance(event, Finished) else None))

    async def show_streamed_text(self) -> None:
        for view in list(self._streaming):
            await view.flush()

    @work(thread=True, group="command")
    def run_slash_command(self, conversation_id: int, text: str) -> None:
        try:
            result = self.session.run_command(conversation_id, text)
        except FloeError as exc:
            self.post_message(self.CommandOutput(text, str(exc), failed=True))
        else:
            self.post_message(self.CommandOutput(text, result))

    async def on_chat_pane_command_output(self, message: CommandOutput) -> None:
        heading = f"`{message.command}`" + (" failed" if message.failed else "")
        await self.chat.add_notice(f"{heading}\n\n{message.text}")
        self.post_message(self.CommandRan(message.command, message.failed))
