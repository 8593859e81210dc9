"""Every key Floe answers to, generated from the app's own bindings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape,f1,q", "dismiss", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self.keys = keys

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Label("Keys  (Esc to close)", classes="title")
            table: DataTable[str] = DataTable(show_cursor=False, zebra_stripes=True)
            table.add_columns("Key", "Action")
            for key, action in self.keys:
                table.add_row(key, action)
            yield table
