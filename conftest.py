"""Every test starts with no plugins loaded; plugin tests name the ones they want."""

import pytest


@pytest.fixture(autouse=True)
def no_plugins_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOE_PLUGINS", "")
