"""The replay cloud (tests/support/replay.py) against the real gemma server: it records a
stream, replays the same chunks at the chosen pace, refuses what it has not recorded when
told not to record, continues a partial chat reply over the completions endpoint, and works
behind the fault-injecting proxy."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.proxy import FaultProxy
from tests.support.replay import ReplayCloud, ReplayProcess, chunk_tokens, request_key

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one sentence."


def stream(base_url: str, path: str, body: dict) -> tuple[int, list[str], float, float]:
    """(status, data payloads, seconds to the first chunk, seconds in all)."""
    start = time.monotonic()
    first = None
    payloads: list[str] = []
    with httpx.stream("POST", base_url + path, json=body, timeout=120) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.text], 0.0, 0.0
        for line in response.iter_lines():
            if line.startswith("data: "):
                first = first if first is not None else time.monotonic() - start
                payloads.append(line[6:])
    return 200, payloads, first or 0.0, time.monotonic() - start


def completion(prompt: str, tokens: int = 6) -> dict:
    return {"model": "gemma-3-270m", "prompt": prompt, "max_tokens": tokens, "stream": True,
            "temperature": 0, "logprobs": 5}


def text_of(payloads: list[str]) -> str:
    text = ""
    for payload in payloads:
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload)["choices"]:
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


@pytest.fixture
def replay(cloud_server, tmp_path):
    cloud = ReplayCloud(tmp_path / "recording.jsonl", cloud_server.base_url, ttft_ms=300,
                        tokens_per_s=20)
    yield cloud
    cloud.close()


def test_records_then_replays_the_same_chunks_at_the_chosen_pace(replay, tmp_path):
    body = completion("The three primary colours are", tokens=8)
    status, live, _, _ = stream(replay.base_url, "/completions", body)
    assert status == 200 and live[-1] == "[DONE]"
    assert replay.stats["forwarded"] == 1 and replay.stats["recorded"] == 1
    entry = json.loads((tmp_path / "recording.jsonl").read_text().splitlines()[0])
    assert entry["key"] == request_key("/v1/completions", body)
    assert entry["chunks"] == live[:-1]  # raw payloads, log-probabilities included
    assert any(json.loads(c)["choices"][0]["logprobs"] for c in entry["chunks"])

    status, again, first, total = stream(replay.base_url, "/completions", body)
    assert status == 200 and again == live  # byte-identical payloads, then [DONE]
    assert replay.stats["replayed"] == 1 and replay.stats["forwarded"] == 1
    tokens = sum(chunk_tokens(c) for c in entry["chunks"])
    assert tokens >= 2
    assert first >= 0.3
    # The last token is due (tokens - 1) / rate after the first one; allow loopback slack.
    assert 0.3 + (tokens - 1) / 20 - 0.02 <= total <= 0.3 + (tokens - 1) / 20 + 1.0

    # A fresh server reads the file back; the volatile `user` field does not change the key.
    with ReplayCloud(tmp_path / "recording.jsonl", None, ttft_ms=0, tokens_per_s=0,
                     record=False) as offline:
        status, third, _, total = stream(offline.base_url, "/completions",
                                         {**body, "user": "someone"})
        assert status == 200 and third == live and total < 0.3


def test_a_request_not_recorded_gets_404_when_not_recording(replay):
    replay.configure(record=False)
    status, payloads, _, _ = stream(replay.base_url, "/completions", completion("Hello"))
    assert status == 404
    error = json.loads(payloads[0])["error"]
    assert error["type"] == "not_recorded"
    assert replay.stats["not_recorded"] == 1 and replay.stats["forwarded"] == 0


def test_prefill_emulation_continues_a_partial_reply_mid_sentence(replay):
    replay.configure(prefill_chat=True, ttft_ms=0, tokens_per_s=0)
    body = {"model": "gemma-3-270m", "stream": True, "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 3,
            "messages": [{"role": "user", "content": QUESTION},
                         {"role": "assistant", "content": "The capital of France is"}]}
    status, payloads, _, _ = stream(replay.base_url, "/chat/completions", body)
    assert status == 200 and replay.stats["emulated"] == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = text_of(payloads)
    assert text.startswith(" ") and not text.lstrip().startswith("The"), text
    assert "paris" in text.lower(), text
    items = [i for c in chunks for ch in c["choices"] if ch.get("logprobs")
             for i in ch["logprobs"]["content"]]
    assert items and set(items[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert 1 <= len(items[0]["top_logprobs"]) <= 3
    assert bytes(items[0]["bytes"]).decode() == items[0]["token"]
    # What went upstream: the conversation in ChatML, open at the partial reply.
    sent = replay.recording.entries[replay.log[-1][1]].upstream["request"]
    assert sent["prompt"].endswith("<|im_start|>assistant\nThe capital of France is")
    assert sent["stop"][0] == "<|im_end|>" and sent["logprobs"] == 3

    # vLLM's fields ask for the same continuation without the prefill switch.
    replay.configure(prefill_chat=False)
    vllm = {**body, "continue_final_message": True, "add_generation_prompt": False}
    status, payloads, _, _ = stream(replay.base_url, "/chat/completions", vllm)
    assert status == 200 and text_of(payloads) == text
    assert replay.log[-1][2] == "forwarded" and replay.stats["emulated"] == 2


def test_replays_behind_the_fault_proxy(replay):
    proxy = FaultProxy("127.0.0.1", replay.port)
    try:
        body = completion("One, two, three,", tokens=4)
        status, live, _, _ = stream(proxy.base_url, "/completions", body)
        assert status == 200 and replay.stats["recorded"] == 1
        proxy.faults.delay_s = 0.05  # a 100 ms round trip on top of the 300 ms first token
        status, again, first, _ = stream(proxy.base_url, "/completions", body)
        assert status == 200 and again == live and first >= 0.4
        assert replay.stats["replayed"] == 1
        assert [path for path, _ in proxy.requests()] == ["/v1/completions"] * 2
    finally:
        proxy.close()


def test_replay_process_is_driven_over_http(cloud_server, tmp_path):
    with ReplayProcess(tmp_path / "rec.jsonl", cloud_server.base_url, ttft_ms=0,
                       tokens_per_s=0) as cloud:
        body = completion("Water is made of", tokens=3)
        assert stream(cloud.base_url, "/completions", body)[0] == 200
        assert cloud.configure(record=False)["record"] is False
        assert stream(cloud.base_url, "/completions", body)[0] == 200
        stats = cloud.stats
        assert (stats["forwarded"], stats["replayed"]) == (1, 1)
        assert httpx.get(cloud.base_url + "/models").json()["data"][0]["id"] == "gemma-3-270m"
