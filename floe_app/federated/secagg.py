"""Secure aggregation of a round: the server's half of Flower's SecAgg+ protocol.

Devices run Flower's own `secaggplus_mod` (client_app.py). Each one quantizes its update
to integers, adds a private mask and one pairwise mask per other device (masks that
cancel in the sum), and hands Shamir shares of its mask seeds to the others, encrypted for
them. The server relays keys and shares, adds up the masked vectors, and removes what is
left of the masks with shares gathered from the devices that finished: it learns the sum
of at least `threshold` devices' vectors and never one of them, as long as it runs this
code as published (SecAgg+'s semi-honest model). A device that drops out after sharing its
keys leaves the round to the others: its pairwise masks are rebuilt from its shares.

Flower's server side (SecAggPlusWorkflow) runs only under the legacy Strategy API; Floe's
rounds use the Message API, so this speaks the same four stages with Flower's messages,
constants and crypto. Known limit of Flower's implementation: every mask is drawn from
numpy's RandomState seeded with 32 bits folded from its 32-byte secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from floe_app.federated.privacy import threshold_for

QUANTIZATION_RANGE = 1 << 22  # Flower's defaults: a sum of up to 1,023 devices fits
MODULUS = 1 << 32
WEIGHT = 1  # every device counts once: the server cannot weigh what it cannot see

Send = Callable[[list[Message]], Iterable[Message]]


@dataclass
class SecureSum:
    """A round's outcome under secure aggregation."""

    mean: list[np.ndarray] | None  # the average of the summed vectors; None: no sum
    replies: dict[int, Message] = field(default_factory=dict)  # whose vectors are in it
    declined: dict[int, str] = field(default_factory=dict)  # node -> why, at any stage
    problem: str | None = None  # why there is no sum


def by_node(sent: list[Message], replies: Iterable[Message]) -> list[tuple[int, Message]]:
    """(the node a reply answers for, the reply). The SuperLink answers for a node that
    stopped sending heartbeats itself ("Node Unavailable", from its own node id): the
    message replied to names the node. (`sent` gets its ids as it is pushed.)"""
    replies = list(replies)
    nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
             if m.metadata.message_id}
    return [(nodes.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r)
            for r in replies]


def secure_mean(send: Send, nodes: list[int], round_config: RecordDict,
                payload: RecordDict, shapes: list[tuple[int, ...]], clip_range: float,
                message_type: str = "train", group_id: str = "") -> SecureSum:
    """Run SecAgg+ over `nodes`: `round_config` goes with the first stage (a device may
    decline there, before joining the key exchange), `payload` with the stage that asks
    for the masked update. Each device's vector is a list of arrays of `shapes`, values
    clipped to [-clip_range, clip_range] before quantization."""
    outcome = SecureSum(None)
    threshold = threshold_for(len(nodes))

    def stage(configs: dict[int, dict], extra: RecordDict | None = None) -> dict[int, Message]:
        messages = []
        for node, config in configs.items():
            content = RecordDict(dict(extra.items()) if extra is not None else {})
            content[RECORD_KEY_CONFIGS] = ConfigRecord(config)
            messages.append(Message(content, node, message_type, group_id=group_id))
        answered = {}
        for node, reply in by_node(messages, send(messages)):
            if reply.has_error():
                outcome.declined[node] = reply.error.reason
            else:
                answered[node] = reply
        for node in configs.keys() - answered.keys() - outcome.declined.keys():
            outcome.declined[node] = "no answer before the round's timeout"
        return answered

    def enough(alive: Iterable[int], what: str) -> bool:
        alive = list(alive)
        if len(alive) < threshold:
            outcome.problem = (f"secure aggregation stopped: {len(alive)} of {len(nodes)}"
                               f" devices {what}, {threshold} needed")
        return outcome.problem is None

    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(nodes),
             Key.SHARE_NUMBER: len(nodes), Key.THRESHOLD: threshold,
             Key.CLIPPING_RANGE: float(clip_range), Key.TARGET_RANGE: QUANTIZATION_RANGE,
             Key.MOD_RANGE: MODULUS, Key.MAX_WEIGHT: float(WEIGHT)}
    keys = {}
    for node, reply in stage({n: setup for n in nodes}, round_config).items():
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        keys[node] = [bytes(record[Key.PUBLIC_KEY_1]), bytes(record[Key.PUBLIC_KEY_2])]
    if not enough(keys, "joined"):
        return outcome

    # Every device that joined gets everyone's public keys and sends each other device a
    # share of its two secrets, encrypted for that device.
    listing = {str(n): k for n, k in keys.items()}
    forwarded: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in keys}
    shared = stage({n: {Key.STAGE: Stage.SHARE_KEYS, **listing} for n in keys})
    for node, reply in shared.items():
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST],
                                   strict=True):
            if dst in shared:  # shares for a device that dropped are of no use
                forwarded[dst][0].append(node)
                forwarded[dst][1].append(bytes(ciphertext))
    if not enough(shared, "shared their keys"):
        return outcome

    # The masked updates: each device masks pairwise with every device it got shares from.
    expected = [(1,), *shapes]
    total = None
    for node, reply in stage({n: {Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                                  Key.SOURCE_LIST: forwarded[n][0],
                                  Key.CIPHERTEXT_LIST: forwarded[n][1]} for n in shared},
                             payload).items():
        try:
            vector = [bytes_to_ndarray(bytes(b)) for b in
                      reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            if [tuple(v.shape) for v in vector] != expected or any(
                    not np.issubdtype(v.dtype, np.integer) for v in vector):
                raise ValueError("wrong shapes or types")
        except Exception as exc:  # a malformed reply: that device counts as dropped
            outcome.declined[node] = f"malformed masked update ({type(exc).__name__}: {exc})"
            continue
        outcome.replies[node] = reply
        vector = [v.astype(np.int64) & (MODULUS - 1) for v in vector]
        total = vector if total is None else [(t + v) & (MODULUS - 1)
                                              for t, v in zip(total, vector, strict=True)]
    masked = sorted(outcome.replies)
    dropped = sorted(n for n in shared if n not in outcome.replies)
    if not enough(masked, "sent a masked update") or total is None:
        outcome.replies.clear()
        return outcome

    # Unmask: the devices still here send shares of the private seeds of those whose vector
    # is in the sum and of the pairwise secret keys of those who dropped, never both.
    shares: dict[int, list[bytes]] = {n: [] for n in shared}
    for reply in stage({n: {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: masked,
                            Key.DEAD_NODE_ID_LIST: dropped} for n in masked}).values():
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True):
            if owner in shares:
                shares[owner].append(bytes(share))
    dims = [v.shape for v in total]
    for node in [*masked, *dropped]:
        if len(shares[node]) < threshold:
            outcome.problem = (f"secure aggregation stopped: {len(shares[node])} shares of"
                               f" device {node}'s secret came back, {threshold} needed")
            outcome.replies.clear()
            return outcome
        secret = combine_shares(shares[node])
        if node in outcome.replies:
            masks = [(-1, pseudo_rand_gen(secret, MODULUS, dims))]
        else:  # the dropped device's pairwise masks, left in every finished device's vector
            private = bytes_to_private_key(secret)
            masks = [(-1 if other > node else 1, pseudo_rand_gen(
                generate_shared_key(private, bytes_to_public_key(keys[other][0])), MODULUS,
                dims)) for other in masked]
        for sign, mask in masks:
            total = [(t + sign * m) & (MODULUS - 1) for t, m in zip(total, mask, strict=True)]
    weights, quantized = int(total[0][0]), total[1:]
    summed = dequantize(quantized, clip_range, QUANTIZATION_RANGE)
    # Each quantized value carried +clip_range; dequantize took one off, the rest go here.
    outcome.mean = [(s - (len(masked) - 1) * clip_range) * QUANTIZATION_RANGE / weights
                    for s in summed]
    return outcome
