"""Property tests of the federated math: DP clipping and noise, validation, rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floe_app.federated import dp, privacy, rounds, validate
from floe_app.federated.aggregate import Update, flexlora

SHAPES = rounds.module_shapes(blocks=2, width=12, n_head=3, n_head_kv=1)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def arrays_of(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: (scale * rng.standard_normal((out, 4))).astype(np.float32)
            for m, (out, _) in SHAPES.items()}


@given(st.integers(0, 10_000), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_clip_bounds_the_norm_and_keeps_small_updates(seed, scale, bound):
    update = arrays_of(seed, scale)
    clipped, before = dp.clip(update, bound)
    assert math.isclose(before, dp.l2_norm(update), rel_tol=1e-6)
    assert dp.l2_norm(clipped) <= bound * (1 + 1e-5)
    if before <= bound:  # never scaled up, never changed when within the bound
        for key in update:
            np.testing.assert_allclose(clipped[key], update[key], rtol=1e-6)
    else:  # scaled, direction kept
        ratio = clipped["layers.0.self_attn.q_proj"] / update["layers.0.self_attn.q_proj"]
        np.testing.assert_allclose(ratio, bound / before, rtol=1e-4)


def test_noise_has_the_promised_scale():
    update = {"x": np.zeros((400, 250), np.float32)}
    noised, _ = dp.privatize(update, bound=0.5, noise_multiplier=2.0,
                             rng=np.random.default_rng(1))
    assert noised["x"].std() == pytest.approx(1.0, rel=0.02)  # z * C
    assert abs(noised["x"].mean()) < 0.01
    same, _ = dp.privatize(update, bound=0.5, noise_multiplier=0.0,
                           rng=np.random.default_rng(1))
    assert not same["x"].any()


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    assert dp.epsilon([], 1e-5) == 0.0
    assert dp.epsilon([0.0], 1e-5) == math.inf
    one, two = dp.epsilon([1.0], 1e-5), dp.epsilon([1.0, 1.0], 1e-5)
    assert 0 < one < two < 2 * one  # composition is sublinear under RDP
    assert dp.epsilon([4.0], 1e-5) < one
    # The Gaussian mechanism's classic bound (valid for eps < 1): z = sqrt(2 ln(1.25/d))/eps.
    z = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert dp.epsilon([z], 1e-5) <= 0.5


def test_arrays_problem_names_what_is_wrong():
    expected = {k: v.shape for k, v in arrays_of(0).items()}
    good = arrays_of(1)
    assert validate.arrays_problem(good, expected) is None
    bad = dict(good, **{"layers.0.self_attn.q_proj": np.full((12, 4), np.nan, np.float32)})
    assert "NaN or infinite" in validate.arrays_problem(bad, expected)
    bad = dict(good, **{"layers.0.self_attn.q_proj": np.zeros((12, 5), np.float32)})
    assert "wrong shape" in validate.arrays_problem(bad, expected)
    missing = {k: v for k, v in good.items() if "q_proj" not in k}
    assert "missing" in validate.arrays_problem(missing, expected)
    extra = dict(good, evil=np.zeros(3, np.float32))
    assert "unexpected" in validate.arrays_problem(extra, expected)
    ints = dict(good, **{"layers.0.self_attn.q_proj": np.zeros((12, 4), np.int64)})
    assert "floating point" in validate.arrays_problem(ints, expected)


@given(st.lists(st.floats(0.5, 2.0), min_size=3, max_size=20), st.floats(11, 1e6))
def test_norm_outliers_refuse_one_huge_update_only(honest, factor):
    norms = {f"c{i}": n for i, n in enumerate(honest)}
    assert validate.norm_outliers(norms) == {}  # honest spread (4x at most) passes
    norms["evil"] = factor * max(honest)
    refused = validate.norm_outliers(norms)
    assert set(refused) == {"evil"}
    assert "median" in refused["evil"]


def test_an_honest_noised_update_stays_under_the_norm_bound():
    assert validate.norm_outliers({"a": 1.0, "b": 50.0}) == {}  # two: no median to judge by
    assert validate.noised_norm_bound(1.0, 0.0, 10) == pytest.approx(1.001)
    rng = np.random.default_rng(3)
    update = arrays_of(3)
    coords = sum(a.size for a in update.values())
    noised, _ = dp.privatize(update, bound=1.0, noise_multiplier=1.5, rng=rng)
    assert dp.l2_norm(noised) < validate.noised_norm_bound(1.0, 1.5, coords)


def test_base_problem():
    assert validate.base_problem("smollm2", "smollm2") is None
    assert "another base model" in validate.base_problem("gemma", "smollm2")


def test_initial_shared_adapter_is_zero_with_orthonormal_rows():
    shared = rounds.initial(SHAPES, rank=8, seed=0)
    for module, (b, a) in shared.items():
        assert b.shape == (SHAPES[module][0], 8) and not b.any()
        np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 50)), min_size=1,
                max_size=5), st.integers(0, 1000))
def test_a_round_is_flexlora_of_the_devices_products(devices, seed):
    """The fast path (shared A) equals the weighted sum of every device's B_i @ A_i, which
    is what the general FlexLoRA computes too; A's rows stay orthonormal."""
    rng = np.random.default_rng(seed)
    top = 8
    shared = rounds.initial(SHAPES, rank=top, seed=seed)
    shared = {m: ((0.1 * rng.standard_normal(b.shape)).astype(np.float32), a)
              for m, (b, a) in shared.items()}
    updates = [({m: (0.1 * rng.standard_normal((out, rank))).astype(np.float32)
                 for m, (out, _) in SHAPES.items()}, rank, examples)
               for rank, examples in devices]
    new = rounds.aggregate(shared, updates, seed=seed)
    products = [(rounds.device_product(shared, delta, rank), examples)
                for delta, rank, examples in updates]
    general = flexlora([Update(u.modules, n) for u, n in products], [top])[top]
    total = sum(n for _, n in products)
    for module, (b, a) in new.items():
        np.testing.assert_allclose(a @ a.T, np.eye(top), atol=1e-4)
        expected = sum(n / total * (u.modules[module][0] @ u.modules[module][1])
                       for u, n in products)
        np.testing.assert_allclose(b @ a, expected, atol=1e-4)
        np.testing.assert_allclose(general[module][0] @ general[module][1], expected,
                                   atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=6), st.integers(0, 1000))
def test_secure_aggregations_average_gives_flexlora_with_every_device_counted_once(ranks, seed):
    """What secure aggregation yields (the mean of the changes padded to the shared rank,
    and the ranks) rebuilds mean_b with equal weights exactly."""
    rng = np.random.default_rng(seed)
    shared = {m: ((0.1 * rng.standard_normal(b.shape)).astype(np.float32), a)
              for m, (b, a) in rounds.initial(SHAPES, rank=8, seed=seed).items()}
    updates = [({m: rng.standard_normal((out, r)).astype(np.float32)
                 for m, (out, _) in SHAPES.items()}, r, 1) for r in ranks]
    padded = {m: np.mean([np.pad(d[m], ((0, 0), (0, 8 - r))) for d, r, _ in updates], axis=0)
              for m in SHAPES}
    from_sum = rounds.mean_b_of_sum(shared, padded, ranks)
    for module, expected in rounds.mean_b(shared, updates).items():
        np.testing.assert_allclose(from_sum[module], expected, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 1.0), st.integers(0, 1000))
def test_a_server_step_moves_that_far_along_the_round_s_change(step, seed):
    """toward(): W_old + step * (W_avg - W_old), exactly, with A orthonormal again; the
    change's norm scales with the step."""
    rng = np.random.default_rng(seed)
    shared = rounds.initial(SHAPES, rank=8, seed=seed)
    shared = {m: ((0.1 * rng.standard_normal(b.shape)).astype(np.float32), a)
              for m, (b, a) in shared.items()}
    updates = [({m: (0.1 * rng.standard_normal((out, r))).astype(np.float32)
                 for m, (out, _) in SHAPES.items()}, r, 2) for r in (4, 8)]
    full = rounds.aggregate(shared, updates, seed=seed)
    part = rounds.aggregate(shared, updates, seed=seed, step=step)
    for module, (b, a) in part.items():
        old = shared[module][0] @ shared[module][1]
        target = full[module][0] @ full[module][1]
        np.testing.assert_allclose(b @ a, old + step * (target - old), atol=1e-4)
        np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-4)
    assert rounds.change_norm(shared, part) == pytest.approx(
        step * rounds.change_norm(shared, full), rel=1e-3, abs=1e-5)
    with pytest.raises(ValueError, match="server step"):
        rounds.toward(shared, rounds.mean_b(shared, updates), 0.0)


def test_a_zero_example_device_has_no_weight():
    shared = rounds.initial(SHAPES, rank=4, seed=0)
    rng = np.random.default_rng(0)
    one = {m: rng.standard_normal((out, 4)).astype(np.float32) for m, (out, _) in SHAPES.items()}
    other = {m: 100 * x for m, x in one.items()}
    alone = rounds.aggregate(shared, [(one, 4, 3)])
    with_ghost = rounds.aggregate(shared, [(one, 4, 3), (other, 4, 0)])
    for module in alone:
        np.testing.assert_allclose(alone[module][0] @ alone[module][1],
                                   with_ghost[module][0] @ with_ghost[module][1], atol=1e-4)
    with pytest.raises(ValueError, match="positive total"):
        rounds.aggregate(shared, [(one, 4, 0)])


def test_device_start_is_a_prefix():
    shared = rounds.initial(SHAPES, rank=8, seed=2)
    start = rounds.device_start(shared, 4)
    for module, (b, a) in start.items():
        assert b.shape[1] == 4 and a.shape[0] == 4
        np.testing.assert_array_equal(a, shared[module][1][:4])


def good_reply(rank=4):
    rng = np.random.default_rng(rank)
    return ({f"{m}.dB": rng.standard_normal((out, rank)).astype(np.float32)
             for m, (out, _) in SHAPES.items()},
            {"rank": rank, "examples": 3, "noise-multiplier": 1.0})


@pytest.mark.parametrize(("change", "reason"), [
    (lambda a, m: m.pop("rank"), "malformed metrics"),
    (lambda a, m: m.update(rank="four"), "malformed metrics"),
    (lambda a, m: m.update(rank=32), "rank 32 is outside 1..16"),
    (lambda a, m: m.update(rank=0), "rank 0 is outside"),
    (lambda a, m: m.update(examples=0), "example count 0"),
    (lambda a, m: m.update(examples=10**9), "example count"),
    (lambda a, m: m.update(**{"noise-multiplier": 0.5}), "below the federation's 1.0"),
    (lambda a, m: m.update(**{"noise-multiplier": float("nan")}), "noise multiplier nan"),
    (lambda a, m: m.update(rank=8), "wrong shape"),  # says 8, sends rank 4 arrays
    (lambda a, m: a.pop("layers.1.self_attn.o_proj.dB"), "missing"),
    (lambda a, m: a.update(secret=np.zeros(3, np.float32)), "unexpected"),
    (lambda a, m: a["layers.0.self_attn.q_proj.dB"].__setitem__((0, 0), np.inf), "NaN or inf"),
])
def test_the_server_refuses_malformed_updates(change, reason):
    arrays, metrics = good_reply()
    update, problem = validate.update_problem(arrays, metrics, SHAPES, 16, 1.0)
    assert problem is None and update[1:] == (4, 3, 1.0)
    change(arrays, metrics)
    update, problem = validate.update_problem(arrays, metrics, SHAPES, 16, 1.0)
    assert update is None and reason in problem


# Privacy modes (privacy.py) and central DP (rounds.central_mean_b)


def test_auto_uses_dp_only_when_the_devices_can_bear_its_noise():
    """Noise on the average has norm z*C*sqrt(D)/n; DP is used only where it stays below
    the largest honest update (C), i.e. n >= z*sqrt(D)."""
    coordinates = 737_280  # SmolLM2's rank-16 shared adapter
    common = dict(rounds=2, coordinates=coordinates, clip_norm=1.0, target_epsilon=8.0,
                  delta=1e-5)
    team = privacy.choose("auto", expected_nodes=3, **common)
    assert team.mode == "none" and team.release_noise == 0 and team.epsilon == math.inf
    z = privacy.noise_for(8.0, 2, 1e-5)
    assert dp.epsilon([z, z], 1e-5) <= 8.0 < dp.epsilon([z * 0.99] * 2, 1e-5)
    needed = privacy.devices_needed(z, coordinates)
    assert needed == math.ceil(z * math.sqrt(coordinates)) and 500 < needed < 1000
    assert f"{needed:,} or more devices per round, and 3 are expected" in team.reason
    assert privacy.choose("auto", expected_nodes=needed - 1, **common).mode == "none"
    crowd = privacy.choose("auto", expected_nodes=needed, **common)
    assert crowd.mode == "central" and crowd.noise_multiplier == z
    assert crowd.epsilon <= 8.0 and crowd.device_noise == 0 and crowd.release_noise == z
    # Under secure aggregation the server cannot add it: devices add shares of it, each
    # z / sqrt(t) for the t devices any sum holds at least, so any sum has all of it.
    secure_team = privacy.choose("auto", expected_nodes=3, secure_aggregation=True, **common)
    assert secure_team.mode == "none" and secure_team.secure_aggregation
    shares = privacy.choose("auto", expected_nodes=needed, secure_aggregation=True, **common)
    t = needed // 2 + 1
    assert shares.mode == "distributed" and shares.sum_threshold == t
    assert shares.device_noise == pytest.approx(z / math.sqrt(t))
    assert shares.release_noise == z and shares.epsilon == crowd.epsilon
    # The operator may force a mode; distributed DP is refused without secure aggregation,
    # central DP with it (the server would have to clip single updates).
    local = privacy.choose("local", expected_nodes=3, noise_multiplier=1.0, **common)
    assert local.device_noise == 1.0 and local.epsilon == pytest.approx(7.08, abs=0.01)
    assert privacy.choose("none", expected_nodes=5000, **common).mode == "none"
    with pytest.raises(ValueError, match="secure aggregation"):
        privacy.choose("distributed", expected_nodes=5000, **common)
    with pytest.raises(ValueError, match="clip every single update"):
        privacy.choose("central", expected_nodes=5000, secure_aggregation=True, **common)


def test_the_policy_reaches_devices_intact():
    policy = privacy.choose("central", expected_nodes=4, rounds=3, coordinates=100,
                            clip_norm=2.0, target_epsilon=8.0, delta=1e-6, noise_multiplier=1.5)
    record = {**policy.record(), "clip-norm": 2.0}
    assert privacy.Policy.from_record(record) == policy
    assert privacy.Policy.from_json(policy.to_json()) == policy
    none = privacy.choose("none", expected_nodes=4, rounds=3, coordinates=100, clip_norm=2.0,
                          target_epsilon=8.0, delta=1e-6)
    assert privacy.Policy.from_record({**none.record(), "clip-norm": 2.0}) == none
    # A server from before privacy modes: its devices added the noise themselves.
    old = privacy.Policy.from_record({"noise-multiplier": 1.0, "clip-norm": 1.0})
    assert old.mode == "local" and old.device_noise == 1.0
    with pytest.raises(ValueError, match="unknown privacy mode"):
        privacy.Policy.from_record({**record, "privacy": "shuffled"})
    with pytest.raises(ValueError, match="distributed DP without secure aggregation"):
        privacy.Policy.from_record({**record, "privacy": "distributed"})
    shares = privacy.choose("distributed", expected_nodes=4, rounds=3, coordinates=100,
                            clip_norm=2.0, target_epsilon=8.0, delta=1e-6,
                            secure_aggregation=True)
    assert privacy.Policy.from_record({**shares.record(), "clip-norm": 2.0}) == shares


def test_the_privacy_statement_is_true_for_each_mode():
    common = dict(expected_nodes=3, rounds=2, coordinates=737_280, clip_norm=1.0,
                  target_epsilon=8.0, delta=1e-5)
    none = privacy.statement(privacy.choose("auto", **common))
    assert "no noise added here" in none and "sees each device's change itself" in none
    assert "No formal guarantee: this federation is too small for one" in none
    assert "epsilon" in none and "3 are expected" in none  # the arithmetic behind it
    chosen = privacy.statement(privacy.choose("none", **common))
    assert "No formal guarantee: the operator runs this federation without DP noise" in chosen
    central = privacy.choose("central", noise_multiplier=1.0, **common)
    text = privacy.statement(central)
    assert "trusted with single updates" in text and "none against the operator" in text
    assert f"epsilon {dp.epsilon([1.0, 1.0], 1e-5):.2f} at delta 1e-05 per user over 2" in text
    assert "no noise added here" in text
    local = privacy.statement(privacy.choose("local", noise_multiplier=1.0, **common))
    assert "noise x1.00 added on this device" in local and "against the operator too" in local
    for statement in (none, chosen, text, local):
        assert "never text" in statement and "no secure aggregation" in statement
    # Under secure aggregation (the default): the operator sees only sums.
    secure = privacy.statement(privacy.choose("auto", secure_aggregation=True, **common))
    assert "sees only the sum of a round's changes from at least 2 devices" in secure
    assert "quantized and masked" in secure and "never text" in secure
    assert "No formal guarantee: this federation is too small for one" in secure
    assert "each device's change" not in secure and "no secure aggregation" not in secure
    shares = privacy.choose("distributed", noise_multiplier=1.0, **{**common,
                            "expected_nodes": 10}, secure_aggregation=True)
    text = privacy.statement(shares)
    assert f"a share of Gaussian noise x{1 / math.sqrt(6):.2f} added on this device" in text
    assert "at least 6 devices" in text and "against the operator too" in text
    assert "noise x1.00, added in shares by the devices" in text


def test_central_dp_clips_each_update_and_adds_the_noise_once():
    shared = rounds.initial(SHAPES, rank=8, seed=0)
    rng = np.random.default_rng(1)
    updates = [({m: rng.standard_normal((out, r)).astype(np.float32)
                 for m, (out, _) in SHAPES.items()}, r) for r in (4, 8, 8)]
    plain = rounds.toward(shared, rounds.central_mean_b(
        shared, updates, clip_norm=0.5, noise_multiplier=0.0, expected_nodes=4, noise_rng=rng))
    # Without noise: B + (sum of the clipped changes) / expected devices.
    for module, (b, a) in plain.items():
        expected = sum(dp.clip({k: d[k][:, :r] for k in d}, 0.5)[0][module]
                       @ shared[module][1][:r] for d, r in updates) / 4
        np.testing.assert_allclose(b @ a, expected, atol=1e-5)
        np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-4)
    assert rounds.change_norm(shared, plain) <= 3 * 0.5 / 4 + 1e-6  # each moved it <= C/n
    # Noise: once on the sum, std z*C per coordinate, divided by n.
    zero = [({m: np.zeros((out, 8), np.float32) for m, (out, _) in SHAPES.items()}, 8)]
    noised = rounds.toward(shared, rounds.central_mean_b(
        shared, zero, clip_norm=0.5, noise_multiplier=2.0, expected_nodes=4,
        noise_rng=np.random.default_rng(2)))
    products = np.concatenate([(b @ a).ravel() for b, a in noised.values()])
    coordinates = sum(out * 8 for out, _ in SHAPES.values())
    assert rounds.change_norm(shared, noised) == pytest.approx(
        2.0 * 0.5 / 4 * math.sqrt(coordinates), rel=0.15)
    assert np.linalg.norm(products) == pytest.approx(rounds.change_norm(shared, noised),
                                                     rel=1e-4)


def test_change_norm_is_the_norm_of_the_weight_change():
    rng = np.random.default_rng(4)
    old = {m: ((rng.standard_normal(b.shape)).astype(np.float32), a)
           for m, (b, a) in rounds.initial(SHAPES, 4, 1).items()}
    new = {m: ((rng.standard_normal(b.shape)).astype(np.float32), a)
           for m, (b, a) in rounds.initial(SHAPES, 4, 2).items()}
    direct = math.sqrt(sum(float(np.sum((new[m][0] @ new[m][1] - old[m][0] @ old[m][1]) ** 2))
                           for m in old))
    assert rounds.change_norm(old, new) == pytest.approx(direct, rel=1e-5)
    assert rounds.change_norm(old, old) == pytest.approx(0.0, abs=1e-3)
    assert rounds.norm(old) == pytest.approx(math.sqrt(sum(
        float(np.sum((b @ a) ** 2)) for b, a in old.values())), rel=1e-5)
