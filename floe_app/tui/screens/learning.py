"""What the local model learns from, its adapter versions, and the switch to pause learning."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Switch

from floe_app.errors import FloeError
from floe_app.personalize.learning import Learning
from floe_app.personalize.registry import scores

SOURCE_NAMES = {"memory": "memory note", "accepted": "accepted reply",
                "correction": "correction"}


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LearningScreen(ModalScreen[None]):
    BINDINGS = [("escape,ctrl+o", "dismiss", "Close"), ("delete,d", "forget", "Stop learning it"),
                ("r", "rollback", "Roll back"), ("t", "train", "Train now")]

    def __init__(self, learning: Learning) -> None:
        super().__init__(classes="dialog-screen")
        self.learning = learning
        self.registry = learning.registry

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Learning  (Esc to close)", classes="title")
            with Horizontal(classes="switch-row"):
                yield Switch(not self.learning.paused, id="learn")
                yield Label("Learn from what I teach: notes, 👍 replies, corrections")
            yield Label("", id="learning-status")
            yield Label("Examples  (Del: stop learning from the selected one)",
                        classes="field-label")
            yield DataTable(cursor_type="row", zebra_stripes=True, id="examples")
            yield Label("Adapter versions  (Enter: use the selected one, R: roll back,"
                        " T: train now)", classes="field-label")
            yield DataTable(cursor_type="row", zebra_stripes=True, id="adapters")

    def on_mount(self) -> None:
        examples = self.query_one("#examples", DataTable)
        examples.add_columns("Source", "Question", "What Floe learns to answer")
        adapters = self.query_one("#adapters", DataTable)
        adapters.add_columns("", "Version", "Status", "Tier", "Recall", "Perplexity", "Why")
        self.refresh_tables()

    def refresh_tables(self) -> None:
        self.query_one("#learning-status", Label).update(self.learning.line())
        examples = self.query_one("#examples", DataTable)
        examples.clear()
        for i, e in enumerate(self.learning.dataset().examples):
            examples.add_row(SOURCE_NAMES[e.source], _short(e.prompt, 40), _short(e.answer),
                             key=f"{e.source}:{e.source_id}:{i}")
        adapters = self.query_one("#adapters", DataTable)
        adapters.clear()
        active = self.registry.active_version()
        for row in reversed(self.registry.versions()):
            recall, rise = scores(row)
            adapters.add_row("*" if row.version == active else "", f"v{row.version}",
                             row.status, row.meta.get("tier", "?"), recall, rise,
                             _short(row.reason or "", 50), key=str(row.version))
        adapters.add_row("*" if active == 0 else "", "v0", "base model", "", "", "", "",
                         key="0")

    def on_switch_changed(self, event: Switch.Changed) -> None:
        try:
            self.learning.set_paused(not event.value)
        except FloeError as exc:
            self.notify(f"Applies now but could not be saved: {exc}", severity="error")
        else:
            self.notify("Learning resumed." if event.value else
                        "Learning paused: nothing new is trained; the active adapter stays.")
        self.refresh_tables()

    def action_forget(self) -> None:
        table = self.query_one("#examples", DataTable)
        if not table.row_count:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or ""
        source, source_id, _ = key.split(":")
        self.learning.forget(source, int(source_id))
        what = "Forgot the memory note" if source == "memory" else "Floe stops learning from it"
        self.notify(f"{what}; the next adapter version leaves it out.")
        self.refresh_tables()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id != "adapters":
            return
        version = int(event.row_key.value or 0)
        try:
            self.registry.use(version)
        except FloeError as exc:
            self.notify(str(exc), severity="error")
        else:
            self.notify(f"Using {'the base model' if version == 0 else f'v{version}'}"
                        " from the next reply.")
        self.refresh_tables()

    def action_rollback(self) -> None:
        try:
            version = self.registry.rollback()
        except FloeError as exc:
            self.notify(str(exc), severity="warning")
        else:
            self.notify(f"Rolled back to {f'v{version}' if version else 'the base model'}.")
        self.refresh_tables()

    def action_train(self) -> None:
        self.notify(self.learning.train_now())
        self.refresh_tables()
