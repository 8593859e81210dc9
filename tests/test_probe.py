"""The capability probe and the continuation methods against real servers on 127.0.0.1.

llama-cpp-python's server (gemma-3-270m) continues raw prompts on /v1/completions with
legacy log-probabilities; with the ChatML format its chat endpoint streams alternatives but
answers a trailing assistant message anew, as OpenAI's chat API does. A server's limit on
alternatives (TGI allows 5), a key it refuses, and a server that stops sending
log-probabilities are injected on the wire by the FaultProxy.
"""

import json

import pytest

from floe_app.engine.profiles import NONE, RAW_PROMPT, ProfileCache
from floe_app.errors import FloeError
from floe_app.session import Finished, Notice
from tests.conftest import run_floe
from tests.support.cloud_server import CloudServer, free_port, gemma_path
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture
def auto_config(cloud_config):
    cloud_config.cloud.provider = "auto"
    return cloud_config


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """The same server with the ChatML chat format: chat streams alternatives."""
    server = CloudServer(gemma_path(tmp_path_factory.mktemp("gemma-chatml")),
                         chat_format="chatml")
    yield server
    server.stop()


def reply(session, text=QUESTION):
    events = list(session.reply(session.new_conversation(), text, mode="fused"))
    done = events[-1]
    assert isinstance(done, Finished)
    return done, [e.text for e in events if isinstance(e, Notice)]


def probes(store):
    return [row for row in store.ledger(500) if row.purpose == "probe"]


def test_auto_probe_finds_raw_completions_and_is_cached(make_session, auto_config, store,
                                                        paths):
    session = make_session(auto_config)
    profile = session.probe_cloud()
    assert (profile.endpoint, profile.continuation, profile.top_k, profile.prompt_format) == (
        "completions", RAW_PROMPT, 20, "transcript")
    assert any("continued" in note for note in profile.notes)
    seen = probes(store)
    assert 2 <= len(seen) <= 8 and all(r.outcome == "ok" and r.bytes_sent > 0 for r in seen)
    cached = ProfileCache(paths.cache_dir / "cloud_profiles.json").get(
        auto_config.cloud.base_url, "gemma-3-270m")
    assert cached is not None and cached.continuation == RAW_PROMPT
    # A new session (a new `floe ask`) uses the cached profile: no probe before its reply.
    done, _ = reply(make_session(auto_config))
    assert len(probes(store)) == len(seen) and done.stats["cloud"]["requests"] >= 1
    assert "raw prompt in the transcript format" in done.stats["cloud"]["method"]


def test_k_above_the_servers_limit_is_lowered(make_session, auto_config, proxy):
    def tgi_limit(body):  # TGI: "top_n_tokens must be <= 5" as a 422
        request = json.loads(body)
        k = request.get("top_logprobs") or (request.get("logprobs")
                                            if not isinstance(request.get("logprobs"), bool)
                                            else 0)
        return 422 if (k or 0) > 5 else None
    proxy.faults.intercept = tgi_limit
    profile = make_session(auto_config).probe_cloud()
    assert profile.top_k == 5 and profile.continuation == RAW_PROMPT
    assert any("refused" in note and "20" in note for note in profile.notes)


def test_probe_of_a_dead_refusing_or_wrong_endpoint_is_one_line(make_session, auto_config,
                                                                proxy, cloud_server):
    auto_config.cloud.base_url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(FloeError, match="could not be reached") as dead:
        make_session(auto_config).probe_cloud()
    auto_config.cloud.base_url = proxy.base_url
    proxy.faults.status = 401
    with pytest.raises(FloeError, match="refused the API key") as refused:
        make_session(auto_config).probe_cloud()
    proxy.faults.status = None
    auto_config.cloud.base_url = f"http://127.0.0.1:{cloud_server.port}/nowhere/v1"
    with pytest.raises(FloeError, match="answered neither") as wrong:
        make_session(auto_config).probe_cloud()
    assert all("\n" not in str(e.value) for e in (dead, refused, wrong))


def test_a_fused_reply_with_an_unusable_cloud_is_local_with_one_notice(make_session,
                                                                       auto_config, proxy,
                                                                       store):
    proxy.faults.status = 401
    done, notices = reply(make_session(auto_config))
    assert done.status == "complete" and done.text
    assert len(notices) == 1 and "refused the API key" in notices[0]


def without_logprobs(body):
    request = json.loads(body)
    for key in ("logprobs", "top_logprobs"):
        request.pop(key, None)
    return json.dumps(request).encode()


def test_a_cloud_that_stops_sending_logprobs_is_never_fused_as_certain(make_session,
                                                                       auto_config, proxy,
                                                                       store):
    session = make_session(auto_config)
    assert session.probe_cloud().top_k == 20
    proxy.faults.intercept = without_logprobs  # the server changed behind the cached profile
    done, notices = reply(session)
    assert done.status == "complete"
    assert any("without log-probabilities" in n and "probed again" in n for n in notices)
    assert done.stats["cloud"]["agreed"] == done.stats["cloud"]["fused"] == 0
    cache = ProfileCache(session.paths.cache_dir / "cloud_profiles.json")
    assert cache.get(auto_config.cloud.base_url, "gemma-3-270m") is None  # forgotten
    before = len(probes(store))
    # Probed again (as the next reply's request does first), it has none: said plainly.
    assert make_session(auto_config).probe_cloud().top_k == 0
    assert len(probes(store)) > before
    replies_before = len([r for r in store.ledger(500) if r.purpose != "probe"])
    done, notices = reply(make_session(auto_config))
    assert len(notices) == 1 and "cannot be fused" in notices[0]
    assert len([r for r in store.ledger(500) if r.purpose != "probe"]) == replies_before


def test_chat_without_prefill_is_asked_once_and_realigns(make_session, config, chat_server,
                                                         store):
    proxy = FaultProxy("127.0.0.1", chat_server.port)
    try:
        config.cloud.base_url, config.cloud.model = proxy.base_url, "gemma"
        config.cloud.endpoint = "chat"
        config.fusion.deadline_ms = 3000
        config.fusion.wait_budget_ms = 60_000
        config.chat.max_tokens = 32
        session = make_session(config)
        profile = session.probe_cloud()
        assert profile.endpoint == "chat" and profile.continuation == NONE
        assert any("a new answer" in note for note in profile.notes)
        for question in (QUESTION, "Name three colours of the rainbow."):
            done, _ = reply(session, question)
            cloud = done.stats["cloud"]
            assert done.status == "complete" and cloud["requests"] == 1  # never a storm
            assert cloud["agreed"] + cloud["fused"] > 0
        rows = [r for r in store.ledger(500) if r.purpose != "probe"]
        assert all(r.endpoint.endswith("/chat/completions") for r in rows)
        # No trailing assistant message is ever sent to a cloud that would answer it anew.
        assert all(json.loads(r.text_sent)[-1]["role"] == "user" for r in rows)
    finally:
        proxy.close()


def test_non_ascii_replies_stay_within_the_request_cap(make_session, cloud_config, store):
    cloud_config.fusion.deadline_ms = 2000
    cloud_config.fusion.wait_budget_ms = 60_000
    cloud_config.fusion.max_requests = 2
    cloud_config.chat.max_tokens = 40
    session = make_session(cloud_config)
    for question in ("Écris une phrase en français sur le café et l'été.",
                     "Write the Japanese word for water, 水, three times."):
        done, _ = reply(session, question)
        assert done.status == "complete"
        # A reply cut by max_tokens may end inside a character; nowhere else is one broken.
        cut = done.stats["finish_reason"] == "length"
        assert "\ufffd" not in (done.text.rstrip("\ufffd") if cut else done.text)
        assert done.stats["cloud"]["requests"] <= 2


def test_cli_cloud_probe_and_doctor(cloud_server, tmp_path):
    home = tmp_path / "home"
    env = {"FLOE_CLOUD_BASE_URL": cloud_server.base_url, "FLOE_CLOUD_MODEL": "gemma-3-270m"}
    before = run_floe("doctor", env_home=home, extra_env=env)
    assert "not probed yet" in before.stdout
    result = run_floe("cloud", "probe", env_home=home, extra_env=env)
    assert result.returncode == 0, result.stderr
    assert "/v1/completions, top 20 log-probabilities" in result.stdout
    assert "- /completions: streams log-probabilities" in result.stdout
    after = run_floe("doctor", env_home=home, extra_env=env)
    assert "/v1/completions, top 20 log-probabilities" in after.stdout
    assert "(probe)" in run_floe("ledger", env_home=home).stdout
    dead = run_floe("cloud", "probe", env_home=home,
                    extra_env={**env, "FLOE_CLOUD_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"})
    assert dead.returncode == 1 and dead.stderr.count("\n") == 1
    assert "could not be reached" in dead.stderr
    none = run_floe("cloud", "probe", env_home=tmp_path / "other")
    assert none.returncode == 1 and "no cloud is configured" in none.stderr


def test_the_first_reply_never_waits_for_the_probe(make_session, auto_config, proxy, store):
    proxy.faults.delay_s = 0.5  # a 1 s round trip: the probe takes several seconds
    session = make_session(auto_config)
    local = list(session.reply(session.new_conversation(), QUESTION, mode="local"))[-1]
    session.warm_cloud()  # the TUI starts probing in the background at launch
    done, notices = reply(session)
    # Not a second of waiting: the reply goes on locally while the probe runs.
    assert done.stats["ttft_ms"] < local.stats["ttft_ms"] + 400 and done.status == "complete"
    assert done.stats["cloud"]["waited_ms"] == 0
    # Said once, if the reply ended before the probe did.
    assert all("still finding out" in n for n in notices) and len(notices) <= 1
