"""Schema changes, applied in order and recorded in the `_migrations` table."""

from __future__ import annotations

from collections.abc import Callable

from sqlite_utils import Database

Migration = Callable[[Database], None]


def m001_conversations_and_messages(db: Database) -> None:
    db["conversations"].create(
        {"id": int, "title": str, "created_at": str, "updated_at": str},
        pk="id",
        not_null={"title", "created_at", "updated_at"},
    )
    db["messages"].create(
        {
            "id": int,
            "conversation_id": int,
            "role": str,
            "content": str,
            "created_at": str,
            "updated_at": str,
            "model": str,
            "mode": str,
            # complete | streaming | stopped | interrupted | error
            "status": str,
            "stats": str,
            # Which process streams this reply: a dead writer means it was interrupted.
            "writer_pid": int,
        },
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
        not_null={"conversation_id", "role", "content", "created_at", "updated_at", "status"},
    )
    db["messages"].create_index(["conversation_id", "id"])
    db["messages"].create_index(["status"])
    db["messages"].enable_fts(["content"], create_triggers=True, tokenize="porter unicode61")


def m002_modes_and_privacy_ledger(db: Database) -> None:
    # Reply mode chosen for a conversation (local, cloud, fused); NULL follows the default.
    db["conversations"].add_column("mode", str)
    # Every request that left the machine: what was sent (after redaction) and how much.
    db["ledger"].create(
        {
            "id": int,
            "created_at": str,
            "finished_at": str,
            "endpoint": str,
            "model": str,
            "conversation_id": int,
            "purpose": str,
            "text_sent": str,
            "bytes_sent": int,
            "bytes_received": int,
            "outcome": str,
        },
        pk="id",
        not_null={"created_at", "endpoint", "text_sent", "bytes_sent"},
    )
    db["ledger"].create_index(["created_at"])


def m003_memories(db: Database) -> None:
    # Facts the user asked Floe to remember: private context for the local model only.
    db["memories"].create({"id": int, "text": str, "created_at": str}, pk="id",
                          not_null={"text", "created_at"})


def m004_learning(db: Database) -> None:
    # What the user taught by hand: 1 thumbs up, -1 thumbs down; a corrected reply's text.
    db["messages"].add_column("rating", int)
    db["messages"].add_column("correction", str)
    # 0: the user removed this reply from what the local model learns from.
    db["messages"].add_column("learn", int)
    # Trained adapter versions; the files live in data/adapters, checked by sha256.
    db["adapters"].create(
        {
            "version": int,
            "created_at": str,
            "path": str,
            "sha256": str,
            "size": int,
            "base_model": str,
            # promoted (passed the gate) | rejected (kept, not used) | broken (file unusable)
            "status": str,
            "reason": str,
            "meta": str,
        },
        pk="version",
        not_null={"created_at", "path", "sha256", "size", "status"},
    )
    # Which version the chat uses: the last row wins; rollback deletes it.
    db["adapter_history"].create({"id": int, "version": int, "activated_at": str}, pk="id",
                                 not_null={"activated_at"})


def m005_federation(db: Database) -> None:
    # 1: never shared with a federation (personal learning still uses it).
    db["conversations"].add_column("private", int)
    # Every round this device took part in (or declined), with what it cost in privacy.
    db["federation_rounds"].create(
        {
            "id": int,
            "created_at": str,
            "federation": str,
            "run_id": str,  # Flower run ids are unsigned 64-bit: beyond SQLite integers
            "round": int,
            "rank": int,
            "examples": int,
            "bytes_sent": int,
            "noise_multiplier": float,
            "clip_norm": float,
            # spent by this device after this upload, at federation.delta
            "epsilon": float,
            # uploaded | declined | refused (the shared adapter failed our checks)
            "outcome": str,
            "reason": str,
        },
        pk="id",
        not_null={"created_at", "federation", "outcome"},
    )
    # Shared adapters received from a federation, at this device's rank; the chat composes
    # the newest accepted one with the personal adapter.
    db["shared_adapters"].create(
        {
            "id": int,
            "created_at": str,
            "federation": str,
            "run_id": str,  # Flower run ids are unsigned 64-bit: beyond SQLite integers
            "round": int,
            "path": str,
            "sha256": str,
            "size": int,
            "rank": int,
            "base_model": str,
        },
        pk="id",
        not_null={"created_at", "path", "sha256", "size"},
    )


MIGRATIONS: list[tuple[str, Migration]] = [
    ("001_conversations_and_messages", m001_conversations_and_messages),
    ("002_modes_and_privacy_ledger", m002_modes_and_privacy_ledger),
    ("003_memories", m003_memories),
    ("004_learning", m004_learning),
    ("005_federation", m005_federation),
]


def apply_migrations(db: Database,
                     migrations: list[tuple[str, Migration]] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied now."""
    from floe_app.store.db import now_iso  # (db imports this module)

    table = db["_migrations"]
    if not table.exists():
        table.create({"name": str, "applied_at": str}, pk="name")
    done = {row["name"] for row in table.rows}
    applied = []
    for name, migrate in migrations:
        if name in done:
            continue
        with db.conn:
            migrate(db)
            table.insert({"name": name, "applied_at": now_iso()})
        applied.append(name)
    return applied

