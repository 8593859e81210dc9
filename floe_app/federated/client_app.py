"""Floe's Flower ClientApp: unpack the round, call Floe's installed code, pack the reply.

The SuperNode is started by `floe sync start` with node config `floe-home` (where this
user's Floe keeps its files), `rank` (from the device tier) and `federation` (the address,
for the ledger). Everything a device decides is in client.py.

Rounds under secure aggregation reach the train handler through Flower's SecAgg+ mod
(secaggplus_mod): the update is quantized and masked on this device, and only the masked
vector leaves; the server's half is secagg.py. Other rounds go to the handler directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from floe_app.config import load_config
from floe_app.engine.local import resolve_model_path
from floe_app.errors import FloeError
from floe_app.federated import privacy
from floe_app.federated.client import (
    Declined,
    LocalBase,
    RoundPlan,
    check_shared,
    install_shared,
    ready,
    record_declined,
    take_part,
)
from floe_app.paths import Paths, private_umask, resolve_paths
from floe_app.store.db import Store

DECLINED = 1  # Error code of a reply that carries no update, with the reason


def secure_aggregation(message: Message, context: Context,
                       call_next: ClientAppCallable) -> Message:
    """A round under secure aggregation goes through Flower's SecAgg+ mod; a device that
    does not take part says why at the first stage, before it joins the key exchange (or,
    if that changes while it trains, drops out: the others' round goes on)."""
    if message.metadata.message_type != "train" or \
            RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    try:
        if message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == Stage.SETUP:
            paths, rank, federation = _node(context)
            plan = _plan(message, federation, context)
            store = Store(paths.database)
            try:
                ready(paths, store, plan, masked=True)
            except Declined as exc:
                record_declined(store, plan, rank, exc)
                raise
            finally:
                store.close()
        return secaggplus_mod(message, context, call_next)
    except FloeError as exc:
        return Message(Error(DECLINED, str(exc)), reply_to=message)


app = ClientApp(mods=[secure_aggregation])


def _node(context: Context) -> tuple[Paths, int, str]:
    os.nice(10)  # this ClientApp process: the user's work (and the SuperLink) come first
    private_umask()  # inherited from `floe sync` already; also when Flower was started by hand
    home = str(context.node_config.get("floe-home", ""))
    paths = resolve_paths({"FLOE_HOME": home} if home else None).ensure()
    return paths, int(context.node_config.get("rank", 4)), \
        str(context.node_config.get("federation", "federation"))


def _model_path(paths: Paths) -> Path:
    return resolve_model_path(load_config(paths)[0].model.path or None)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def _plan(message: Message, federation: str, context: Context) -> RoundPlan:
    return RoundPlan.from_record(message.content["config"], federation, context.run_id)


@app.train()
def train(message: Message, context: Context) -> Message:
    paths, rank, federation = _node(context)
    masked = RECORD_KEY_CONFIGS in message.content.config_records
    try:
        plan = _plan(message, federation, context)
        upload = take_part(paths, _model_path(paths), plan,
                           _arrays(message.content["shared"]), rank, masked)
    except FloeError as exc:
        if masked:
            raise  # secure_aggregation() answers: SecAgg+'s mod has no reply to mask
        return Message(Error(DECLINED, str(exc)), reply_to=message)
    if masked:  # the layout SecAgg+'s mod masks; it sends only the masked vector on
        return Message(RecordDict({
            "fitres.parameters": ArrayRecord({f"{m}.dB": Array(upload.delta[m])
                                              for m in sorted(upload.delta)}),
            "fitres.num_examples": MetricRecord({"num_examples": 1}),  # secagg.WEIGHT
            "fitres.metrics": ConfigRecord({"rank": upload.rank}),
            "fitres.status": ConfigRecord({"code": 0, "message": ""}),
        }), reply_to=message)
    return Message(RecordDict({
        "update": ArrayRecord({f"{m}.dB": Array(a) for m, a in upload.delta.items()}),
        "metrics": MetricRecord({"rank": upload.rank, "examples": upload.examples,
                                 "noise-multiplier": upload.noise_multiplier}),
    }), reply_to=message)


@app.evaluate()
def install(message: Message, context: Context) -> Message:
    """The final shared adapter of a run: checked, then kept for the chat."""
    paths, rank, federation = _node(context)
    store = Store(paths.database)
    try:
        plan = _plan(message, federation, context)
        if plan.policy is not None:
            privacy.remember_policy(paths.data_dir, federation, plan.policy)
        base = LocalBase.read(_model_path(paths))
        shared = check_shared(_arrays(message.content["shared"]), plan, base)
        margin = load_config(paths)[0].learning.perplexity_margin
        installed = install_shared(paths, store, shared, plan, min(rank, plan.rank), base,
                                   margin)
    except Declined as exc:
        store.add_federation_round(federation=federation, run_id=str(context.run_id),
                                   round_number=None, rank=rank, examples=0, bytes_sent=0,
                                   noise_multiplier=None, clip_norm=None, outcome="refused",
                                   reason=str(exc))
        return Message(Error(DECLINED, str(exc)), reply_to=message)
    finally:
        store.close()
    return Message(RecordDict({"metrics": MetricRecord({"installed": int(installed is not None)})}),
                   reply_to=message)
