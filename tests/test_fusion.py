"""Property tests for the pure fusion math (engine/fusion.py)."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from floe_app.engine.fusion import (
    END,
    CloudToken,
    Vocabulary,
    align,
    cloud_distribution,
    cloud_weight,
    fuse_log_linear,
    fuse_proxy_tuning,
    penalized,
    private_shift,
    realign,
)
from floe_app.engine.sampling import log_softmax

# Byte-level pieces (partial UTF-8), multi-byte characters, spaces, and prefixes of others.
PIECES = [b"a", b"b", b"ab", b"abc", b" the", b" th", b" t", b" ", b"\xe2", b"\x82",
          b"\xac", b"\xe2\x82\xac", "é".encode(), "日本".encode(), b"x", b"\n"]


def vocab_of(pieces):
    return Vocabulary([*list(pieces), b""], end_ids=np.array([len(pieces)]))


VOCAB = vocab_of(PIECES)
logprob_vectors = st.lists(st.floats(-20, 5, allow_nan=False), min_size=len(VOCAB),
                           max_size=len(VOCAB)).map(lambda xs: log_softmax(np.array(xs)))
candidate_texts = st.one_of(st.sampled_from([*PIECES, END, b" there", b"abcd", "€".encode()]),
                            st.text(min_size=1, max_size=4).map(str.encode))
top_k = st.lists(st.tuples(candidate_texts, st.floats(-15, 0)), max_size=20,
                 unique_by=lambda c: c[0])


def normalized(lp):
    return np.all(np.isfinite(lp)) and abs(np.exp(lp).sum() - 1) < 1e-9


@given(logprob_vectors, top_k, st.floats(0, 1))
def test_fused_distribution_is_normalized_finite_and_nowhere_zero(slm, top, weight):
    cloud = cloud_distribution(VOCAB, slm, top)
    assert normalized(cloud) and np.all(cloud > -np.inf)
    assert normalized(fuse_log_linear(slm, cloud, weight))


@given(logprob_vectors, top_k)
def test_weight_zero_gives_the_slm(slm, top):
    fused = fuse_log_linear(slm, cloud_distribution(VOCAB, slm, top), 0.0)
    np.testing.assert_allclose(fused, slm, atol=1e-9)


@given(logprob_vectors, top_k)
def test_weight_one_keeps_the_clouds_ranking(slm, top):
    cloud = cloud_distribution(VOCAB, slm, top)
    fused = fuse_log_linear(slm, cloud, 1.0)
    np.testing.assert_allclose(fused, cloud, atol=1e-9)
    higher = cloud[:, None] > cloud[None, :] + 1e-9
    assert np.all((fused[:, None] > fused[None, :])[higher])


@given(logprob_vectors, st.lists(st.floats(-30, 0), min_size=len(VOCAB), max_size=len(VOCAB)))
def test_the_penalties_move_the_cloud_as_they_move_the_local_model(raw, shifts):
    """Every log-ratio moves by the penalties' difference; a cloud that is the local model
    (the same raw numbers) then gives exactly the penalized local distribution."""
    penalty = np.array(shifts)
    assert penalized(raw, None) is raw
    out = penalized(raw, penalty)
    assert normalized(out)
    np.testing.assert_allclose(out - out[0], raw - raw[0] + penalty - penalty[0], atol=1e-6)
    np.testing.assert_allclose(out, log_softmax(raw + penalty), atol=1e-9)


@given(logprob_vectors)
def test_empty_top_k_leaves_the_slm_alone(slm):
    np.testing.assert_allclose(cloud_distribution(VOCAB, slm, []), slm, atol=1e-9)


@given(logprob_vectors, st.sampled_from(PIECES), st.floats(-3, 0))
def test_one_candidate_gets_its_mass_on_consistent_tokens(slm, text, logprob):
    cloud = np.exp(cloud_distribution(VOCAB, slm, [(text, logprob)]))
    support = VOCAB.supporting(text)
    p = np.exp(slm)
    rest = 1 - np.exp(logprob)
    assert cloud[support].sum() == pytest.approx(np.exp(logprob) + rest * p[support].sum(),
                                                 rel=1e-6)


@settings(max_examples=50)
@given(st.integers(2, 40), st.data())
def test_identical_prefix_free_tokenizers_reduce_to_plain_mixing(n, data):
    pieces = [f"{i:03d}".encode() for i in range(n)]  # same length: no piece prefixes another
    vocab = Vocabulary(pieces, end_ids=np.array([], dtype=np.int64))
    slm = log_softmax(np.array(data.draw(st.lists(st.floats(-10, 5), min_size=n, max_size=n))))
    q = log_softmax(np.array(data.draw(st.lists(st.floats(-10, 5), min_size=n, max_size=n))))
    weight = data.draw(st.floats(0, 1))
    cloud = cloud_distribution(vocab, slm, list(zip(pieces, q, strict=True)))
    # Equal up to the MIN_REST probability kept outside the top-k.
    np.testing.assert_allclose(np.exp(cloud), np.exp(q), atol=1e-5)
    expected = log_softmax((1 - weight) * slm + weight * q)
    # Relative: the MIN_REST share moves a tiny cloud probability by a relative 1e-9 / q,
    # and the mixing raises that to the power λ (seen: 0.17576 for 0.17565).
    np.testing.assert_allclose(np.exp(fuse_log_linear(slm, cloud, weight)), np.exp(expected),
                               rtol=1e-2, atol=1e-4)


def test_support_is_prefixes_and_extensions_never_special_tokens():
    ids = set(VOCAB.supporting(b" the").tolist())
    assert {PIECES[i] for i in ids} == {b" ", b" t", b" th", b" the"}
    assert {PIECES[i] for i in VOCAB.supporting(b" t").tolist()} == {b" ", b" t", b" th",
                                                                     b" the"}
    euro = {PIECES[i] for i in VOCAB.supporting("€".encode()).tolist()}
    assert euro == {b"\xe2", b"\xe2\x82\xac"}  # a byte-level piece can start a character
    assert VOCAB.supporting(END).tolist() == [len(PIECES)]
    assert len(PIECES) not in VOCAB.supporting(b"a").tolist()  # b"" is no one's prefix
    assert VOCAB.supporting(b"\xff\xff").size == 0
    # Prefixes only: what writes nothing past the text (" th" and " the" run past " t").
    assert {PIECES[i] for i in VOCAB.prefixes(b" t").tolist()} == {b" ", b" t"}
    assert {PIECES[i] for i in VOCAB.prefixes(b" there").tolist()} == {b" ", b" t", b" th",
                                                                      b" the"}
    assert VOCAB.prefixes(b"").size == 0


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_cloud_weight_grows_with_the_clouds_confidence_within_bounds(c1, c2, a, b):
    low, high = min(a, b), max(a, b)
    unsure, sure = sorted((c1, c2))
    assert low - 1e-12 <= cloud_weight(unsure, low, high) <= cloud_weight(sure, low, high)
    assert cloud_weight(sure, low, high) <= high + 1e-12


@given(logprob_vectors, logprob_vectors)
def test_private_shift_is_the_kl_divergence_of_local_from_public(local, public):
    p = np.exp(local)
    assert private_shift(local, public) == pytest.approx(
        max(0.0, float(np.sum(p * (local - public)))), abs=1e-9)
    assert private_shift(local, public) >= 0.0
    assert private_shift(local, local) == pytest.approx(0.0, abs=1e-12)


def test_private_shift_ignores_tokens_a_penalty_ruled_out():
    local = np.array([np.log(0.5), np.log(0.5), -np.inf])  # the third banned
    public = np.log(np.array([0.25, 0.25, 0.5]))
    assert private_shift(local, public) == pytest.approx(np.log(2))


@given(logprob_vectors, logprob_vectors, st.floats(0, 2))
def test_proxy_tuning_without_adaptation_is_the_cloud(cloud, tuned, beta):
    np.testing.assert_allclose(fuse_proxy_tuning(cloud, tuned, tuned, beta), cloud, atol=1e-9)
    assert normalized(fuse_proxy_tuning(cloud, tuned, cloud, beta))


def stream(*texts, tops=None):
    tokens, offset = [], 0
    for i, text in enumerate(texts):
        top = tops[i] if tops else ((text, -0.1),)
        tokens.append(CloudToken(offset, text, tuple(top)))
        offset += len(text)
    return tokens


def test_align_at_token_boundaries_inside_tokens_and_at_the_end():
    tokens = stream(b"Hello", b" world", tops=[((b"Hello", -0.1), (b"Hi", -2.5)),
                                               ((b" world", -0.2), (b" there", -1.8))])
    # The cloud's own token carries what it wrote next; alternatives are only themselves.
    assert align(tokens, b"", False) == [(b"Hello world", -0.1), (b"Hi", -2.5)]
    inside = align(tokens, b"Hel", False)
    assert [t for t, _ in inside] == [b"lo world"] and inside[0][1] == pytest.approx(0.0)
    assert [t for t, _ in align(tokens, b"Hello", False)] == [b" world", b" there"]
    assert [t for t, _ in align(tokens, b"Hello th", False)] == [b"ere"]
    assert align(tokens, b"Hello world", False) is None  # not there yet
    assert align(tokens, b"Hello world", True) == [(END, 0.0)]
    assert align([], b"", False) is None and align([], b"", True) == [(END, 0.0)]
    assert align(tokens, b"Help", False) is None  # left the cloud's path


@given(st.lists(st.binary(min_size=1, max_size=4), min_size=1, max_size=8), st.data())
def test_align_always_offers_the_rest_of_the_clouds_own_token(texts, data):
    tokens = stream(*texts)
    text = b"".join(texts)
    cut = data.draw(st.integers(0, len(text) - 1))
    offered = align(tokens, text[:cut], False)
    assume(offered is not None)
    assert any(text[cut:].startswith(rest) for rest, _ in offered)


def test_a_short_rest_of_the_clouds_token_backs_only_tokens_that_fit_what_follows():
    vocab = vocab_of([b"A", b"s", b"sc", b"s an", b" an"])
    tokens = stream(b"As", b" an", b" AI", tops=[((b"As", -0.01),), ((b" an", -0.01),),
                                                   ((b" AI", -0.01),)])
    rest = align(tokens, b"A", False)
    backed = {vocab.pieces[i] for c, _ in rest for i in vocab.supporting(c).tolist()}
    assert backed == {b"s", b"s an"}  # not "sc": the cloud went on with " an AI"


def test_an_unsure_cloud_gets_less_weight():
    assert cloud_weight(0.0, 0.1, 0.9) == pytest.approx(0.1)
    assert cloud_weight(1.0, 0.1, 0.9) == pytest.approx(0.9)
    assert cloud_weight(0.3, 0.1, 0.9) < cloud_weight(0.9, 0.1, 0.9)


def test_realign_finds_the_replys_last_words_in_the_clouds_answer():
    cloud = b"The capital of Australia is Canberra, not Sydney. Canberra was chosen in 1908."
    assert realign(b"Australia's capital is Canberra", cloud, 0) is None  # "capital is" absent
    at = realign(b"The answer: Australia is Canberra", cloud, 0)
    assert at == cloud.index(b", not")
    # Mid-word: the reply's last word may be the start of the cloud's.
    assert realign(b"of Australia is Canb", cloud, 0) == cloud.index(b"erra, not")
    # Never inside a cloud word, never outside the window.
    assert realign(b"apital of Australia", cloud, 0) is None
    assert realign(b"was chosen in", cloud, 0, window=40) is None
    assert realign(b"was chosen in", cloud, 40) == cloud.index(b" 1908")
    assert realign(b"short", cloud, 0) is None  # too little to be sure


@given(st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]),
                min_size=4, max_size=30), st.data())
def test_realign_lands_right_after_the_matched_words(words, data):
    cloud = " ".join(words).encode()
    cut = data.draw(st.integers(3, len(words)))
    reply = b"Well, " + " ".join(words[:cut]).encode()
    at = realign(reply, cloud, 0, window=len(cloud))
    tail = " ".join(words[max(0, cut - 3):cut]).encode()
    assume(len(tail) >= 8)
    assert at is not None and cloud[:at].endswith(tail)
    assert at <= len(" ".join(words[:cut]))  # the first occurrence from the start
