"""Fused replies that accept the cloud's tokens in batches (speculative decoding with the
cloud as the drafter): the same reply as token by token, cheaper; and the faults around it.

The engine is the real SmolLM2 through llama.cpp. The cloud is llama-cpp-python's server
with gemma-3-270m, recorded once and replayed far ahead of the local model by
tests/support/replay.py; the chooser in the engine-level tests is a scripted stand-in for
that cloud, since what is under test there is the engine's batch path.
"""

import threading

import numpy as np
import pytest

from floe_app.config import FusionSettings
from floe_app.engine.cloud import CloudStream, CloudTarget
from floe_app.engine.fused import FusedChooser, FusionStats
from floe_app.engine.fusion import CloudToken
from floe_app.engine.local import GenerationStats
from floe_app.engine.profiles import PRESETS
from floe_app.engine.redact import Redactor
from floe_app.engine.sampling import Sampling, log_softmax
from floe_app.session import ChatSession, Finished
from tests.support.replay import ReplayCloud

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Write one sentence about cats."]


class ScriptedDraft:
    """Proposes a fixed continuation as the draft; otherwise greedy. Keeps each step's
    distribution, to tell a logic error from llama.cpp's rounding."""

    source = "local"

    def __init__(self, script: list[int], cancel: threading.Event | None = None,
                 cancel_at: int = -1) -> None:
        self.script = script
        self.done: list[int] = []
        self.seen: list[np.ndarray] = []
        self.cancel = cancel
        self.cancel_at = cancel_at

    def choose(self, logprobs, rng, penalty=None):
        if self.cancel is not None and len(self.done) == self.cancel_at:
            self.cancel.set()
        self.seen.append(logprobs)
        return int(np.argmax(logprobs))

    def accept(self, token, piece):
        self.done.append(token)

    def draft(self, limit):
        at = len(self.done)
        return self.script[at:at + limit] if self.script[:at] == self.done else []


def greedy(engine, prompt, n, chooser=None):
    stats = GenerationStats()
    chooser = chooser or ScriptedDraft([])
    engine.clear_cache()
    steps = list(engine.generate(prompt, Sampling(temperature=0, max_tokens=n), None, stats,
                                 chooser))
    # Every token taken from a batch says so, for the provenance tint; no other does.
    assert sum(s.source == "batch" for s in steps) == stats.accepted
    return [s.token for s in steps if s.token >= 0], stats, chooser


# llama.cpp's CPU kernels do not round a one-token decode and a batch the same way (up to
# ~0.9 in some log-probability on SmolLM2, F16 or F32 cache alike, measured here), so a
# greedy choice between two tokens closer than this may differ; nowhere else may it.
NEAR_TIE = 0.2


def same_or_near_tie(plain, plain_seen, other):
    """Equal, or first different where the one-by-one reply had a near tie."""
    for i, (a, b) in enumerate(zip(plain, other, strict=False)):
        if a != b:
            top2 = np.sort(plain_seen[i])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (i, a, b, top2)
            return i
    return min(len(plain), len(other))


def test_batch_rows_are_what_the_model_gives_for_each_prefix(engine):
    prompt = engine.chat_tokens([{"role": "user", "content": "Tell me about the sea."}])
    continuation, _, _ = greedy(engine, prompt, 12)
    engine.clear_cache()
    rows = engine._eval_batch(prompt, continuation[:8])
    for i, row in enumerate(rows):
        engine.clear_cache()  # the whole prefix in one batch, as the rows were scored
        single = engine._eval(prompt + continuation[:i])
        np.testing.assert_array_equal(row, single)


@pytest.mark.parametrize("question", ["Name three kinds of fruit.", "What is a planet?"])
def test_accepted_drafts_give_the_greedy_reply_with_fewer_decodes(engine, question):
    prompt = engine.chat_tokens([{"role": "user", "content": question}])
    plain, plain_stats, plain_chooser = greedy(engine, prompt, 24)
    # A drafter that knows the reply (a cloud in full agreement), and one that is wrong
    # from the fifth token on: the reply is the same; only the cost differs.
    right, right_stats, _ = greedy(engine, prompt, 24, ScriptedDraft(plain))
    wrong_script = plain[:4] + [t + 1 for t in plain[4:]]
    wrong, wrong_stats, _ = greedy(engine, prompt, 24, ScriptedDraft(wrong_script))
    assert same_or_near_tie(plain, plain_chooser.seen, right) >= 8
    assert same_or_near_tie(plain, plain_chooser.seen, wrong) >= 5
    assert right_stats.batches >= 1 and right_stats.accepted >= 8
    assert wrong_stats.accepted <= 4 and wrong_stats.batches >= 1
    assert plain_stats.batches == 0 and plain_stats.accepted == 0


def test_a_draft_never_runs_past_the_context_window(engine):
    room = 6
    filler = engine.tokenize(" word" * (engine.n_ctx - room - 40), special=False)
    prompt = engine.chat_tokens([{"role": "user", "content": "Count."}])[:20] + filler
    prompt = prompt[: engine.n_ctx - room]
    engine.clear_cache()
    script = engine.tokenize(" one two three four five six seven eight", special=False)
    tokens, stats, _ = greedy(engine, prompt, 40, ScriptedDraft(script))
    assert len(prompt) + len(tokens) <= engine.n_ctx
    assert stats.finish_reason in ("context", "stop")
    engine.clear_cache()


def test_cancel_in_the_middle_of_a_batch_stops_and_leaves_the_cache_usable(engine):
    prompt = engine.chat_tokens([{"role": "user", "content": "Describe a forest."}])
    plain, _, _ = greedy(engine, prompt, 20)
    cancel = threading.Event()
    stats = GenerationStats()
    engine.clear_cache()
    steps = list(engine.generate(prompt, Sampling(temperature=0, max_tokens=20), cancel, stats,
                                 ScriptedDraft(plain, cancel, cancel_at=5)))
    assert stats.finish_reason == "cancelled" and stats.batches >= 1
    assert len(steps) == 6  # the batch held more, but nothing after the cancel is shown
    stats = GenerationStats()  # from the same (partly drafted) cache
    again = [s.token for s in engine.generate(prompt, Sampling(temperature=0, max_tokens=20),
                                               None, stats, ScriptedDraft([]))]
    assert again == plain


def chooser_with(text: bytes, tokenize, finished=False, known=None, vocab=None, tokens=None):
    stream = CloudStream(CloudTarget("http://x/v1", "m"))
    stream.profile = PRESETS["llama-cpp-python"]
    stream.tokens = tokens or [CloudToken(0, text, ((text, -0.1),))]
    stream.text = text
    stream.finished = finished
    stream.first_token_at = stream.started_at
    stream.assembler.saw_logprobs = True

    class Client:
        known_profile = known

        def stream(self, *args, **kwargs):
            return stream

    chooser = FusedChooser(vocab, Client(), [], Redactor(), FusionSettings(),
                           Sampling(temperature=0), FusionStats(), tokenize=tokenize)
    return chooser


def test_the_draft_is_whole_tokens_and_whole_characters(engine):
    def tokenize(text):
        return engine.tokenize(text, special=False)
    text = "Le café est très bon".encode()
    chooser = chooser_with(text[:-1], tokenize)  # the cloud's text ends mid-token
    draft = chooser.draft(16)
    assert engine.detokenize(draft) == "Le café est très"
    cut = text[: text.index("é".encode()) + 1]  # ... and inside a character
    assert engine.detokenize(chooser_with(cut, tokenize).draft(16)) == "Le"
    chooser = chooser_with(text, tokenize)
    chooser.accept(0, b"Le")
    assert engine.detokenize(chooser.draft(16)).startswith(" café")
    chooser.accept(0, b" tea")  # the reply left the cloud's text: nothing to draft
    assert chooser.draft(16) == []
    assert chooser_with(text, tokenize).draft(1) == []
    off = chooser_with(text, tokenize)
    off.settings.batch_tokens = 0
    assert off.draft(16) == []


def test_the_clouds_raw_numbers_get_floes_penalties_so_the_reply_stays_on_its_text(engine):
    """A cloud reports its model's log-probabilities before its sampler's penalties (the
    llama.cpp servers do), so its text can differ from its top number: seen with SmolLM2
    as its own cloud, "air that scatter" written, "." on top. Fused as they came, the
    reply took "." and left both models' text. With Floe's penalties applied to the cloud's
    numbers too, the reply stays on the cloud's text, and the step counts as agreement."""
    vocab = engine.vocabulary()
    that, dot, comma = (engine.tokenize(piece, special=False)[0] for piece in (" that", ".", ","))
    top = ((b".", -0.75), (b",", -1.37), (b" that", -2.18))
    tokens = [CloudToken(0, b" that", top), CloudToken(5, b" scatter", ((b" scatter", -0.2),))]
    raw = np.full(len(vocab), -20.0)  # the same model: its numbers are the cloud's
    raw[[dot, comma, that]] = [-0.75, -1.37, -2.18]
    penalty = np.zeros(len(vocab))
    penalty[[dot, comma]] = -3.0  # both were written before
    logprobs = log_softmax(raw + penalty)
    rng = np.random.default_rng(0)
    chooser = chooser_with(b" that scatter", None, vocab=vocab, tokens=tokens)
    assert chooser.choose(logprobs, rng, penalty) == that
    assert chooser.source == "agreed" and chooser.stats.agreed == 1
    unpenalized = chooser_with(b" that scatter", None, vocab=vocab, tokens=tokens)
    unpenalized.settings.keep_to_cloud_nats = 0  # the penalties alone (see the next test)
    assert unpenalized.choose(logprobs, rng) == dot  # the cloud's raw top: off its text
    assert unpenalized.source == "overruled"


@pytest.mark.parametrize("dot, that, margin, kept", [
    (-0.9, -1.2, 1.5, True),  # a near tie: the reply keeps to the cloud's text
    (-0.3, -3.0, 1.5, False),  # the cloud's own numbers are against its text: fusion decides
    (-0.9, -1.2, 0.0, False),  # keeping off: always the fused choice
])
def test_greedy_replies_keep_to_the_clouds_text_at_near_ties(engine, dot, that, margin, kept):
    vocab = engine.vocabulary()
    ids = {piece: engine.tokenize(piece, special=False)[0] for piece in (" that", ".")}
    tokens = [CloudToken(0, b" that", ((b".", dot), (b" that", that))),
              CloudToken(5, b" scatter", ((b" scatter", -0.2),))]
    raw = np.full(len(vocab), -20.0)
    raw[list(ids.values())] = -1.0  # the local model splits the text into these tokens
    chooser = chooser_with(b" that scatter", None, vocab=vocab, tokens=tokens)
    chooser.settings.keep_to_cloud_nats = margin
    logprobs = log_softmax(raw)
    token = chooser.choose(logprobs, np.random.default_rng(0))
    assert token == ids[" that" if kept else "."]


@pytest.fixture(scope="module")
def twin_cloud(tmp_path_factory):
    """The bundled SmolLM2 itself behind the cloud server: a cloud that agrees with the
    local model on nearly every token (the best case for batches), replayed far ahead."""
    from floe_app.engine.local import bundled_model_path
    from tests.support.cloud_server import CloudServer

    server = CloudServer(bundled_model_path(), chat_format="chatml",
                         alias="smollm2-135m-instruct")
    replay = ReplayCloud(tmp_path_factory.mktemp("twin") / "recording.jsonl", server.base_url,
                         ttft_ms=50, tokens_per_s=5000)
    yield replay
    replay.close()
    server.stop()


@pytest.mark.slow
def test_fused_replies_take_the_clouds_tokens_in_batches(store, config, engine, paths,
                                                         twin_cloud):
    """Through the real cloud path: the reply is complete, batches were scored and the
    cloud's tokens accepted from them, and the stats say so. (Equality with the token-by-
    token reply is shown at the engine level above: end to end, when the cloud's first
    tokens arrive relative to the local ones is timing, not logic.)"""
    config.model.context_tokens = engine.n_ctx
    config.cloud.base_url, config.cloud.model = twin_cloud.base_url, "smollm2-135m-instruct"
    config.cloud.provider = "llama-cpp-python"  # raw prompts in ChatML, SmolLM2's format
    config.chat.max_tokens = 32
    config.fusion.deadline_ms, config.fusion.wait_budget_ms = 5000, 60_000
    session = ChatSession(store, config, env={}, paths=paths, engine=engine)
    for question in QUESTIONS:  # the first pass records the cloud's streams
        list(session.reply(session.new_conversation(), question, mode="fused"))
    taken = []
    for question in QUESTIONS:
        done = list(session.reply(session.new_conversation(), question, mode="fused"))[-1]
        assert isinstance(done, Finished) and done.status == "complete" and done.text
        batches = done.stats["cloud"]["batches"]
        assert batches["count"] == 0 or batches["mean_length"] >= 2
        assert done.stats["cloud"]["requests"] <= config.fusion.max_requests
        taken.append(batches["accepted"])
    assert max(taken) >= 0.3, taken  # a good part of a reply came from batches


def test_a_stream_that_broke_partway_is_used_up_to_the_break_then_the_reply_goes_on(engine):
    """The cloud sent half its answer, then the connection broke: the half is taken in
    batches, then the reply goes on locally to its end, with one notice."""
    prompt = engine.chat_tokens([{"role": "user", "content": "Write two sentences about "
                                                              "the sea."}])
    plain, _, plain_chooser = greedy(engine, prompt, 24)
    half = engine.detokenize(plain[:12]).encode()  # the cloud's (= the local) answer, cut
    chooser = chooser_with(half, lambda text: engine.tokenize(text, special=False),
                           vocab=engine.vocabulary())
    chooser.stream.outcome, chooser.stream.error = "broken_stream", "Connection reset"
    reply, stats, _ = greedy(engine, prompt, 24, chooser)
    assert stats.batches >= 1 and stats.accepted >= 6  # the half that came, in batches
    assert same_or_near_tie(plain, plain_chooser.seen, reply) >= 10
    assert stats.finish_reason in ("stop", "length")  # to its end, not cut at the break
    assert chooser.stats.breaker.startswith("the cloud's stream broke off")
    assert chooser.notices == [f"Cloud off for the rest of this reply: {chooser.stats.breaker}."]
    assert chooser.stats.agreed + chooser.stats.fused == 12  # the half, then local to the end
    assert chooser.stats.absent >= 1


def test_no_request_is_repeated_without_more_of_the_reply_to_send():
    chooser = chooser_with(b"The capital of France is Paris.", None,
                           known=PRESETS["llama-cpp-python"])
    sure = np.zeros(1)  # a local token so sure that nothing waits
    chooser.accept(0, b"Well")  # left the cloud's text inside the reply's first word
    assert chooser._cloud_candidates(sure) is None
    assert chooser.stats.requests == 1 and chooser.anchor is None  # the same "" again: no
    chooser.accept(0, b",")
    chooser._cloud_candidates(sure)
    assert chooser.stats.requests == 1
    chooser.accept(0, b" the")  # "Well, " is a complete word more to send
    chooser._cloud_candidates(sure)
    assert chooser.stats.requests == 2 and chooser.stats.restarts == 1
    assert chooser.origin == len(b"Well,")
