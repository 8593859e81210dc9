"""floe-files, loaded through its real entry point."""

import pytest
from floe_files import MAX_BYTES

from floe_app.config import Config
from floe_app.errors import FloeError
from floe_app.plugins import Plugins
from floe_app.session import ChatSession
from floe_app.store import Store


@pytest.fixture
def session(tmp_path):
    plugins = Plugins(env={"FLOE_PLUGINS": "files"})
    assert plugins.problems == [] and plugins.infos["files"].hooks == ["register_commands"]
    return ChatSession(Store(tmp_path / "floe.db"), Config(), plugins=plugins)


def test_attach_gives_the_file_to_the_local_model_only(session, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("The wifi password is hunter2.\nRoom 4 is free on Fridays.\n")
    cid = session.new_conversation()
    shown = session.run_command(cid, f"/attach {notes}")
    assert shown.startswith("Attached notes.txt (") and "a cloud never does" in shown
    [attached] = session.private_notes(cid)
    assert "hunter2" in attached and "notes.txt" in attached
    other = session.new_conversation()
    assert session.private_notes(other) == []  # per chat


@pytest.mark.parametrize(("content", "error"), [
    (b"\x89PNG\r\n\x1a\n\0\0\0", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8 text"),
    (b"x" * (MAX_BYTES + 1), f"at most {MAX_BYTES:,}"),
])
def test_refusals_are_one_line_and_attach_nothing(session, tmp_path, content, error):
    path = tmp_path / "file.bin"
    path.write_bytes(content)
    cid = session.new_conversation()
    with pytest.raises(FloeError, match=error) as info:
        session.run_command(cid, f"/attach {path}")
    assert "\n" not in str(info.value)
    assert session.private_notes(cid) == []
    assert session.plugins.problems == []  # a refusal is not a plugin failure


def test_missing_file_and_missing_argument(session, tmp_path):
    cid = session.new_conversation()
    with pytest.raises(FloeError, match="no such file"):
        session.run_command(cid, f"/attach {tmp_path / 'nope.txt'}")
    with pytest.raises(FloeError, match="usage: /attach PATH"):
        session.run_command(cid, "/attach")
