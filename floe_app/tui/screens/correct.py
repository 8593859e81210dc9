"""Edit a reply into what it should have said; the local model learns the corrected text."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, TextArea


class CorrectionScreen(ModalScreen[str | None]):
    """Dismisses with the corrected text, or None when cancelled."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel"), ("ctrl+s", "save", "Save")]

    def __init__(self, text: str) -> None:
        super().__init__(classes="dialog-screen")
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Correct the reply  (Ctrl+S to save, Esc to cancel)", classes="title")
            yield Label("The reply stays as it was in the chat; Floe learns this version.",
                        classes="field-label")
            yield TextArea(self.text, id="correction", soft_wrap=True, classes="field")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_save(self) -> None:
        text = self.query_one(TextArea).text.strip()
        self.dismiss(text or None)
