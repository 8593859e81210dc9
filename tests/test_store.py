import multiprocessing
import sqlite3
import time

import pytest

from floe_app.errors import StoreBusyError
from floe_app.store import Store
from floe_app.store.migrations import MIGRATIONS, apply_migrations


def test_migrations_are_recorded_and_applied_once(paths):
    store = Store(paths.database)
    assert store.migrations_applied == [name for name, _ in MIGRATIONS]
    recorded = [row["name"] for row in store.db["_migrations"].rows]
    assert recorded == [name for name, _ in MIGRATIONS]
    store.close()
    again = Store(paths.database)
    assert again.migrations_applied == []
    assert apply_migrations(again.db) == []
    assert again.db.conn.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_a_new_migration_is_applied_on_top_of_existing_data(paths):
    store = Store(paths.database)
    cid = store.create_conversation("kept")
    added = apply_migrations(store.db, [*MIGRATIONS, ("999_tags", lambda db: db["tags"].create(
        {"id": int, "name": str}, pk="id"))])
    assert added == ["999_tags"] and store.db["tags"].exists()
    assert store.conversation(cid).title == "kept"


def test_conversations_messages_and_order(store):
    first = store.create_conversation("first")
    second = store.create_conversation("second")
    time.sleep(0.002)  # timestamps have millisecond resolution
    store.add_message(first, "user", "hello")
    assert [c.id for c in store.conversations()] == [first, second]
    time.sleep(0.002)
    store.rename_conversation(second, "renamed")
    assert store.conversations()[0].title == "renamed"
    reply = store.add_message(first, "assistant", "", status="streaming", model="m", mode="local")
    store.update_message(reply, content="hi there", status="complete", stats={"tokens": 2})
    messages = store.messages(first)
    assert [(m.role, m.content, m.status) for m in messages] == [
        ("user", "hello", "complete"), ("assistant", "hi there", "complete")]
    assert messages[1].stats == {"tokens": 2} and messages[1].model == "m"
    store.delete_conversation(first)
    assert store.conversation(first) is None and store.messages(first) == []
    assert store.search("hello") == []


def test_full_text_search_finds_words_stems_and_survives_odd_queries(store):
    cid = store.create_conversation("pets")
    store.add_message(cid, "user", "My dog Biscotti loves running in the park")
    store.add_message(cid, "assistant", "Dogs need daily walks.")
    other = store.create_conversation("cooking")
    store.add_message(other, "user", "A recipe for biscotti, the Italian biscuit")
    hits = store.search("biscotti")
    assert {h.conversation_id for h in hits} == {cid, other}
    assert any("[Biscotti]" in h.snippet for h in hits)
    assert [h.role for h in store.search("run")] == ["user"]  # porter stemming: running
    for query in ['"unbalanced', "AND OR NOT", "dog*", "-", "   ", "(a", "naïve café"]:
        store.search(query)  # plain words: never an FTS syntax error
    reply = store.add_message(cid, "assistant", "", status="streaming")
    store.update_message(reply, content="quantum entanglement explained")
    assert [h.message_id for h in store.search("entanglement")] == [reply]


def test_the_sidebar_search_matches_titles_and_messages(store):
    pets = store.create_conversation("Pets")
    store.add_message(pets, "user", "My dog Biscotti loves the park")
    trip = store.create_conversation("Trip to Lisbon")
    assert [c.id for c in store.conversations_matching("lisbon")] == [trip]  # the title
    assert [c.id for c in store.conversations_matching("biscotti")] == [pets]  # a message
    assert [c.id for c in store.conversations_matching("  ")] == [trip, pets]  # everything
    assert store.conversations_matching("nothing like this") == []


def test_dead_writers_reply_is_marked_interrupted_live_ones_are_not(store):
    import os

    cid = store.create_conversation()
    live = store.add_message(cid, "assistant", "partial", status="streaming")
    dead = store.add_message(cid, "assistant", "also partial", status="streaming")
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    store.db["messages"].update(dead, {"writer_pid": proc.pid})
    assert store.message(live).status == "streaming"
    assert store.mark_interrupted() == 1
    assert store.message(dead).status == "interrupted"
    assert store.message(dead).content == "also partial"
    assert store.message(live).status == "streaming"
    assert os.getpid() == store.db["messages"].get(live)["writer_pid"]


def test_stale_streaming_reply_is_interrupted_even_if_its_pid_lives(store):
    cid = store.create_conversation()
    reply = store.add_message(cid, "assistant", "x", status="streaming")
    store.db["messages"].update(reply, {"updated_at": "2000-01-01T00:00:00.000+00:00"})
    assert store.mark_interrupted() == 1


def test_a_second_connection_sees_writes_and_a_held_lock_gives_a_clear_error(paths):
    first = Store(paths.database)
    second = Store(paths.database, busy_timeout_s=0.3)
    cid = first.create_conversation("shared")
    assert second.conversation(cid).title == "shared"
    blocker = sqlite3.connect(paths.database)
    blocker.execute("begin immediate")
    try:
        assert second.conversation(cid).title == "shared"  # WAL: reading still works
        with pytest.raises(StoreBusyError, match="busy: another Floe process"):
            second.add_message(cid, "user", "hello")
    finally:
        blocker.rollback()
        blocker.close()
    second.add_message(cid, "user", "hello")
    assert [m.content for m in first.messages(cid)] == ["hello"]
