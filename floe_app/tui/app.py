"""The chat app's frame: the sidebar, the chat pane, the status line, keys and screens.

The chat pane (widgets/chat_pane.py) owns the open conversation and the reply being
written; it reports to the app in messages, and the app updates the sidebar and the status
line. Model loading runs in a thread worker, so the interface stays responsive.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Input, ListView

from floe_app.config import Config
from floe_app.errors import FloeError
from floe_app.paths import assets_dir
from floe_app.session import ChatSession, SettingsApplied, export_conversation
from floe_app.store import Store
from floe_app.tui.screens.confirm import ConfirmScreen
from floe_app.tui.screens.correct import CorrectionScreen
from floe_app.tui.screens.help import HelpScreen
from floe_app.tui.screens.learning import LearningScreen
from floe_app.tui.screens.ledger import LedgerScreen
from floe_app.tui.screens.rename import RenameScreen
from floe_app.tui.screens.settings import SettingsScreen
from floe_app.tui.widgets.chat_pane import ChatPane
from floe_app.tui.widgets.prompt import PromptInput
from floe_app.tui.widgets.sidebar import ConversationItem, Sidebar
from floe_app.tui.widgets.status import StatusBar

# Keys handled by the message box itself; listed in the help screen with the bindings.
INPUT_KEYS = [("Enter", "Send the message"), ("Shift+Enter / Ctrl+J", "New line in the message"),
              ("Tab / Shift+Tab", "Move between the sidebar and the message box"),
              ("Ctrl+P", "Command palette: every action by name"), ("Ctrl+Q", "Quit")]


class ModelState(Message):
    def __init__(self, state: str, detail: str = "", fraction: float = 0.0) -> None:
        super().__init__()
        self.state = state  # loading | ready | error
        self.detail = detail
        self.fraction = fraction


class FloeApp(App[None]):
    TITLE = "Floe"
    CSS_PATH = str(assets_dir() / "floe.tcss")
    BINDINGS = [
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "rename_chat", "Rename chat", show=False),
        Binding("f8", "delete_chat", "Delete chat", show=False),
        Binding("ctrl+f", "search_chats", "Search chats", show=False),
        Binding("escape", "stop", "Stop reply"),
        Binding("f5", "copy_reply", "Copy last reply", show=False),
        Binding("ctrl+s", "export_chat", "Export chat as Markdown", show=False),
        Binding("f4", "switch_mode", "Switch reply mode"),
        Binding("ctrl+t", "toggle_provenance", "Tint fused replies by source", show=False),
        Binding("ctrl+l", "ledger", "Privacy ledger"),
        Binding("f9", "rate_reply(1)", "Thumbs up: learn from the last reply", show=False),
        Binding("f10", "rate_reply(-1)", "Thumbs down: never learn the last reply",
                show=False),
        Binding("f3", "correct_reply", "Correct the last reply", show=False),
        Binding("ctrl+o", "learning", "Learning"),
        Binding("f2", "settings", "Settings"),
        Binding("f1", "help", "Help"),
    ]

    def __init__(self, session: ChatSession, warnings: list[str] | None = None,
                 export_dir: Path | None = None) -> None:
        """`session`: built by ChatSession.open (the CLI) or by a test with its own parts."""
        super().__init__()
        self.session = session
        self.interrupted = session.interrupted
        self.warnings = warnings or []
        self.export_dir = export_dir or Path.cwd()
        self._replying = False  # from ReplyStarted until ReplyEnded is shown
        self._reported: set[str] = set()  # plugin problems already shown
        self._training_timer: Timer | None = None
        self._seen_job: float | None = None  # when the last finished job was reported

    @property
    def store(self) -> Store:
        return self.session.store

    @property
    def chat_pane(self) -> ChatPane:
        return self.query_one(ChatPane)

    @property
    def conversation_id(self) -> int | None:
        return self.chat_pane.conversation_id

    @property
    def generating(self) -> bool:
        """A reply is being written, or its end is not shown yet (status line, sidebar)."""
        return self.chat_pane.generating or self._replying

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield Sidebar(id="sidebar")
            yield ChatPane(self.session, id="main")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        from floe_app.engine.hardware import cpu_monitor

        # Drawing the screen competes with llama.cpp's threads like any other program does:
        # automatic threads count this thread's CPU time as taken.
        cpu_monitor().count_as_other(threading.get_native_id())
        self.query_one(PromptInput).focus()
        conversations = self.store.conversations()
        await self.open_conversation(conversations[0].id if conversations else None)
        for warning in self.warnings:
            self.notify(warning, title="Settings", severity="warning", timeout=10)
        if self.interrupted:
            self.notify(f"{self.interrupted} reply was interrupted when Floe last stopped;"
                        " what it had written is kept.", timeout=8)
        self.load_model()
        self.set_interval(2.0, self.show_learning)
        self.schedule_training()  # something taught while Floe was closed (floe remember)

    # The model

    @work(thread=True, exclusive=True, group="model")
    def load_model(self) -> None:
        if self.session.plugins is None:  # off the UI thread: plugins import their own code
            from floe_app.plugins import Plugins

            self.session.plugins = Plugins()
            self.call_from_thread(self.report_plugin_problems)
        self.post_message(ModelState("loading"))
        try:
            engine = self.session.engine(
                progress=lambda f: self.post_message(ModelState("loading", fraction=f)))
        except FloeError as exc:
            self.post_message(ModelState("error", str(exc)))
        else:
            self.post_message(ModelState("ready", engine.name))
            self.session.warm_cloud()

    def on_model_state(self, message: ModelState) -> None:
        status = self.query_one(StatusBar)
        self.chat_pane.set_model_state(message.state)
        if message.state == "loading":
            status.state = f"loading model {message.fraction:.0%}"
        elif message.state == "ready":
            status.model, status.state = message.detail, ""
        else:
            status.model, status.state = "no model", "model error: press F2 to choose one"
            self.notify(message.detail, title="Model could not be loaded", severity="error",
                        timeout=15)

    # Conversations

    async def refresh_sidebar(self) -> None:
        sidebar = self.query_one(Sidebar)
        await sidebar.show(self.store.conversations_matching(sidebar.search_box.value),
                           self.conversation_id)

    async def open_conversation(self, conversation_id: int | None) -> None:
        await self.chat_pane.open(conversation_id)

    async def on_chat_pane_opened(self, message: ChatPane.Opened) -> None:
        conversation = self.store.conversation(message.conversation_id or 0)
        self.sub_title = conversation.title if conversation else ""
        self.show_mode()
        await self.refresh_sidebar()

    async def on_chat_pane_created(self) -> None:
        await self.refresh_sidebar()

    def show_mode(self) -> None:
        self.query_one(StatusBar).mode = self.chat_pane.mode()[0]

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        if isinstance(event.item, ConversationItem):
            await self.open_conversation(event.item.conversation.id)
            self.query_one(PromptInput).focus()

    async def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "search":
            await self.refresh_sidebar()

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search":
            hits = self.query_one(Sidebar).list_view
            if hits.index is None and hits.children:
                hits.index = 0
            hits.focus()

    # Replies and commands

    def on_chat_pane_reply_started(self) -> None:
        self._replying = True
        self.query_one(StatusBar).state = "replying… (Esc to stop)"

    async def on_chat_pane_reply_ended(self, message: ChatPane.ReplyEnded) -> None:
        try:
            status = self.query_one(StatusBar)
            status.state = ""
            if message.stats is not None:
                status.last_stats = message.stats
            await self.refresh_sidebar()
        finally:
            self._replying = False

    def on_chat_pane_command_ran(self, message: ChatPane.CommandRan) -> None:
        self.report_plugin_problems()
        if message.command.startswith(("/remember", "/forget")) and not message.failed:
            self.schedule_training()

    def report_plugin_problems(self) -> None:
        for problem in self.session.plugins.problems if self.session.plugins else []:
            if problem not in self._reported:
                self._reported.add(problem)
                self.notify(problem, title="Plugin", severity="warning", timeout=10)

    # Actions

    def action_stop(self) -> None:
        if not self.chat_pane.stop():
            self.query_one(PromptInput).focus()

    async def action_new_chat(self) -> None:
        await self.open_conversation(None)
        self.query_one(PromptInput).focus()

    def action_rename_chat(self) -> None:
        conversation = self.store.conversation(self.conversation_id or 0)
        if conversation is None:
            self.notify("Nothing to rename yet: send a message first.")
            return

        async def rename(title: str | None) -> None:
            if title:
                self.store.rename_conversation(conversation.id, title)
                self.sub_title = title
                await self.refresh_sidebar()

        self.push_screen(RenameScreen(conversation.title), rename)

    def action_delete_chat(self) -> None:
        conversation = self.store.conversation(self.conversation_id or 0)
        if conversation is None:
            self.notify("No chat selected.")
            return
        if self.generating:
            self.notify("Stop the reply (Esc) before deleting this chat.", severity="warning")
            return

        async def delete(confirmed: bool | None) -> None:
            if confirmed:
                self.store.delete_conversation(conversation.id)
                remaining = self.store.conversations()
                await self.open_conversation(remaining[0].id if remaining else None)
                self.notify(f"Deleted “{conversation.title}”.")

        self.push_screen(ConfirmScreen(
            f"Delete “{conversation.title}” and its {conversation.message_count} messages?"
            " This cannot be undone."), delete)

    def action_switch_mode(self) -> None:
        why_local = self.session.resolve_mode("fused")[1]
        if why_local is not None:
            self.notify(f"{why_local} Settings (F2) change that.")
            return
        modes = ["local", "fused", "cloud"]
        current = self.query_one(StatusBar).mode
        mode = modes[(modes.index(current) + 1) % len(modes)] if current in modes else "fused"
        self.chat_pane.choose_mode(mode)
        self.show_mode()
        self.notify(f"Replies in this chat: {mode}.")

    def action_ledger(self) -> None:
        self.push_screen(LedgerScreen(self.store.ledger(200)))

    # Learning

    def schedule_training(self) -> None:
        """Train in the background once the user has stopped teaching for learning.delay_s."""
        if self._training_timer is not None:
            self._training_timer.stop()
        # Textual's timers divide by their interval: 0 s becomes 0.1 s.
        self._training_timer = self.set_timer(max(self.session.config.learning.delay_s, 0.1),
                                              self.start_training_if_due)

    @work(thread=True, exclusive=True, group="learning")
    def start_training_if_due(self) -> None:
        if self.session.learning.due():
            self.session.learning.start()
            self.call_from_thread(self.notify, "Learning what you taught, in the background.")

    def show_learning(self) -> None:
        """Training progress in the status bar; a job's outcome, once, as a notification."""
        status = self.session.learning.status()
        self.query_one(StatusBar).learning = status.line() if status and status.running else ""
        finished = (status.updated_at if status and status.state in ("done", "failed")
                    else None)
        if finished and self._seen_job is not None and finished != self._seen_job:
            self.notify(status.message, title="Learning", timeout=10,
                        severity="error" if status.state == "failed" else "information")
        self._seen_job = finished or self._seen_job or 0.0

    def action_rate_reply(self, rating: int) -> None:
        view = self.chat_pane.last_reply()
        if view is None or view.message_id is None:
            self.notify("No reply to rate yet.")
            return
        view.rating = None if view.rating == rating else rating  # pressing again undoes it
        self.session.learning.rate(view.message_id, view.rating)
        self.schedule_training()

    def action_correct_reply(self) -> None:
        view = self.chat_pane.last_reply()
        if view is None or view.message_id is None or self.generating:
            self.notify("No finished reply to correct yet.")
            return
        message = self.store.message(view.message_id)
        assert message is not None

        def save(text: str | None) -> None:
            if text is None:
                return
            self.session.learning.correct(view.message_id, text)
            view.corrected = True
            self.notify("Saved: Floe learns your version of this reply.")
            self.schedule_training()

        self.push_screen(CorrectionScreen(message.correction or message.content), save)

    def action_learning(self) -> None:
        self.push_screen(LearningScreen(self.session.learning))

    def action_search_chats(self) -> None:
        self.query_one(Sidebar).search_box.focus()

    def _last_reply(self) -> str | None:
        messages = self.store.messages(self.conversation_id) if self.conversation_id else []
        replies = [m.content for m in messages if m.role == "assistant" and m.content]
        return replies[-1] if replies else None

    def action_copy_reply(self) -> None:
        reply = self._last_reply()
        if reply is None:
            self.notify("No reply to copy yet.")
            return
        self.copy_to_clipboard(reply)
        self.notify(f"Copied the last reply ({len(reply):,} characters).")

    def action_export_chat(self) -> None:
        conversation = self.store.conversation(self.conversation_id or 0)
        if conversation is None:
            self.notify("No chat to export yet.")
            return
        try:
            path = export_conversation(conversation, self.store.messages(conversation.id),
                                       folder=self.export_dir)
        except FloeError as exc:
            self.notify(f"Could not export: {exc}", severity="error")
            return
        self.notify(f"Exported to {path}")

    def action_settings(self) -> None:
        def saved(config: Config | None) -> None:
            if config is not None:
                self.apply_settings(config)

        self.push_screen(SettingsScreen(self.session.config, self.session.federation_lines(),
                                        self.session.test_cloud), saved)

    @work(thread=True, group="settings")
    def apply_settings(self, config: Config) -> None:
        """Off the UI thread: opting in or out of federated rounds takes seconds."""
        self.call_from_thread(self.show_settings_applied, self.session.apply_settings(config))

    def show_settings_applied(self, applied: SettingsApplied) -> None:
        for notice in applied.notices:
            self.notify(notice)
        for error in applied.errors:
            self.notify(error, severity="error")
        if applied.reload_model:
            self.load_model()
        self.show_mode()

    def action_toggle_provenance(self) -> None:
        self.chat_pane.toggle_provenance()

    def action_help(self) -> None:
        keys = [(b.key_display or self.get_key_display(b), b.description)
                for b in self._bindings_list()] + INPUT_KEYS
        self.push_screen(HelpScreen(keys))

    def _bindings_list(self) -> list[Binding]:
        return [b for b in self.BINDINGS if isinstance(b, Binding)]

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in self._bindings_list():
            yield SystemCommand(binding.description, f"Key: {self.get_key_display(binding)}",
                                self._palette_callback(binding.action))

    def _palette_callback(self, action: str) -> Any:
        return lambda: self.call_later(self.run_action, action)
