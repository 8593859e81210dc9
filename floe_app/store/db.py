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
    private: int | None = None
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
    rating: int | None = None
    correction: str | None = None


@dataclass
class TaughtReply:
    """An assistant reply the user accepted (thumbs up) or corrected, with its question."""

    message_id: int
    question: str
    reply: str
    rating: int | None
    correction: str | None


@dataclass
class AdapterRow:
    version: int
    created_at: str
    path: str
    sha256: str
    size: int
    base_model: str | None
    status: str
    reason: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FederationRound:
    """A federated round this device took part in or declined, and its privacy cost."""

    id: int
    created_at: str
    federation: str
    run_id: str | None
    round: int | None
    rank: int | None
    examples: int | None
    bytes_sent: int | None
    noise_multiplier: float | None
    clip_norm: float | None
    epsilon: float | None  # spent by this device after this upload
    outcome: str  # uploaded | declined | refused
    reason: str | None


@dataclass
class SharedAdapter:
    """A shared adapter received from a federation, at this device's rank."""

    id: int
    created_at: str
    federation: str
    run_id: str | None
    round: int | None  # None: the final one
    path: str
    sha256: str
    size: int
    rank: int
    base_model: str


@dataclass
class SearchHit:
    message_id: int
    conversation_id: int
    conversation_title: str
    role: str
    snippet: str
    created_at: str


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process that its parent (init, for a service) has not reaped yet is a zombie:
    # it runs nothing, and on some systems it stays one for a second or more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) is all there is


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

    def conversations_matching(self, query: str) -> list[Conversation]:
        """Conversations with `query` in their title or (full text) in a message, newest
        first; every conversation for an empty query (the chat's sidebar search)."""
        conversations = self.conversations()
        query = query.strip()
        if not query:
            return conversations
        hit_ids = {hit.conversation_id for hit in self.search(query)}
        return [c for c in conversations
                if c.id in hit_ids or query.lower() in c.title.lower()]

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

    def set_conversation_private(self, conversation_id: int, private: bool) -> None:
        with self._write():
            self.db["conversations"].update(conversation_id, {"private": int(private)})

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
                if not pid_alive(r["writer_pid"]) or r["updated_at"] < stale_before]
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

    # What the local model learns from

    def rate_message(self, message_id: int, rating: int | None) -> None:
        """1 thumbs up, -1 thumbs down, None neither."""
        with self._write():
            self.db["messages"].update(message_id, {"rating": rating})

    def correct_message(self, message_id: int, correction: str | None) -> None:
        """Keep the reply as it was shown; the correction is what the model should have said."""
        with self._write():
            self.db["messages"].update(message_id, {"correction": correction or None})

    def set_learn(self, message_id: int, learn: bool) -> None:
        with self._write():
            self.db["messages"].update(message_id, {"learn": None if learn else 0})

    def taught_replies(self, *, shareable: bool = False) -> list[TaughtReply]:
        """Replies accepted or corrected and not removed from learning, with the user message
        each answered. `shareable`: leave out conversations marked private."""
        private = " and coalesce(c.private, 0) = 0" if shareable else ""
        with self._guard():
            rows = self.db.query(
                "select m.id, m.content, m.rating, m.correction, (select q.content from messages"
                " q where q.conversation_id = m.conversation_id and q.id < m.id and q.role ="
                " 'user' order by q.id desc limit 1) as question from messages m"
                " join conversations c on c.id = m.conversation_id"
                " where m.role = 'assistant' and coalesce(m.learn, 1) != 0"
                " and (m.correction is not null or m.rating = 1)" + private + " order by m.id")
            return [TaughtReply(r["id"], r["question"] or "", r["content"], r["rating"],
                                r["correction"]) for r in rows]

    # Adapter versions

    def add_adapter(self, *, path: str, sha256: str, size: int, base_model: str, status: str,
                    reason: str = "", meta: dict[str, Any] | None = None) -> int:
        with self._write():
            table = self.db["adapters"].insert({
                "created_at": now_iso(), "path": path, "sha256": sha256, "size": size,
                "base_model": base_model, "status": status, "reason": reason,
                "meta": json.dumps(meta or {}),
            })
        return int(table.last_pk)

    def set_adapter_status(self, version: int, status: str, reason: str = "") -> None:
        with self._write():
            self.db["adapters"].update(version, {"status": status, "reason": reason})

    def adapters(self) -> list[AdapterRow]:
        with self._guard():
            return [_adapter(r) for r in self.db.query("select * from adapters order by version")]

    def adapter(self, version: int) -> AdapterRow | None:
        with self._guard():
            rows = list(self.db.query("select * from adapters where version = ?", [version]))
        return _adapter(rows[0]) if rows else None

    def activate_adapter(self, version: int) -> None:
        """Make `version` (0: none) the one the chat uses, remembering the one before."""
        with self._write():
            self.db["adapter_history"].insert({"version": version, "activated_at": now_iso()})

    def adapter_history(self) -> list[int]:
        """Versions activated, oldest first; the last is the active one."""
        with self._guard():
            return [r["version"] for r in self.db.query(
                "select version from adapter_history order by id")]

    def pop_adapter_history(self) -> None:
        with self._write():
            self.db.execute("delete from adapter_history where id ="
                            " (select max(id) from adapter_history)")

    # Federation

    def add_federation_round(self, *, federation: str, run_id: str | None, round_number: int | None,
                             rank: int | None, examples: int, bytes_sent: int,
                             noise_multiplier: float | None, clip_norm: float | None,
                             outcome: str, reason: str = "",
                             epsilon: float | None = None) -> int:
        with self._write():
            table = self.db["federation_rounds"].insert({
                "created_at": now_iso(), "federation": federation, "run_id": run_id,
                "round": round_number, "rank": rank, "examples": examples, "bytes_sent": bytes_sent,
                "noise_multiplier": noise_multiplier, "clip_norm": clip_norm,
                "epsilon": epsilon, "outcome": outcome, "reason": reason})
        return int(table.last_pk)

    def federation_rounds(self) -> list[FederationRound]:
        with self._guard():
            rows = self.db.query("select * from federation_rounds order by id")
            return [FederationRound(**row) for row in rows]

    def add_shared_adapter(self, *, federation: str, run_id: str | None, round_number: int | None,
                           path: str, sha256: str, size: int, rank: int,
                           base_model: str) -> int:
        with self._write():
            table = self.db["shared_adapters"].insert({
                "created_at": now_iso(), "federation": federation, "run_id": run_id,
                "round": round_number, "path": path, "sha256": sha256, "size": size, "rank": rank,
                "base_model": base_model})
        return int(table.last_pk)

    def shared_adapters(self) -> list[SharedAdapter]:
        with self._guard():
            rows = self.db.query("select * from shared_adapters order by id")
            return [SharedAdapter(**row) for row in rows]

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


def _adapter(row: dict[str, Any]) -> AdapterRow:
    return AdapterRow(**{**row, "meta": json.loads(row["meta"] or "{}")})


def _message(row: dict[str, Any]) -> Message:
    return Message(
        id=row["id"], conversation_id=row["conversation_id"], role=row["role"],
        content=row["content"], status=row["status"], created_at=row["created_at"],
        model=row["model"], mode=row["mode"], stats=json.loads(row["stats"] or "{}"),
        rating=row.get("rating"), correction=row.get("correction"),
    )

