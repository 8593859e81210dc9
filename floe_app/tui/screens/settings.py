"""Model and chat settings, validated by the same rules as the config file, then saved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from floe_app.config import Config, SettingSpec, setting_specs

EDITABLE = ("model.path", "chat.system_prompt", "chat.mode", "chat.temperature",
            "chat.top_p", "chat.max_tokens", "model.threads", "model.context_tokens",
            "privacy.local_only", "privacy.redact_terms", "cloud.base_url", "cloud.model",
            "cloud.provider", "cloud.endpoint", "cloud.continuation", "fusion.deadline_ms",
            "fusion.wait_budget_ms", "fusion.max_requests", "learning.paused", "learning.auto",
            "learning.delay_s", "learning.tier", "federation.enabled", "federation.address",
            "federation.root_certificates", "federation.node_key", "federation.require",
            "federation.min_noise_multiplier", "federation.max_epsilon",
            "federation.share_replies", "federation.share_corrections")


def show_value(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


def parse_value(spec: SettingSpec, text: str) -> object:
    """The typed value of a field's text; raises ValueError with what is allowed."""
    try:
        if spec.type is list:
            value: object = [t.strip() for t in text.split(",") if t.strip()]
        elif spec.type is bool:
            value = text.strip().lower()
            if value not in ("true", "false"):
                raise ValueError
            value = value == "true"
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
        self.federation = federation or []  # the sync service's state, shown above its keys
        # Probes the cloud the fields describe (network: run off the UI thread).
        self.test_cloud = test_cloud
        specs = {s.key: s for s in setting_specs()}
        self.specs = [specs[key] for key in EDITABLE]

    def _current(self, spec: SettingSpec) -> object:
        return getattr(getattr(self.config, spec.section), spec.name)

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Label("Settings  (Ctrl+S to save, Esc to cancel)", classes="title")
            for spec in self.specs:
                if spec.key == "federation.enabled" and self.federation:
                    yield Label("\n".join(self.federation), id="federation-status",
                                classes="field-label")
                field_id = spec.key.replace(".", "-")
                allowed = " (comma-separated)" if spec.type is list else ""
                yield Label(f"{spec.doc} ({spec.key}){allowed}", classes="field-label")
                if spec.name == "system_prompt":
                    yield TextArea(str(self._current(spec)), id=field_id, soft_wrap=True,
                                   classes="field")
                else:
                    yield Input(show_value(self._current(spec)), id=field_id, classes="field",
                                placeholder=spec.allowed)
                if spec.key == "cloud.continuation" and self.test_cloud is not None:
                    with Horizontal(classes="buttons"):
                        yield Button("Test connection", id="test-cloud")
                    yield Label("", id="cloud-status", classes="field-label")
            yield Label("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        elif event.button.id == "test-cloud":
            self.action_test_cloud()
        else:
            self.dismiss(None)

    def entered(self) -> Config | None:
        """The config the fields describe, or None (with the error shown) if one is bad."""
        sections = {f.name: dataclasses.replace(getattr(self.config, f.name))
                    for f in dataclasses.fields(Config)}
        for spec in self.specs:
            widget = self.query_one(f"#{spec.key.replace('.', '-')}")
            text = widget.text if isinstance(widget, TextArea) else widget.value
            try:
                setattr(sections[spec.section], spec.name, parse_value(spec, text))
            except ValueError as exc:
                self.query_one("#error", Label).update(str(exc))
                widget.focus()
                return None
        return Config(**sections)

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
