"""Conversations and messages in SQLite (WAL), shared safely by Floe's threads and processes.

A reply is written while it streams (status "streaming", with the writer's pid), so a crash
or kill -9 loses at most the last flush interval; the next start marks it "interrupted".
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from floe_app.errors import StoreBusyError
from floe_app.store.migrations import apply_migrations

# A streaming reply not touched for this long is interrupted even if its pid is alive
# again (pids are reused); writers flush several times a second.
STALE_AFTER = timedelta(seconds=60)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Conversation:
    id: int
    title: str
    created_at: str
    updated_at: str
    mode: str | None = None
    message_count: int = 0


@dataclass
class LedgerRow:
    id: int
    created_at: str
    finished_at: str | None
    endpoint: str
    model: str | None
    conversation_id: int | None
    purpose: str | None
    text_sent: str
    bytes_sent: int
    bytes_received: int | None
    outcome: str | None


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    status: str
    created_at: str
    model: str | None = None
    mode: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchHit:
    message_id: int
    conversation_id: int
    conversation_title: str
    role: str
    snippet: str
    created_at: str


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """All reads and writes of Floe's database. Safe to share between threads."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        # The TUI streams replies from worker threads; one lock serializes this connection.
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=busy_timeout_s)
        self._lock = threading.RLock()
        self.db = Database(conn)
        with self._guard(), self._setup_lock():
            self.db.enable_wal()
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self.migrations_applied = apply_migrations(self.db)

    @contextmanager
    def _setup_lock(self) -> Iterator[None]:
        """Serialize schema setup between Floe processes starting at the same moment.

        The migrations cannot run in one SQLite transaction (FTS setup commits on its own),
        so a lock on a small sidecar database stands in for one; it works on every OS.
        """
        lock = sqlite3.connect(self.path.with_name(self.path.name + ".setup-lock"),
                               timeout=max(self.busy_timeout_s, 30.0), isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            lock.close()

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if "locked" in text or "busy" in text:
                    raise StoreBusyError(
                        f"the database {self.path} is busy: another Floe process has held it"
                        f" for over {self.busy_timeout_s:g} s; try again"
                    ) from exc
                raise

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self._guard(), self.db.conn:
            yield

    # Conversations

    def create_conversation(self, title: str = "New chat") -> int:
        stamp = now_iso()
        with self._write():
            table = self.db["conversations"].insert(
                {"title": title, "created_at": stamp, "updated_at": stamp}
            )
        return int(table.last_pk)

    def conversations(self) -> list[Conversation]:
        with self._guard():
            rows = self.db.query(
                "select c.*, (select count(*) from messages m where m.conversation_id = c.id)"
                " as message_count from conversations c order by c.updated_at desc, c.id desc"
            )
            return [Conversation(**row) for row in rows]

    def conversation(self, conversation_id: int) -> Conversation | None:
        with self._guard():
            rows = list(self.db.query(
                "select c.*, (select count(*) from messages m where m.conversation_id = c.id)"
                " as message_count from conversations c where c.id = ?", [conversation_id]
            ))
        return Conversation(**rows[0]) if rows else None

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        with self._write():
            self.db["conversations"].update(
                conversation_id, {"title": title, "updated_at": now_iso()}
            )

    def set_conversation_mode(self, conversation_id: int, mode: str | None) -> None:
        with self._write():
            self.db["conversations"].update(conversation_id, {"mode": mode})

    def delete_conversation(self, conversation_id: int) -> None:
        with self._write():
            self.db["messages"].delete_where("conversation_id = ?", [conversation_id])
            self.db["conversations"].delete_where("id = ?", [conversation_id])

    # Messages

    def add_message(self, conversation_id: int, role: str, content: str, *,
                    status: str = "complete", model: str | None = None,
                    mode: str | None = None, stats: dict[str, Any] | None = None) -> int:
        stamp = now_iso()
        with self._write():
            table = self.db["messages"].insert({
                "conversation_id": conversation_id, "role": role, "content": content,
                "created_at": stamp, "updated_at": stamp, "model": model, "mode": mode,
                "status": status, "stats": json.dumps(stats or {}),
                "writer_pid": os.getpid() if status == "streaming" else None,
            })
            self.db["conversations"].update(conversation_id, {"updated_at": stamp})
        return int(table.last_pk)

    def update_message(self, message_id: int, *, content: str | None = None,
                       status: str | None = None, stats: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {"updated_at": now_iso()}
        if content is not None:
            values["content"] = content
        if status is not None:
            values["status"] = status
            if status != "streaming":
                values["writer_pid"] = None
        if stats is not None:
            values["stats"] = json.dumps(stats)
        with self._write():
            self.db["messages"].update(message_id, values)

    def messages(self, conversation_id: int) -> list[Message]:
        with self._guard():
            rows = self.db.query(
                "select * from messages where conversation_id = ? order by id", [conversation_id]
            )
            return [_message(row) for row in rows]

    def message(self, message_id: int) -> Message | None:
        with self._guard():
            rows = list(self.db.query("select * from messages where id = ?", [message_id]))
        return _message(rows[0]) if rows else None

    def mark_interrupted(self) -> int:
        """Mark replies whose writer died mid-stream as interrupted; returns how many."""
        stale_before = (datetime.now(UTC) - STALE_AFTER).isoformat(timespec="milliseconds")
        with self._guard():
            rows = list(self.db.query(
                "select id, writer_pid, updated_at from messages where status = 'streaming'"
            ))
        dead = [r["id"] for r in rows
                if not _pid_alive(r["writer_pid"]) or r["updated_at"] < stale_before]
        for message_id in dead:
            self.update_message(message_id, status="interrupted")
        return len(dead)

    # Memory notes

    def add_memory(self, text: str) -> int:
        with self._write():
            table = self.db["memories"].insert({"text": text, "created_at": now_iso()})
        return int(table.last_pk)

    def memories(self) -> list[tuple[int, str]]:
        with self._guard():
            return [(r["id"], r["text"]) for r in self.db.query(
                "select id, text from memories order by id")]

    def delete_memory(self, memory_id: int) -> bool:
        with self._write():
            return self.db.execute("delete from memories where id = ?",
                                   [memory_id]).rowcount > 0

    # Privacy ledger

    def record_request(self, *, endpoint: str, model: str, text_sent: str, bytes_sent: int,
                       conversation_id: int | None = None, purpose: str = "") -> int:
        """Write the ledger row before the request leaves, so even a crash keeps it."""
        with self._write():
            table = self.db["ledger"].insert({
                "created_at": now_iso(), "endpoint": endpoint, "model": model,
                "conversation_id": conversation_id, "purpose": purpose,
                "text_sent": text_sent, "bytes_sent": bytes_sent, "outcome": "sending",
            })
        return int(table.last_pk)

    def finish_request(self, ledger_id: int, *, bytes_received: int, outcome: str) -> None:
        with self._write():
            self.db["ledger"].update(ledger_id, {"finished_at": now_iso(),
                                                 "bytes_received": bytes_received,
                                                 "outcome": outcome})

    def ledger(self, limit: int = 100) -> list[LedgerRow]:
        with self._guard():
            rows = self.db.query("select * from ledger order by id desc limit ?", [limit])
            return [LedgerRow(**row) for row in rows]

    # Search

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Full-text search over every message; the query is taken as plain words."""
        words = [w for w in query.split() if w]
        if not words:
            return []
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        with self._guard():
            rows = self.db.query(
                "select m.id, m.conversation_id, c.title, m.role, m.created_at,"
                " snippet(messages_fts, 0, '[', ']', '…', 12) as snippet"
                " from messages_fts join messages m on m.rowid = messages_fts.rowid"
                " join conversations c on c.id = m.conversation_id"
                " where messages_fts match ? order by rank limit ?",
                [match, limit],
            )
            return [SearchHit(r["id"], r["conversation_id"], r["title"], r["role"],
                              r["snippet"], r["created_at"]) for r in rows]


def _message(row: dict[str, Any]) -> Message:
    return Message(
        id=row["id"], conversation_id=row["conversation_id"], role=row["role"],
        content=row["content"], status=row["status"], created_at=row["created_at"],
        model=row["model"], mode=row["mode"], stats=json.loads(row["stats"] or "{}"),
    )

