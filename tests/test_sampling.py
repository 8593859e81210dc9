import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from floe_app.engine.sampling import Sampling, log_softmax, sample_token

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
