"""Secure aggregation: Floe's server half (secagg.py) against Flower's own SecAgg+ mod on
every device, messages passed in-process (the loopback test runs it through a SuperLink)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from floe_app.federated.privacy import threshold_for
from floe_app.federated.secagg import secure_mean
from tests.support.secagg_devices import Devices, as_server_process

SHAPES = [(6, 4), (3, 4)]
CLIP = 1.0


@pytest.fixture(autouse=True)
def server_process(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, None)
    as_server_process()


def run(devices: Devices):
    return secure_mean(devices.send, sorted(devices.vectors),
                       RecordDict({"config": ConfigRecord({"round": 1})}),
                       RecordDict({"shared": ArrayRecord({"x": Array(np.array([7.0]))})}),
                       SHAPES, CLIP)


def vectors(n: int, seed: int = 0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {1000 + i: [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in SHAPES]
            for i in range(n)}


def mean_of(vs: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.mean([v[i] for v in vs], axis=0) for i in range(len(SHAPES))]


def assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    step = 2 * CLIP / (1 << 22)  # one quantization step (stochastic rounding)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= 2 * step


def test_the_server_gets_the_mean_and_never_an_update():
    given = vectors(4)
    devices = Devices(given)
    outcome = run(devices)
    assert outcome.problem is None and not outcome.declined
    assert sorted(outcome.replies) == sorted(given)
    assert_close(outcome.mean, mean_of(list(given.values())))
    # What reached the server from one device says nothing of its update: masked values
    # spread over the whole ring, unlike its quantized update (near the middle).
    for node, masked in devices.masked.items():
        values = np.concatenate([m.ravel() for m in masked[1:]]).astype(np.float64)
        quantized = (np.concatenate([v.ravel() for v in given[node]]) + CLIP) / (2 * CLIP) \
            * (1 << 22)
        assert np.corrcoef(values, quantized)[0, 1] < 0.5
        assert values.max() > (1 << 30)  # a quantized update stays below 2^22


def test_a_device_that_drops_out_after_sharing_keys_leaves_the_others_their_round():
    given = vectors(3, seed=1)
    dropped = 1001
    outcome = run(Devices(given, silent={dropped: Stage.COLLECT_MASKED_VECTORS}))
    assert outcome.problem is None
    assert sorted(outcome.replies) == [1000, 1002]
    assert "no answer" in outcome.declined[dropped]
    # Its pairwise masks, left in the others' vectors, were rebuilt from its shares.
    assert_close(outcome.mean, mean_of([given[1000], given[1002]]))


def test_a_device_declining_at_the_first_stage_and_one_dropping_at_unmask():
    given = vectors(5, seed=2)
    outcome = run(Devices(given, declining={1000}, silent={1004: Stage.UNMASK}))
    assert outcome.problem is None
    assert outcome.declined[1000] == "nothing to learn from"
    # 1004's masked vector is in the sum; the others' shares remove its private mask.
    assert sorted(outcome.replies) == [1001, 1002, 1003, 1004]
    assert_close(outcome.mean, mean_of([given[n] for n in (1001, 1002, 1003, 1004)]))


@pytest.mark.parametrize("silent", [{1001: Stage.SETUP, 1002: Stage.SETUP},
                                    {1001: Stage.COLLECT_MASKED_VECTORS,
                                     1002: Stage.SHARE_KEYS}])
def test_too_few_devices_stop_the_round_with_nothing_unmasked(silent):
    outcome = run(Devices(vectors(3, seed=3), silent=silent))
    assert outcome.mean is None and not outcome.replies
    assert outcome.problem.startswith("secure aggregation stopped: 1 of 3 devices")


def test_a_malformed_masked_vector_counts_as_a_dropped_device():
    given = vectors(3, seed=4)
    devices = Devices(given)
    send = devices.send

    def tamper(messages):
        replies = send(messages)
        for reply in replies:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            if reply.metadata.src_node_id == 1002 and Key.MASKED_PARAMETERS in record:
                record[Key.MASKED_PARAMETERS] = record[Key.MASKED_PARAMETERS][:1]
        return replies

    devices.send = tamper
    outcome = run(devices)
    assert "malformed masked update" in outcome.declined[1002]
    assert_close(outcome.mean, mean_of([given[1000], given[1001]]))


def test_threshold_is_a_majority_of_at_least_two():
    assert [threshold_for(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
