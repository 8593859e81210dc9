import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from floe_app.engine.sampling import (
    Sampling,
    dry_match_lengths,
    log_softmax,
    penalize,
    recommended_sampling,
    sample_token,
    sampling_from_settings,
)

logits_arrays = arrays(np.float32, st.integers(2, 300),
                       elements=st.floats(-50, 50, width=32, allow_nan=False))


@given(logits_arrays)
def test_log_softmax_is_normalized_finite_and_order_preserving(logits):
    lp = log_softmax(logits)
    assert np.all(np.isfinite(lp))
    assert abs(np.exp(lp).sum() - 1) < 1e-9
    assert lp[np.argmax(logits)] == lp.max()  # ties within float precision may reorder


@given(logits_arrays, st.integers(0, 2**32 - 1))
def test_greedy_picks_the_argmax(logits, seed):
    lp = log_softmax(logits)
    assert sample_token(lp, Sampling(temperature=0), np.random.default_rng(seed)) == np.argmax(lp)


@settings(max_examples=60)
@given(logits_arrays, st.integers(1, 20), st.floats(0.05, 1.0), st.floats(0.1, 2.0),
       st.integers(0, 2**32 - 1))
def test_sampled_token_is_within_top_k(logits, top_k, top_p, temperature, seed):
    lp = log_softmax(logits)
    token = sample_token(lp, Sampling(temperature=temperature, top_k=top_k, top_p=top_p),
                         np.random.default_rng(seed))
    kth = np.sort(lp)[::-1][min(top_k, lp.size) - 1]
    assert lp[token] >= kth


def test_top_p_keeps_only_the_nucleus():
    lp = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample_token(lp, Sampling(temperature=1, top_k=0, top_p=0.8), rng)
             for _ in range(300)}
    assert draws == {0, 1}


def test_same_seed_same_draws():
    lp = log_softmax(np.random.default_rng(1).normal(size=500))
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    a = [sample_token(lp, s, np.random.default_rng(7)) for _ in range(5)]
    b = [sample_token(lp, s, np.random.default_rng(7)) for _ in range(5)]
    assert a == b


# Repetition control


def test_penalties_leave_the_first_token_and_the_off_switch_alone():
    logits = np.random.default_rng(2).normal(size=100)
    s = Sampling()
    np.testing.assert_array_equal(penalize(logits, [], s), logits)
    off = s.without_penalties()
    np.testing.assert_array_equal(penalize(logits, [3, 4, 3], off), logits)


def test_repeat_presence_and_frequency_penalties_touch_only_recent_tokens():
    logits = np.array([2.0, -2.0, 1.0, 0.5, 3.0])
    s = Sampling(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                 penalty_last_n=3, dry_multiplier=0)
    out = penalize(logits, [4, 0, 1, 0], s)  # token 4 is outside the window of 3
    assert out[4] == 3.0 and out[2] == 1.0 and out[3] == 0.5
    assert out[0] == pytest.approx(2.0 / 2 - 0.5 - 0.25 * 2)
    assert out[1] == pytest.approx(-2.0 * 2 - 0.5 - 0.25)


def test_dry_penalizes_the_token_that_would_continue_a_repeat():
    # "a b c d ... a b" -> c would repeat "a b c"; the penalty grows with the run's length.
    history = [1, 2, 3, 4, 5, 1, 2]
    assert dry_match_lengths(history, lambda t: False, 2) == {3: 2}
    longer = [1, 2, 3, 4, 9, 1, 2, 3]
    assert dry_match_lengths(longer, lambda t: False, 2) == {4: 3}
    s = Sampling(repeat_penalty=1.0, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    out = penalize(np.zeros(10), longer, s)
    assert out[4] == pytest.approx(-0.8 * 1.75) and np.count_nonzero(out) == 1


def test_dry_runs_stop_at_breakers_and_short_repeats_are_free():
    history = [1, 7, 2, 3, 1, 7, 2]  # 7 is a line break: the run is just "2"
    assert dry_match_lengths(history, lambda t: t == 7, 2) == {}
    assert dry_match_lengths([1, 2, 1], lambda t: False, 2) == {}


def test_min_p_drops_the_unlikely_tail():
    lp = np.log(np.array([0.5, 0.4, 0.06, 0.04]))
    rng = np.random.default_rng(0)
    draws = {sample_token(lp, Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.1), rng)
             for _ in range(400)}
    assert draws == {0, 1, 2}


def test_settings_and_model_recommendations_make_the_sampling():
    from floe_app.config import ChatSettings

    chat = ChatSettings()
    chat.repeat_penalty = 1.3
    recommended = recommended_sampling({"general.sampling.temp": "0.2",
                                        "general.sampling.penalty_repeat": "1.05",
                                        "general.sampling.top_k": "20"})
    assert recommended == {"temperature": 0.2, "repeat_penalty": 1.05, "top_k": 20}
    s = sampling_from_settings(chat, recommended)
    # The user's own value wins; keys left at the default take the model's.
    assert (s.temperature, s.repeat_penalty, s.top_k) == (0.2, 1.3, 20)
    chat.model_defaults = False
    assert sampling_from_settings(chat, recommended).temperature == chat.temperature
