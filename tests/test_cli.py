"""The real `floe` command in subprocesses: exit codes, output, and what lands in the store."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from floe_app import __version__
from floe_app.engine.local import bundled_model_path
from floe_app.store import Store
from tests.conftest import REPO, run_floe

GREEDY = '[chat]\ntemperature = 0.0\nmax_tokens = 24\n'


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text(GREEDY)
    return home


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("floe: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_version_is_fast_and_imports_nothing_heavy(home):
    code = ("import sys, floe_app.cli as c; c.main(['--version'])")
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == f"floe {__version__}"
    imported = result.stderr
    for heavy in ("llama_cpp", "textual", "numpy", "torch", "transformers", "flwr"):
        assert f" {heavy}" not in imported.replace("|", " "), heavy
    version = run_floe("--version", env_home=home)
    assert version.returncode == 0 and version.stdout.strip() == f"floe {__version__}"


def test_chat_path_never_imports_training_or_federation(home):
    code = ("import sys, floe_app.cli as c; c.main(['ask', 'hi']);"
            "print(sorted(m for m in ('torch', 'transformers', 'flwr', 'peft')"
            " if m in sys.modules))")
    env = {**os.environ, "FLOE_HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]")


def test_ask_streams_an_answer_and_records_it(home):
    result = run_floe("ask", "What", "is", "the", "capital", "of", "France?", env_home=home)
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    assert answer
    store = Store(home / "data" / "floe.db")
    conversation = store.conversations()[0]
    user, reply = store.messages(conversation.id)
    assert user.content == "What is the capital of France?"
    assert reply.content.strip() == answer and reply.status == "complete"


def test_ask_json_prints_one_object_with_stats(home):
    result = run_floe("ask", "--json", "Say hello", env_home=home)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"].strip()
    stats = data["stats"]
    assert stats["mode"] == "local" and stats["tokens"] > 0
    assert stats["ttft_ms"] > 0 and stats["tokens_per_s"] > 0
    again = run_floe("ask", "--json", "-c", str(data["conversation_id"]), "And again?",
                     env_home=home)
    assert json.loads(again.stdout)["conversation_id"] == data["conversation_id"]


def test_ask_reads_standard_input(home):
    result = run_floe("ask", "-", input="Reply with one word.\n", env_home=home)
    assert result.returncode == 0 and result.stdout.strip()


def test_usage_errors_exit_2(home):
    assert run_floe("ask", "", env_home=home).returncode == 2
    empty = run_floe("ask", input="   \n", env_home=home)
    assert empty.returncode == 2 and "the prompt is empty" in one_line_error(empty)
    assert run_floe("history", env_home=home).returncode == 2
    assert run_floe("no-such-command", env_home=home).returncode == 2
    assert run_floe("history", "show", "abc", env_home=home).returncode == 2


def test_missing_model_is_one_line_and_exit_1(home, tmp_path):
    result = run_floe("--model", str(tmp_path / "missing.gguf"), "ask", "hi", env_home=home)
    assert result.returncode == 1
    assert "model file not found" in one_line_error(result)


def test_corrupt_model_is_reported_by_ask_and_doctor(home, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    with bundled_model_path().open("rb") as fh:
        corrupt.write_bytes(fh.read(1_000_000))
    result = run_floe("--model", str(corrupt), "ask", "hi", env_home=home)
    assert result.returncode == 1 and "corrupt, truncated" in one_line_error(result)
    doctor = run_floe("--model", str(corrupt), "doctor", env_home=home)
    assert doctor.returncode == 1 and "PROBLEM: llama.cpp could not load" in doctor.stdout


def test_doctor_reports_model_cpu_paths_and_versions(home):
    result = run_floe("doctor", "--json", env_home=home)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["model"]["status"] == "ok"
    assert report["model"]["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert report["model"]["size_bytes"] > 90e6 and report["model"]["vocab"] == 49152
    assert report["paths"]["database"] == str(home / "data" / "floe.db")
    assert report["cpu"]["logical_cores"] >= 1 and report["threads"] >= 1
    assert report["packages"]["llama-cpp-python"].startswith("0.3")
    amx = "amx" in Path("/proc/cpuinfo").read_text()
    assert bool(report["workarounds"]) == amx
    text = run_floe("doctor", env_home=home).stdout
    assert "Workarounds" in text and "Model" in text and "floe.db" in text


def test_bad_config_warns_naming_the_key_and_still_answers(home):
    (home / "config" / "config.toml").write_text(
        '[chat]\ntemperature = "warm"\nmax_tokens = 16\nwhatever = 1\n')
    result = run_floe("ask", "hi", env_home=home)
    assert result.returncode == 0 and result.stdout.strip()
    assert "chat.temperature = 'warm' is not allowed" in result.stderr
    assert "unknown key chat.whatever" in result.stderr


def test_history_list_show_search_export(home, tmp_path):
    run_floe("ask", "Tell me about penguins", env_home=home)
    listing = run_floe("history", "list", "--json", env_home=home)
    conversations = json.loads(listing.stdout)
    assert [c["title"] for c in conversations] == ["Tell me about penguins"]
    cid = str(conversations[0]["id"])
    shown = run_floe("history", "show", cid, env_home=home)
    assert shown.stdout.startswith("# Tell me about penguins") and "## Floe" in shown.stdout
    found = json.loads(run_floe("history", "search", "penguins", "--json",
                                env_home=home).stdout)
    assert found and found[0]["conversation_id"] == int(cid)
    out = tmp_path / "chat.json"
    exported = run_floe("history", "export", cid, "--format", "json", "-o", str(out),
                        env_home=home)
    assert exported.returncode == 0 and exported.stdout.strip() == str(out)
    assert json.loads(out.read_text())["messages"][0]["content"] == "Tell me about penguins"
    missing = run_floe("history", "show", "999", env_home=home)
    assert missing.returncode == 1 and "no conversation with id 999" in one_line_error(missing)


@pytest.mark.slow
def test_huge_paste_is_clipped_with_a_note_and_stored_whole(home):
    paste = ("Here is a long document. " * 5000)[:100_000]
    (home / "config" / "config.toml").write_text(GREEDY + "[model]\ncontext_tokens = 1024\n")
    result = run_floe("ask", input=paste, env_home=home)
    assert result.returncode == 0, result.stderr
    assert "floe: note: Your message (100,000 characters" in result.stderr
    store = Store(home / "data" / "floe.db")
    assert store.messages(store.conversations()[0].id)[0].content == paste


@pytest.mark.slow
def test_database_held_by_another_process(home):
    # Two Floe processes at once both work (WAL, busy timeout).
    procs = [subprocess.Popen([sys.executable, "-m", "floe_app", "ask", f"Question {i}"],
                              env={**os.environ, "FLOE_HOME": str(home)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = Store(home / "data" / "floe.db")
    assert len(store.conversations()) == 2
    store.close()
    # A process that holds the write lock past the timeout gives a clear error, no traceback.
    blocker = sqlite3.connect(home / "data" / "floe.db")
    blocker.execute("begin immediate")
    try:
        result = run_floe("ask", "blocked?", env_home=home)
    finally:
        blocker.rollback()
        blocker.close()
    assert result.returncode == 1 and "is busy" in one_line_error(result)


@pytest.mark.slow
def test_kill_9_mid_reply_keeps_the_partial_reply(home):
    (home / "config" / "config.toml").write_text(
        '[chat]\ntemperature = 0.8\nseed = 1\nmax_tokens = 2000\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "floe_app", "ask", "Write a very long story about a dragon."],
        env={**os.environ, "FLOE_HOME": str(home)}, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = home / "data" / "floe.db"
    partial = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            with sqlite3.connect(db) as conn:
                row = conn.execute("select content from messages where role = 'assistant'"
                                   " and status = 'streaming'").fetchone() if conn.execute(
                    "select name from sqlite_master where name = 'messages'").fetchone() else None
            if row and len(row[0]) > 20:
                partial = row[0]
                break
        time.sleep(0.05)
    assert partial, "the reply never showed up in the database while streaming"
    proc.send_signal(signal.SIGKILL)
    printed = proc.stdout.read().decode()
    proc.wait()
    shown = run_floe("history", "show", "1", env_home=home)
    assert "## Floe _(interrupted)_" in shown.stdout
    store = Store(home / "data" / "floe.db")
    reply = store.messages(1)[-1]
    assert reply.status == "interrupted"
    assert reply.content.startswith(partial) and printed.startswith(reply.content)


def test_remember_memories_forget(home):
    result = run_floe("remember", "I", "live", "in", "Lisbon.", env_home=home)
    assert result.returncode == 0 and result.stdout.startswith("Remembered (note 1)")
    assert run_floe("memories", env_home=home).stdout.strip() == "1. I live in Lisbon."
    assert run_floe("forget", "1", env_home=home).stdout.strip() == "Forgot note 1."
    missing = run_floe("forget", "1", env_home=home)
    assert missing.returncode == 1 and "no memory note 1" in one_line_error(missing)


def test_the_federation_bundle_holds_the_defaults_of_floe_federation_serve():
    """`flwr run` on the bundle alone gets what `floe federation serve` would pass."""
    import tomllib

    from floe_app.cli import build_parser, serve_run_config

    bundle = tomllib.loads((REPO / "floe_app/federated/bundle/pyproject.toml").read_text())
    config = bundle["tool"]["flwr"]["app"]["config"]
    served = serve_run_config(build_parser().parse_args(["federation", "serve"]))
    assert {k: v for k, v in config.items() if k not in ("state-dir", "model")} == served
