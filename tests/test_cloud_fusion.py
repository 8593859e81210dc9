"""Fused and cloud replies against a real OpenAI-compatible server, through a fault proxy.

The cloud is llama-cpp-python's server with gemma-3-270m (another tokenizer than the
SmolLM2 on-device model). Every fault is injected on the wire by tests.support.proxy.
"""

import json
import os
import re
import threading

import pytest

from floe_app.engine.fused import FusedChooser, FusionStats, PrivateCheck
from floe_app.engine.redact import Redactor
from floe_app.session import Delta, Finished, Notice
from tests.conftest import prompts_seen, run_floe
from tests.support.cloud_server import free_port

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


def reply(session, text=QUESTION, mode="fused", cancel=None):
    cid = session.new_conversation()
    events = list(session.reply(cid, text, cancel=cancel, mode=mode))
    done = events[-1]
    assert isinstance(done, Finished)
    notices = [e.text for e in events if isinstance(e, Notice)]
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    assert streamed == done.text
    return cid, done, notices


def local_text(make_session, config, text=QUESTION):
    config = type(config)(**vars(config))
    return reply(make_session(config), text, mode="local")[1].text


def test_fused_reply_uses_the_cloud_and_records_every_request(make_session, cloud_config,
                                                              store):
    cloud_config.fusion.deadline_ms = 2000  # wait for the cloud at unsure tokens: it must show
    cloud_config.fusion.wait_budget_ms = 60_000
    cloud_config.fusion.sure_prob = 1.0  # ... even where the local model is sure
    cloud_config.fusion.first_token_ms = 30_000  # a busy machine's stand-in starts slowly
    session = make_session(cloud_config)
    cid, done, _ = reply(session)
    cloud = done.stats["cloud"]
    assert done.status == "complete" and done.text.strip()
    assert cloud["requests"] >= 1 and cloud["agreed"] + cloud["fused"] > 0
    # The reply ends where the local model's turn does, not where the base-model cloud's
    # transcript would go on ("You are Floe, ...", "User: ...").
    assert "User:" not in done.text and "You are Floe" not in done.text
    assert abs(cloud["agreed"] + cloud["fused"] + cloud["absent"] - 1) < 0.01
    assert cloud["bytes_sent"] > 0 and cloud["bytes_received"] > 0
    rows = store.ledger()
    assert len(rows) == cloud["requests"] <= cloud_config.fusion.max_requests
    # Each request of the reply is numbered against the cap in the ledger.
    assert [r.purpose for r in reversed(rows)] == [
        f"fused, request {n} of at most 3" for n in range(1, len(rows) + 1)]
    assert all(r.conversation_id == cid and r.endpoint.endswith("/v1/completions")
               for r in rows)
    assert sum(r.bytes_sent for r in rows) == cloud["bytes_sent"]
    assert all(QUESTION in r.text_sent for r in rows)
    assert store.messages(cid)[-1].content == done.text
    # Its provenance covers the text, and shows the cloud wherever it took part.
    spans = store.messages(cid)[-1].stats["provenance"]
    assert sum(n for n, _ in spans) == len(done.text)
    from_cloud = {s for _, s in spans} & {"agreed", "overruled", "batch"}
    assert not from_cloud or cloud["agreed"] + cloud["overruled"] > 0
    assert from_cloud or cloud["agreed"] + cloud["overruled"] < 0.2


def test_first_token_never_waits_for_the_cloud(make_session, cloud_config, proxy):
    proxy.faults.delay_s = 0.5  # a 1 s round trip
    session = make_session(cloud_config)
    _, done, _ = reply(session)
    # The cloud cannot answer before 1 s; gap figures are benchmarks/fusion_latency.py's.
    assert done.stats["ttft_ms"] < 500
    assert done.stats["cloud"]["absent"] > 0


def test_unreachable_cloud_gives_exactly_the_local_reply(make_session, cloud_config, store):
    expected = local_text(make_session, cloud_config)
    cloud_config.cloud.base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    _, done, notices = reply(make_session(cloud_config))
    assert done.text == expected and done.status == "complete"
    assert any("could not be reached" in n for n in notices)
    assert done.stats["cloud"]["breaker"].startswith("the cloud could not be reached")
    assert store.ledger()[0].outcome == "unreachable"


@pytest.mark.parametrize(("status", "words"), [(429, "rate-limiting"), (500, "server error")])
def test_error_status_trips_the_breaker_and_the_reply_is_local(make_session, cloud_config,
                                                               proxy, store, status, words):
    expected = local_text(make_session, cloud_config)
    proxy.faults.status = status
    cid, done, notices = reply(make_session(cloud_config))
    assert done.text == expected
    assert any(words in n for n in notices)
    assert store.messages(cid)[-1].status == "complete"
    assert store.ledger()[0].outcome == {429: "rate_limited", 500: "server_error"}[status]


def test_stalled_stream_trips_the_breaker_and_the_reply_completes(make_session, cloud_config,
                                                                  proxy, store):
    proxy.faults.stall_after = 600  # the headers, then silence
    cloud_config.fusion.first_token_ms = 500
    cid, done, notices = reply(make_session(cloud_config))
    assert done.status == "complete" and done.text
    assert any("did not start answering within 500 ms" in n for n in notices)
    assert store.ledger()[0].outcome == "cancelled"
    assert store.messages(cid)[-1].content == done.text


def test_connection_reset_mid_stream_still_completes(make_session, cloud_config, proxy,
                                                     store):
    proxy.faults.reset_after = 900
    cloud_config.fusion.deadline_ms = 1000
    cid, done, _notices = reply(make_session(cloud_config))
    assert done.status == "complete" and done.text
    assert store.messages(cid)[-1].content == done.text
    outcomes = {r.outcome for r in store.ledger()}
    assert outcomes & {"broken_stream", "cancelled"}, outcomes


def test_slow_cloud_with_added_latency_still_completes(make_session, cloud_config, proxy):
    proxy.faults.delay_s = 0.2
    _, done, _ = reply(make_session(cloud_config))
    assert done.status == "complete" and done.text


def test_cloud_mode_streams_the_clouds_text_redacted_out_and_restored_back(
        make_session, cloud_config, store):
    cloud_config.chat.max_tokens = 16
    cloud_config.privacy.redact_terms = ["Biscotti"]
    text = "Repeat after me exactly: bob@example.com and Biscotti"
    _cid, done, _ = reply(make_session(cloud_config), text, mode="cloud")
    assert done.status == "complete" and done.stats["mode"] == "cloud"
    assert done.stats["tokens"] > 0 and done.stats["cloud"]["requests"] == 1
    sent = store.ledger()[0].text_sent
    assert "[EMAIL_1]" in sent and "[TERM_1]" in sent
    assert "bob@example.com" not in sent and "Biscotti" not in sent
    assert "[EMAIL_1]" not in done.text and "[TERM_1]" not in done.text


def test_cloud_mode_falls_back_to_local_when_the_cloud_fails(make_session, cloud_config,
                                                             proxy):
    proxy.faults.status = 500
    _, done, notices = reply(make_session(cloud_config), mode="cloud")
    assert any("local model answers instead" in n for n in notices)
    assert done.status == "complete" and done.text.strip()


def test_local_only_switch_sends_nothing(make_session, cloud_config, proxy, store):
    cloud_config.privacy.local_only = True
    _, done, notices = reply(make_session(cloud_config))
    assert done.stats["mode"] == "local" and "cloud" not in done.stats
    assert notices == ["Replying locally: local-only is on."]
    assert proxy.connections == 0 and store.ledger() == []


def test_stopping_a_fused_reply_cancels_the_cloud(make_session, cloud_config, store):
    cloud_config.chat.max_tokens = 200
    cancel = threading.Event()
    session = make_session(cloud_config)
    cid = session.new_conversation()
    for event in session.reply(cid, "Tell me a long story.", cancel=cancel, mode="fused"):
        if isinstance(event, Delta):
            cancel.set()
    reply_row = store.messages(cid)[-1]
    assert reply_row.status == "stopped"
    assert all(r.outcome != "sending" for r in store.ledger())


def test_api_key_is_sent_but_never_stored(make_session, cloud_config, paths):
    secret = "sk-floe-test-SECRET-1234"
    session = make_session(cloud_config, env={"OPENAI_API_KEY": secret})
    assert session.cloud_target().api_key == secret
    reply(session)
    session.store.close()
    for path in paths.data_dir.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_cli_fused_json_stats_and_ledger(cloud_server, tmp_path):
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text('[chat]\ntemperature = 0.0\nmax_tokens = 16\n')
    env = {"FLOE_CLOUD_BASE_URL": cloud_server.base_url, "FLOE_CLOUD_MODEL": "gemma"}
    # provider "auto": what the cloud can do is found out once, here before the first reply
    # (a first reply that outruns the probe is local, and says so).
    assert run_floe("cloud", "probe", env_home=home, extra_env=env).returncode == 0
    result = run_floe("ask", "--json", "--mode", "fused", QUESTION, env_home=home,
                      extra_env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["mode"] == "fused" and stats["cloud"]["requests"] >= 1
    assert {"agreed", "fused", "absent", "restarts", "bytes_sent", "bytes_received"} <= set(
        stats["cloud"])
    everything = json.loads(run_floe("ledger", "--json", env_home=home).stdout)
    # Every probe request is recorded.
    probes = [row for row in everything if row["purpose"] == "probe"]
    ledger = [row for row in everything if row["purpose"] != "probe"]
    assert 2 <= len(probes) <= 8 and all(row["outcome"] == "ok" for row in probes)
    assert len(ledger) == stats["cloud"]["requests"]
    assert QUESTION in ledger[0]["text_sent"]
    assert "raw prompt in the transcript format" in stats["cloud"]["method"]
    text = run_floe("ledger", env_home=home).stdout
    assert "/v1/completions" in text and "sent" in text
    local = run_floe("ask", "--json", "--mode", "local", "hi", env_home=home, extra_env=env)
    assert json.loads(local.stdout)["stats"]["mode"] == "local"
    assert len(json.loads(run_floe("ledger", "--json", env_home=home).stdout)) == len(everything)
    assert os.environ.get("FLOE_CLOUD_BASE_URL") is None  # nothing leaked into this process
    # Where each stretch came from, as `floe history show --provenance` tells it (piped: tags).
    reply_text = json.loads(result.stdout)["text"]
    spans = stats["provenance"]
    assert sum(n for n, _ in spans) == len(reply_text)
    shown = run_floe("history", "show", "1", "--provenance", env_home=home).stdout
    assert "agreed = the cloud agreed with the local model" in shown
    assert "## Floe _(fused: " in shown and "## You" in shown and QUESTION in shown
    untagged = re.sub(r"\[(agreed|overruled|batch|private): (.*?)\]", r"\2", shown, flags=re.S)
    assert reply_text.strip() in untagged
    assert ("[" in shown.split("## Floe", 1)[1]) == any(s != "local" for _, s in spans)


def test_private_context_reaches_the_local_model_only(make_session, cloud_config, store):
    session = make_session(cloud_config)
    session.private_context = ["The user's dog is called Biscotti."]
    with prompts_seen(session.engine()) as seen:
        reply(session, "What is my dog called?")
    assert "Biscotti" in seen[0]
    assert store.ledger() and all("Biscotti" not in r.text_sent for r in store.ledger())


def routed_reply(session, question, notes):
    """A fused reply whose cloud has finished answering before the first local token (as
    when the local model is slow to start): every position sees the cloud."""
    engine, base = session.engine(), session.base_engine()
    public = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": question}]
    private = [{"role": "system", "content": public[0]["content"] + "\n" + " ".join(notes)},
               public[1]]
    prompt, base_prompt = engine.chat_tokens(private), base.chat_tokens(public)
    check = PrivateCheck(lambda done: engine.next_token_logprobs(prompt + done),
                         lambda done: base.next_token_logprobs(base_prompt + done))
    stats = FusionStats()
    chooser = FusedChooser(engine.vocabulary(), session.cloud_client(session.cloud_target()),
                           public, Redactor(), session.config.fusion, session.sampling(),
                           stats, check)
    assert chooser.stream.wait_until(lambda: chooser.stream.done, 120)
    cloud_text = chooser.stream.text
    text = "".join(step.text for step in engine.generate(prompt, session.sampling(),
                                                           chooser=chooser))
    local = "".join(step.text for step in engine.generate(prompt, session.sampling()))
    return text, local, cloud_text, stats


def test_a_reply_that_draws_on_private_notes_leaves_the_cloud_out(make_session, cloud_config):
    """Asked about the user's own dog, the notes move the local model at once: the cloud,
    which never saw them, is left out and the reply is the local one. A general question
    with the same notes is fused: they hardly move it."""
    cloud_config.chat.max_tokens = 12  # enough to name the dog or the city
    session = make_session(cloud_config)
    notes = ["The user's dog is called Biscotti.", "The user lives in Lisbon."]
    text, local, cloud_text, stats = routed_reply(session, "What is my dog called?", notes)
    assert b"Biscotti" not in cloud_text  # the cloud could not have known
    assert stats.private_from == 0 and stats.private_shift >= 2.0
    assert stats.agreed == stats.fused == 0 and text == local
    text, local, cloud_text, stats = routed_reply(session, QUESTION, notes)
    assert stats.private_from == -1 and stats.private_shift < 2.0
    assert stats.agreed + stats.fused > 0 and stats.private == 0


def test_proxy_tuning_form_completes_with_private_context(make_session, cloud_config, store):
    cloud_config.fusion.form = "proxy"
    cloud_config.fusion.deadline_ms = 1000
    session = make_session(cloud_config)
    session.private_context = ["The user's dog is called Biscotti."]
    _, done, _ = reply(session, "What is my dog called?")
    assert done.status == "complete" and done.text.strip()
    assert session._base_engine is not None and session._base_engine is not session.engine()
    assert all("Biscotti" not in r.text_sent for r in store.ledger())


def test_chat_completions_api_streams_alternatives_and_fuses(make_session, config,
                                                             tmp_path_factory, store):
    from floe_app.engine.cloud import CloudClient, CloudTarget
    from tests.support.cloud_server import CloudServer, gemma_path

    server = CloudServer(gemma_path(tmp_path_factory.mktemp("gemma-chat")), chat_format="chatml")
    try:
        client = CloudClient(CloudTarget(server.base_url, "gemma", top_logprobs=5,
                                         endpoint="chat"))
        stream = client.stream([{"role": "user", "content": QUESTION}], "", max_tokens=8)
        assert stream.wait_until(lambda: stream.done, 60) and stream.outcome == "ok"
        assert stream.tokens and all(len(t.top) >= 2 for t in stream.tokens)
        assert stream.entry.bytes_received > 0
        config.cloud.base_url, config.cloud.model, config.cloud.endpoint = (server.base_url,
                                                                            "gemma", "chat")
        session = make_session(config)
        assert session.probe_cloud().endpoint == "chat"  # before the reply, so it is sent
        _, done, _ = reply(session)
        assert done.status == "complete" and done.stats["cloud"]["requests"] >= 1
        rows = [row for row in store.ledger() if row.purpose != "probe"]
        assert rows[0].endpoint.endswith("/v1/chat/completions")
    finally:
        server.stop()
