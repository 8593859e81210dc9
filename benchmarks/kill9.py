"""kill -9 `floe ask` at random moments, many times, in one data folder; then check what a
user would: every message that was sent is stored whole, no reply is left "streaming" (the
next start marks it interrupted and keeps its partial text), SQLite's integrity check passes,
and the next reply works.

Each run asks the bundled model something new (half in a new conversation, half continuing
an earlier one) and is killed with SIGKILL after a delay drawn uniformly between 0 and 1.1x
the time a whole run takes here (measured first, so a few runs finish before their kill):
kills land during start-up, model loading, the prompt being stored and the reply streaming.

    .venv/bin/python -m benchmarks.kill9 [--kills 100] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "[chat]\ntemperature = 0.7\nmax_tokens = 48\n[learning]\nauto = false\n"
TOPICS = ("lighthouses", "bread", "comets", "bicycles", "tea", "volcanoes", "chess", "rivers")


@dataclass
class Report:
    kills: int = 0
    finished_before_kill: int = 0
    phases: Counter = field(default_factory=Counter)  # where the kills landed
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    full_run_s: float = 0.0
    interrupted: int = 0  # replies marked interrupted by a later start

    def lines(self) -> list[str]:
        where = ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items()))
        return [f"{self.kills} kills in {self.seconds:.0f} s (a whole run takes"
                f" {self.full_run_s:.1f} s here); {self.finished_before_kill} runs finished"
                f" before their kill", f"kills landed: {where}",
                f"replies marked interrupted on the next start: {self.interrupted}",
                "problems: " + ("; ".join(self.problems) if self.problems else "none")]


def floe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "floe_app", *args]


def _rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def kill_asks(home: Path, kills: int, seed: int = 1, log=None) -> Report:
    """Run `kills` killed `floe ask`s in FLOE_HOME=home; returns what was seen."""
    rng = random.Random(seed)
    env = {**os.environ, "FLOE_HOME": str(home)}
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_text(CONFIG)
    db = home / "data" / "floe.db"
    report = Report()
    started = time.monotonic()
    runs = []
    for _ in range(3):  # the first is cold (page cache); the median of three is used
        begin = time.monotonic()
        warm = subprocess.run(floe_command("ask", "--mode", "local", "Warm up: say hi."),
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        runs.append(time.monotonic() - begin)
        if warm.returncode != 0:
            raise RuntimeError(f"floe ask failed before any kill: {warm.stderr}")
    report.full_run_s = sorted(runs)[1]
    sent: dict[str, str] = {}  # marker -> the prompt as sent
    printed: dict[str, str] = {}  # marker -> what the killed process had printed
    attempts = 0
    while report.kills < kills:
        attempts += 1
        marker = f"k9-{attempts}"
        prompt = f"({marker}) Tell me something about {rng.choice(TOPICS)}."
        args = ["ask", "--mode", "local", prompt]
        conversations = [r[0] for r in _rows(db, "select id from conversations")]
        if conversations and rng.random() < 0.5:
            args[1:1] = ["--conversation", str(rng.choice(conversations))]
        delay = rng.uniform(0.0, 1.1 * report.full_run_s)  # a few finish first
        proc = subprocess.Popen(floe_command(*args), env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is not None:
            report.finished_before_kill += 1
            proc.stdout.read()
            sent[marker] = prompt
            continue
        proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read().decode("utf-8", "replace")
        proc.wait()
        report.kills += 1
        sent[marker] = prompt
        printed[marker] = out
        stored = _rows(db, "select content from messages where role = 'user' and content = ?",
                       (prompt,)) if db.exists() else []
        streaming = _rows(db, "select count(*) from messages m join messages u on"
                          " u.conversation_id = m.conversation_id and u.role = 'user' and"
                          " u.content = ? and u.id < m.id where m.status = 'streaming'",
                          (prompt,))[0][0] if stored else 0
        phase = ("reply streaming" if out.strip() or streaming else
                 "prompt stored, reply not begun" if stored else "before the prompt was stored")
        report.phases[phase] += 1
        if out.strip() and not stored:
            report.problems.append(f"{marker}: printed a reply but its prompt is not stored")
        check = _rows(db, "pragma integrity_check") if db.exists() else [("ok",)]
        if check != [("ok",)]:
            report.problems.append(f"after kill {report.kills}: integrity_check {check}")
        if log:
            log(f"kill {report.kills:>3} at {delay:4.2f} s: {phase}")
    # The next start: a reply that completes, and every killed reply marked interrupted.
    final = subprocess.run(floe_command("ask", "--mode", "local", "--json", "Still there?"),
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    report.seconds = time.monotonic() - started
    if final.returncode != 0:
        report.problems.append(f"the next reply failed: {final.stderr.strip()[-300:]}")
    else:
        reply = json.loads(final.stdout)
        row = _rows(db, "select status, content from messages where id = ?",
                    (reply["message_id"],))
        if not reply["text"].strip() or row != [("complete", reply["text"])]:
            report.problems.append(f"the next reply was not stored complete: {row}")
    _check_store(db, sent, printed, report)
    return report


def _check_store(db: Path, sent: dict[str, str], printed: dict[str, str],
                 report: Report) -> None:
    from floe_app.store import Store

    check = _rows(db, "pragma integrity_check")
    if check != [("ok",)]:
        report.problems.append(f"integrity_check: {check}")
    store = Store(db)
    try:
        users = {}
        for conversation in store.conversations():
            messages = store.messages(conversation.id)
            for i, m in enumerate(messages):
                if m.status == "streaming":
                    report.problems.append(f"message {m.id} left streaming")
                if m.role == "user":
                    users[m.content] = users.get(m.content, 0) + 1
                    continue
                if m.status == "interrupted":
                    report.interrupted += 1
                question = next((q.content for q in reversed(messages[:i]) if q.role == "user"),
                                "")
                marker = question[1:question.index(")")] if question.startswith("(k9-") else ""
                out = printed.get(marker)
                if out is not None and not out.startswith(m.content):
                    report.problems.append(f"reply {m.id}: stored text is not what was shown")
        for marker, prompt in sent.items():
            if users.get(prompt, 0) > 1:
                report.problems.append(f"{marker}: stored {users[prompt]} times")
            if printed.get(marker, "").strip() and prompt not in users:
                report.problems.append(f"{marker}: a reply was shown but the prompt is lost")
        lost = sum(1 for m, p in sent.items() if m not in printed and p not in users)
        if lost:
            report.problems.append(f"{lost} prompts of runs that finished are not stored")
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="floe-kill9-"))
    report = kill_asks(root / "home", args.kills, args.seed,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(report.lines()))
    if args.keep:
        print(f"data folder: {root / 'home'}")
    else:
        import shutil

        shutil.rmtree(root)
    raise SystemExit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
