"""Property tests of LoRA aggregation across ranks (pure numpy)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floe_app.federated.aggregate import Update, fedavg, flexlora, hetlora, truncate

OUT, IN = 12, 10


def update(rng, rank, examples, modules=("q", "v")):
    return Update({m: (rng.normal(size=(OUT, rank)), rng.normal(size=(rank, IN)))
                   for m in modules}, examples)


def product(factors):
    return factors[0] @ factors[1]


clients = st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 50)), min_size=1,
                   max_size=5)


@settings(max_examples=60, deadline=None)
@given(clients, st.integers(0, 2**32 - 1))
def test_full_rank_flexlora_is_the_weighted_sum_of_products(specs, seed):
    rng = np.random.default_rng(seed)
    updates = [update(rng, r, n) for r, n in specs]
    weights = np.array([n for _, n in specs]) / sum(n for _, n in specs)
    [merged] = flexlora(updates, [min(OUT, IN)]).values()
    for module in ("q", "v"):
        expected = sum(w * product(u.modules[module])
                       for w, u in zip(weights, updates, strict=True))
        np.testing.assert_allclose(product(merged[module]), expected, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_truncation_error_is_the_discarded_singular_values(rank, inner, seed):
    rng = np.random.default_rng(seed)
    b, a = rng.normal(size=(OUT, inner)), rng.normal(size=(inner, IN))
    new_b, new_a, singular = truncate(b, a, rank)
    assert new_b.shape == (OUT, rank) and new_a.shape == (rank, IN)
    error = np.linalg.norm(b @ a - new_b @ new_a)
    assert error == pytest.approx(np.sqrt((singular[rank:] ** 2).sum()), abs=1e-8)


def test_equal_ranks_one_client_and_weights():
    rng = np.random.default_rng(0)
    one = update(rng, 4, 10)
    # One client: every method gives its own adapter back (FlexLoRA up to factorization).
    np.testing.assert_allclose(product(flexlora([one], [4])[4]["q"]), product(one.modules["q"]),
                               atol=1e-9)
    np.testing.assert_allclose(fedavg([one])["q"][0], one.modules["q"][0])
    # A client with no examples has no weight.
    other = update(rng, 4, 0)
    np.testing.assert_allclose(product(flexlora([one, other], [4])[4]["v"]),
                               product(one.modules["v"]), atol=1e-9)
    # Equal ranks: FedAvg averages factors, HetLoRA pads nothing and agrees.
    two = update(rng, 4, 30)
    np.testing.assert_allclose(fedavg([one, two])["q"][1],
                               0.25 * one.modules["q"][1] + 0.75 * two.modules["q"][1])
    np.testing.assert_allclose(hetlora([one, two])["q"][1], fedavg([one, two])["q"][1])


def test_mixed_ranks():
    rng = np.random.default_rng(1)
    updates = [update(rng, 4, 5), update(rng, 8, 5), update(rng, 2, 5)]
    per_rank = flexlora(updates, [2, 4, 8])
    assert {r: per_rank[r]["q"][1].shape for r in per_rank} == {2: (2, IN), 4: (4, IN),
                                                                8: (8, IN)}
    padded = hetlora(updates)
    assert padded["q"][0].shape == (OUT, 8)
    with pytest.raises(ValueError, match="one rank"):
        fedavg(updates)
    with pytest.raises(ValueError, match="positive total"):
        flexlora([update(rng, 2, 0)], [2])
