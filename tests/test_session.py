"""A chat turn end to end: real model, real SQLite file."""

import json
import threading
from dataclasses import replace

import pytest

from floe_app.config import load_config
from floe_app.errors import FloeError, ModelError
from floe_app.session import (
    ChatSession,
    Delta,
    Finished,
    Notice,
    Saved,
    conversation_markdown,
    export_conversation,
    fit_prompt,
    title_from,
)
from tests.conftest import prompts_seen


def collect(events):
    events = list(events)
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 1 and events[-1] is finished[0]
    return events, finished[0]


def test_a_reply_is_streamed_and_stored_with_its_stats(session, store):
    cid = session.new_conversation()
    events, done = collect(session.reply(cid, "What is the capital of France?"))
    assert isinstance(events[0], Saved)
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    assert streamed == done.text and done.text.strip()
    user, reply = store.messages(cid)
    assert (user.role, user.content) == ("user", "What is the capital of France?")
    assert (reply.role, reply.content, reply.status) == ("assistant", done.text, "complete")
    assert reply.stats["mode"] == "local" and reply.stats["tokens"] > 0
    assert set(reply.stats) >= {"ttft_ms", "tokens", "tokens_per_s", "mode", "p95_gap_ms"}
    assert store.conversation(cid).title == "What is the capital of France?"


def test_the_reply_is_in_the_database_while_it_streams(session, store, monkeypatch):
    monkeypatch.setattr("floe_app.session.FLUSH_INTERVAL_S", 0.0)
    session.config.chat.max_tokens = 40
    cid = session.new_conversation()
    seen_while_streaming = []
    text = ""
    for event in session.reply(cid, "Tell me a story about a lighthouse."):
        if isinstance(event, Delta):
            text += event.text
            reply = store.messages(cid)[-1]
            seen_while_streaming.append((reply.status, reply.content))
    assert seen_while_streaming and all(s == "streaming" for s, _ in seen_while_streaming)
    assert all(text.startswith(content) for _, content in seen_while_streaming)
    assert seen_while_streaming[-1][1]  # content was written before the reply ended


def test_follow_up_sees_the_earlier_turns(session, store):
    cid = session.new_conversation()
    collect(session.reply(cid, "My name is Ada."))
    with prompts_seen(session.engine()) as seen:
        collect(session.reply(cid, "What is my name?"))
    assert "My name is Ada." in seen[0] and "What is my name?" in seen[0]
    assert len(store.messages(cid)) == 4


def test_empty_message_is_refused_and_nothing_is_stored(session, store):
    cid = session.new_conversation()
    with pytest.raises(FloeError, match="empty"):
        list(session.reply(cid, "  \n\t "))
    assert store.messages(cid) == []


def test_a_huge_paste_is_clipped_for_the_model_with_a_notice_and_stored_whole(session, store):
    cid = session.new_conversation()
    paste = "Summarize this. " + ("The quick brown fox jumps over the lazy dog. " * 2300)
    paste = paste[:100_000]
    events, done = collect(session.reply(cid, paste))
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert len(notices) == 1 and "100,000 characters" in notices[0]
    assert "left out" in notices[0] and "full text is saved" in notices[0]
    user = store.messages(cid)[0]
    assert user.content == paste and len(user.content) == 100_000
    assert done.stats["clipped"] is True
    assert done.stats["prompt_tokens"] <= session.engine().n_ctx


def test_fit_prompt_drops_oldest_turns_first(engine):
    system = [{"role": "system", "content": "Be brief."}]
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 60}
               for i in range(12)]
    user = {"role": "user", "content": "last question"}
    fitted = fit_prompt(engine, system, history, user, budget=700)
    tokens, notices = fitted.tokens, fitted.notices
    text = engine.detokenize(tokens)
    assert fitted.messages[0] == system[0] and fitted.messages[-1] == user
    assert len(tokens) <= 700 and "last question" in text and "turn 11" in text
    assert "turn 0 " not in text
    assert notices and "earlier messages were left out" in notices[0]
    whole = fit_prompt(engine, system, history[:2], user, budget=2000)
    assert whole.notices == [] and "turn 0" in engine.detokenize(whole.tokens)


def test_clipping_keeps_the_beginning_and_the_end(engine):
    content = "BEGIN " + "filler words here " * 2000 + " END?"
    tokens = fit_prompt(engine, [], [], {"role": "user", "content": content}, budget=300).tokens
    text = engine.detokenize(tokens)
    assert len(tokens) <= 300 and "BEGIN" in text and "END?" in text
    assert "characters left out to fit the context window" in text


def test_stopping_keeps_the_partial_reply_marked_stopped(session, store):
    session.config.chat.max_tokens = 200
    cid = session.new_conversation()
    cancel = threading.Event()
    deltas = 0
    events = []
    for event in session.reply(cid, "Tell me a long story about a lighthouse.", cancel):
        events.append(event)
        if isinstance(event, Delta):
            deltas += 1
            if deltas == 3:
                cancel.set()
    done = events[-1]
    assert isinstance(done, Finished) and done.status == "stopped"
    reply = store.messages(cid)[-1]
    assert reply.status == "stopped" and reply.content == done.text and reply.content


def test_abandoning_the_stream_marks_the_reply_stopped(session, store):
    cid = session.new_conversation()
    stream = session.reply(cid, "Write a poem about the sea.")
    for event in stream:
        if isinstance(event, Delta):
            break
    stream.close()
    assert store.messages(cid)[-1].status == "stopped"


def test_missing_model_keeps_the_users_message(store, config, tmp_path):
    session = ChatSession(store, config, model_override=str(tmp_path / "gone.gguf"))
    cid = session.new_conversation()
    with pytest.raises(ModelError, match="model file not found"):
        list(session.reply(cid, "are you there?"))
    assert [m.content for m in store.messages(cid)] == ["are you there?"]


def test_titles_and_markdown_export(store):
    assert title_from("\n\n  Hello world  \nsecond line") == "Hello world"
    assert title_from("x" * 100).endswith("…") and len(title_from("x" * 100)) == 48
    cid = store.create_conversation("Trip")
    store.add_message(cid, "user", "Plan a trip")
    store.add_message(cid, "assistant", "Go to **Lisbon**", status="interrupted")
    md = conversation_markdown(store.conversation(cid), store.messages(cid))
    assert md.startswith("# Trip") and "## You\n\nPlan a trip" in md
    assert "## Floe _(interrupted)_\n\nGo to **Lisbon**" in md


def test_one_export_for_the_chat_and_the_command_line(store, tmp_path):
    cid = store.create_conversation("Trip")
    store.add_message(cid, "user", "Plan a trip")
    conversation, messages = store.conversation(cid), store.messages(cid)
    markdown = export_conversation(conversation, messages, folder=tmp_path)
    assert markdown == tmp_path / f"floe-{cid}.md"
    assert markdown.read_text() == conversation_markdown(conversation, messages) + "\n"
    as_json = export_conversation(conversation, messages, "json", folder=tmp_path)
    assert json.loads(as_json.read_text())["messages"][0]["content"] == "Plan a trip"
    with pytest.raises(FloeError, match=r"^cannot write .*missing/x\.md: No such file"):
        export_conversation(conversation, messages, output=tmp_path / "missing" / "x.md")


def test_memory_notes_reach_the_local_model_and_can_be_forgotten(session, store):
    shown = session.run_command(None, "/remember   My dog's name is   Biscotti.  ")
    assert shown.startswith("Remembered (note 1)")
    session.run_command(None, "/remember Ich wohne in Köln. 東京に行きたい。")
    assert session.run_command(None, "/memories") == (
        "1. My dog's name is Biscotti.\n2. Ich wohne in Köln. 東京に行きたい。")
    cid = session.new_conversation()
    with prompts_seen(session.engine()) as seen:
        collect(session.reply(cid, "What is my dog's name?"))
    assert "My dog's name is Biscotti." in seen[0] and "Köln" in seen[0]
    assert session.run_command(None, "/forget 1") == "Forgot note 1."
    assert [t for _, t in store.memories()] == ["Ich wohne in Köln. 東京に行きたい。"]
    with pytest.raises(FloeError, match="no memory note 7"):
        session.run_command(None, "/forget 7")


def test_empty_and_huge_memory_notes_are_refused(session, store):
    with pytest.raises(FloeError, match="nothing to remember"):
        session.run_command(None, "/remember    ")
    with pytest.raises(FloeError, match="at most 2,000 characters"):
        session.run_command(None, "/remember " + "x" * 2001)
    assert store.memories() == []
    assert "/remember: remember a fact about you" in session.run_command(None, "/help")


def test_applying_settings_replaces_the_config_saves_it_and_says_what_changed(store, config,
                                                                              paths):
    session = ChatSession(store, config, paths=paths)
    new = replace(config, chat=replace(config.chat, max_tokens=77))
    applied = session.apply_settings(new)
    assert session.config is new and config.chat.max_tokens == 24  # replaced, not mutated
    assert applied.notices == [f"Settings saved to {paths.config_file}"]
    assert applied.errors == [] and not applied.reload_model
    assert load_config(paths)[0].chat.max_tokens == 77
    assert session.apply_settings(replace(new, model=replace(new.model, threads=3))).reload_model
