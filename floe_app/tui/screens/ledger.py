"""The privacy ledger: every request that left this machine, and exactly what it carried."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, TextArea

from floe_app.store import LedgerRow


class LedgerScreen(ModalScreen[None]):
    BINDINGS = [("escape,ctrl+l,q", "dismiss", "Close")]

    def __init__(self, rows: list[LedgerRow]) -> None:
        super().__init__(classes="dialog-screen")
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            total = sum(r.bytes_sent for r in self.rows)
            yield Label(f"Privacy ledger: {len(self.rows)} requests, {total:,} bytes sent"
                        "  (Esc to close)", classes="title")
            if not self.rows:
                yield Label("Nothing has left this machine.", id="empty")
                return
            table: DataTable[str] = DataTable(cursor_type="row", zebra_stripes=True)
            table.add_columns("When", "Outcome", "Sent", "Received", "Endpoint")
            for r in self.rows:
                received = "?" if r.bytes_received is None else f"{r.bytes_received:,}"
                table.add_row(r.created_at[:19].replace("T", " "), r.outcome or "?",
                              f"{r.bytes_sent:,}", received, r.endpoint, key=str(r.id))
            yield table
            yield Label("Text sent (after redaction):", classes="field-label")
            yield TextArea(self.rows[0].text_sent, read_only=True, soft_wrap=True,
                           id="sent", classes="field")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        row = next(r for r in self.rows if str(r.id) == event.row_key.value)
        self.query_one("#sent", TextArea).text = row.text_sent
