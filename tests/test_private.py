"""Private at rest: whatever the umask, everything Floe writes is readable by this account only
(folders 0700, files 0600), checked on the real files after real commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from floe_app.paths import Paths, loose_entries, resolve_paths, tighten
from tests.conftest import REPO

GREEDY = "[chat]\ntemperature = 0.0\nmax_tokens = 16\n"


@pytest.fixture(params=[0o000, 0o022], ids=["umask000", "umask022"])
def umask(request):
    """A permissive umask for this test process and every floe it starts."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def floe(*args: str, home: Path, cwd: Path, input: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "floe_app", *args], input=input, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def modes(*roots: Path) -> dict[str, str]:
    """Every folder and file under the roots (roots included), as {path: octal mode}."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in [None, *dirs, *files]:
                path = Path(folder) / name if name else Path(folder)
                if name in dirs:
                    continue  # listed when walked into
                found[str(path)] = f"{stat.S_IMODE(path.lstat().st_mode):04o}"
    return found


def assert_private(home: Path) -> dict[str, str]:
    paths = resolve_paths({"FLOE_HOME": str(home)})
    seen = modes(*paths.folders)
    wrong = {p: m for p, m in seen.items()
             if m != ("0700" if Path(p).is_dir() else "0600")}
    assert not wrong, wrong
    return seen


def kill_mid_reply(home: Path, cwd: Path) -> None:
    """Start `floe ask` and kill -9 it while its reply streams into the database."""
    proc = subprocess.Popen([sys.executable, "-m", "floe_app", "ask", "--mode", "local",
                             "Tell me a long story about a lighthouse keeper."],
                            env={**os.environ, "FLOE_HOME": str(home)}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = home / "data" / "floe.db"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    if conn.execute("select 1 from messages where status = 'streaming'"
                                    ).fetchone():
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_every_file_the_chat_writes_is_private_whatever_the_umask(umask, tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "work"
    cwd.mkdir()
    # The first start writes the default config; kill -9 mid-reply leaves the WAL and
    # shared-memory files behind: all are checked.
    kill_mid_reply(home, cwd)
    assert (home / "data" / "floe.db-wal").exists() and (home / "data" / "floe.db-shm").exists()
    seen = assert_private(home)
    assert {str(home / "data" / "floe.db-wal"), str(home / "config" / "config.toml")} <= set(seen)
    (home / "config" / "config.toml").write_text(GREEDY)  # short replies from here on

    ask = floe("ask", "--json", "--mode", "local", "Say hello.", home=home, cwd=cwd)
    assert ask.returncode == 0, ask.stderr
    message_id = json.loads(ask.stdout)["message_id"]
    conversation = json.loads(ask.stdout)["conversation_id"]
    for args in (("remember", "my locker code is 4417"), ("rate", str(message_id), "up"),
                 ("correct", str(message_id), "Hello there."), ("private", str(conversation)),
                 ("history", "export", str(conversation)),
                 ("history", "export", str(conversation), "--format", "json", "-o",
                  "out/chat.json")):
        if args[-1] == "out/chat.json":
            (cwd / "out").mkdir()
        result = floe(*args, home=home, cwd=cwd)
        assert result.returncode == 0, (args, result.stderr)
    seen = assert_private(home)
    assert {str(home / "config" / "config.toml"), str(home / "data" / "floe.db")} <= set(seen)
    # Exports hold the conversation too: written 0600 (the user's own folder keeps its mode).
    for export in (cwd / f"floe-{conversation}.md", cwd / "out" / "chat.json"):
        assert stat.S_IMODE(export.stat().st_mode) == 0o600, export
    assert "4417" in floe("memories", home=home, cwd=cwd).stdout


@pytest.mark.slow
def test_adapters_checkpoints_status_sync_state_and_logs_are_private(umask, tmp_path):
    """The writers behind training and federated rounds, run in a process started the way
    every floe process is (cli.main sets the umask), then the sync service for real."""
    home = tmp_path / "home"
    code = """
import json, numpy as np, torch
from pathlib import Path
from floe_app.cli import main
assert main(["memories"]) == 0
from floe_app.paths import resolve_paths
from floe_app.store import Store
from floe_app.personalize.export import BaseModel, write_gguf_tensors
from floe_app.personalize.registry import Registry
from floe_app.personalize.status import TrainingStatus, write_status, training_lock, replying
from floe_app.personalize.trainer import _save_checkpoint
paths = resolve_paths()
store = Store(paths.database)
base = BaseModel("base", "llama", 9, 3)
staged = write_gguf_tensors(paths.cache_dir / "training" / "adapter.gguf",
    {"blk.0.attn_q.weight.lora_a": np.ones((4, 8), np.float32),
      "blk.0.attn_q.weight.lora_b": np.ones((8, 4), np.float32)}, alpha=4, base=base)
Registry(store, paths.adapters_dir).register(staged, base_model="base", status="promoted")
_save_checkpoint(paths.cache_dir / "training" / "checkpoint.pt", {"step": 3})
write_status(paths.data_dir, TrainingStatus(state="training"))
with training_lock(paths.data_dir), replying(paths.data_dir):
    with open(paths.data_dir / "training.log", "ab") as log:
        log.write(b"step 3")
store.close()
"""
    env = {**os.environ, "FLOE_HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    seen = assert_private(home)
    for name in ("data/training.json", "data/training.log", "data/training.lock",
                 "cache/training/checkpoint.pt"):
        assert str(home / name) in seen, name
    assert any("/data/adapters/adapter-" in p for p in seen)

    if shutil.which("flower-supernode") is None and not Path(sys.executable).with_name(
            "flower-supernode").exists():
        return
    (home / "config" / "config.toml").write_text(
        '[federation]\nenabled = true\naddress = "127.0.0.1:9"\n')
    started = floe("sync", "start", home=home, cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        time.sleep(1.0)
        seen = assert_private(home)
        assert {str(home / "data" / "sync.json"), str(home / "data" / "sync.log")} <= set(seen)
    finally:
        floe("sync", "stop", home=home, cwd=tmp_path)
    assert_private(home)


def test_a_loose_install_is_tightened_on_the_next_start_with_one_notice(tmp_path):
    home = tmp_path / "home"
    assert floe("remember", "my locker code is 4417", home=home, cwd=tmp_path).returncode == 0
    # As an older Floe (or umask 022) left them: readable by every account.
    for path in (home / "config", home / "data", home / "cache"):
        path.chmod(0o755)
    (home / "data" / "floe.db").chmod(0o644)
    (home / "config" / "config.toml").chmod(0o664)
    (home / "data" / "old-export.md").write_text("x")
    (home / "data" / "old-export.md").chmod(0o604)
    outside = tmp_path / "shared.txt"  # a link to a file that is not Floe's is left alone
    outside.write_text("not Floe's")
    outside.chmod(0o644)
    (home / "data" / "link").symlink_to(outside)

    doctor = floe("doctor", "--json", home=home, cwd=tmp_path)
    notes = [line for line in doctor.stderr.splitlines() if line.startswith("floe: note:")]
    assert len(notes) == 1 and "made 6 of Floe's files and folders private" in notes[0], \
        doctor.stderr
    report = json.loads(doctor.stdout)["privacy"]
    assert report["private"] and report["modes"] == {
        "config_dir": "0700", "data_dir": "0700", "cache_dir": "0700", "config": "0600",
        "database": "0600"}
    assert stat.S_IMODE((home / "data" / "old-export.md").stat().st_mode) == 0o600
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644

    again = floe("memories", home=home, cwd=tmp_path)
    assert again.stdout.strip() == "1. my locker code is 4417" and again.stderr == ""

    (home / "data" / "floe.db").chmod(0o640)
    text = floe("doctor", home=home, cwd=tmp_path)
    assert "floe: note: made 1 of Floe's files" in text.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("Privacy"))
    assert "0700/0700/0700, config 0600, database 0600" in line and "PROBLEM" not in line


def test_doctor_names_what_other_accounts_can_read(tmp_path):
    paths = Paths(tmp_path / "c", tmp_path / "d", tmp_path / "k").ensure()
    (paths.data_dir / "floe.db").write_text("")
    (paths.data_dir / "floe.db").chmod(0o644)
    report = paths.privacy_report()
    assert not report["private"] and report["loose"] == [f"{paths.data_dir}/floe.db 0644"]
    assert tighten(paths.data_dir) == (1, [])
    assert paths.privacy_report()["private"]
    assert list(loose_entries(tmp_path / "missing")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second account")
def test_a_second_account_cannot_read_anything_floe_wrote():
    # A home other accounts can walk through, as /home/NAME often is (pytest's own tmp
    # folder is 0700, which would hide everything whatever Floe did).
    root = Path(tempfile.mkdtemp(prefix="floe-second-account-"))
    try:
        root.chmod(0o755)
        home, previous = root / "floe-home", os.umask(0o022)
        try:
            assert floe("remember", "my locker code is 4417", home=home,
                        cwd=root).returncode == 0
        finally:
            os.umask(previous)
        probe = ("import os, sys\nfor p in sys.argv[1:]:\n"
                 "    try:\n        open(p, 'rb').read(1) if os.path.isfile(p) else"
                 " os.listdir(p)\n        print('READ', p)\n"
                 "    except PermissionError:\n        pass\n")
        targets = [home / "config" / "config.toml", home / "data" / "floe.db",
                   home / "data", home / "config", home / "cache"]

        def become_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)

        other = subprocess.run(["/usr/bin/python3", "-c", probe, *map(str, targets)],
                               capture_output=True, text=True, preexec_fn=become_nobody,
                               cwd="/", timeout=60)
        assert other.returncode == 0, other.stderr
        assert other.stdout == ""
    finally:
        shutil.rmtree(root)
