"""Settings in tabs (chat, model, cloud, learning, federation, privacy), validated by the
same rules as the config file, each key's error beside it; saved with Ctrl+S."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Select, Switch, TabbedContent, TabPane, TextArea

from floe_app.config import Config, SettingSpec, setting_specs

# The keys the screen edits, by tab. The federation tab starts with the opt-in switch.
SECTIONS = {
    "Chat": ("chat.system_prompt", "chat.mode", "chat.temperature", "chat.top_p",
             "chat.max_tokens"),
    "Model": ("model.path", "model.threads", "model.context_tokens"),
    "Cloud": ("cloud.base_url", "cloud.model", "cloud.provider", "cloud.endpoint",
              "cloud.continuation", "fusion.deadline_ms", "fusion.wait_budget_ms",
              "fusion.max_requests"),
    "Learning": ("learning.paused", "learning.auto", "learning.delay_s", "learning.tier"),
    "Federation": ("federation.enabled", "federation.address", "federation.root_certificates",
                   "federation.node_key", "federation.require",
                   "federation.min_noise_multiplier", "federation.max_epsilon",
                   "federation.share_replies", "federation.share_corrections"),
    "Privacy": ("privacy.local_only", "privacy.redact_terms"),
}


def field_id(spec: SettingSpec) -> str:
    return spec.key.replace(".", "-")


def show_value(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


def parse_value(spec: SettingSpec, text: str) -> object:
    """The typed value of a text field; raises ValueError with what is allowed."""
    try:
        if spec.type is list:
            value: object = [t.strip() for t in text.split(",") if t.strip()]
        elif spec.type in (int, float):
            value = spec.type(text.strip())
        else:
            value = text
        return spec.coerce(value)
    except ValueError:
        raise ValueError(f"{spec.key}: expected {spec.allowed}") from None


class SettingsScreen(ModalScreen[Config | None]):
    """Dismisses with the new Config when saved, or None when cancelled."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel"), ("ctrl+s", "save", "Save")]

    def __init__(self, config: Config, federation: list[str] | None = None,
                 test_cloud: Callable[[Config], str] | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.config = config
        self.federation = federation or []  # the sync service's state and privacy spent
        # Probes the cloud the fields describe (network: run off the UI thread).
        self.test_cloud = test_cloud
        specs = {s.key: s for s in setting_specs()}
        self.sections = {title: [specs[key] for key in keys] for title, keys in SECTIONS.items()}
        self.specs = [spec for section in self.sections.values() for spec in section]

    def _current(self, spec: SettingSpec) -> object:
        return getattr(getattr(self.config, spec.section), spec.name)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="settings"):
            yield Label("Settings  (Ctrl+S to save, Esc to cancel)", classes="title")
            with TabbedContent(id="sections"):
                for title, specs in self.sections.items():
                    with TabPane(title, id=f"tab-{title.lower()}"):
                        for spec in specs:
                            yield from self._setting(spec)
            yield Label("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def _setting(self, spec: SettingSpec) -> ComposeResult:
        """One key: what it is, its control, and its error beside the control."""
        value = self._current(spec)
        if spec.type is bool:
            with Horizontal(classes="setting switch-row"):
                yield Switch(bool(value), id=field_id(spec))
                yield Label(f"{spec.doc} ({spec.key})", classes="switch-label")
                yield Label("", id=f"{field_id(spec)}-error", classes="field-error")
            if spec.key == "federation.enabled" and self.federation:
                yield Label("\n".join(self.federation), id="federation-status",
                            classes="federation-status")
            return
        listed = " (comma-separated)" if spec.type is list else ""
        yield Label(f"{spec.doc} ({spec.key}){listed}", classes="field-label")
        with Horizontal(classes="setting"):
            if spec.choices:
                yield Select([(c, c) for c in spec.choices], value=value, allow_blank=False,
                             id=field_id(spec), classes="field")
            elif spec.name == "system_prompt":
                yield TextArea(str(value), id=field_id(spec), soft_wrap=True, classes="field")
            else:
                yield Input(show_value(value), id=field_id(spec), classes="field",
                            placeholder=spec.allowed)
            yield Label("", id=f"{field_id(spec)}-error", classes="field-error")
        if spec.key == "cloud.continuation" and self.test_cloud is not None:
            with Horizontal(classes="buttons"):
                yield Button("Test connection", id="test-cloud")
            yield Label("", id="cloud-status", classes="field-label")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "test-cloud":
            self.action_test_cloud()
        else:
            self.dismiss(None)

    def _entered_value(self, spec: SettingSpec, widget: Widget) -> object:
        if isinstance(widget, Switch | Select):
            return widget.value
        text = widget.text if isinstance(widget, TextArea) else widget.value
        return parse_value(spec, text)

    def entered(self) -> Config | None:
        """The config the fields describe, or None with each bad key's error beside it
        (the first one's tab is shown and its field focused)."""
        sections = {f.name: dataclasses.replace(getattr(self.config, f.name))
                    for f in dataclasses.fields(Config)}
        errors: list[tuple[SettingSpec, Widget, str]] = []
        for spec in self.specs:
            widget = self.query_one(f"#{field_id(spec)}")
            error = ""
            try:
                setattr(sections[spec.section], spec.name, self._entered_value(spec, widget))
            except ValueError as exc:
                error = str(exc)
                errors.append((spec, widget, error))
            self.query_one(f"#{field_id(spec)}-error", Label).update(error)
        if not errors:
            self.query_one("#error", Label).update("")
            return Config(**sections)
        spec, widget, error = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        self.query_one("#error", Label).update(error + more)
        title = next(t for t, specs in self.sections.items() if spec in specs)
        self.query_one(TabbedContent).active = f"tab-{title.lower()}"
        widget.focus()
        return None

    def action_save(self) -> None:
        config = self.entered()
        if config is not None:
            self.dismiss(config)

    def action_test_cloud(self) -> None:
        config = self.entered()
        if config is None or self.test_cloud is None:
            return
        status = self.query_one("#cloud-status", Label)
        status.update("Asking the cloud (a few tiny requests, recorded in the ledger)…")
        test = self.test_cloud

        def run() -> None:
            line = test(config)
            self.app.call_from_thread(status.update, line)
        self.run_worker(run, thread=True, exclusive=True, group="test-cloud")
