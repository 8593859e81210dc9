"""Floe's Flower ClientApp: unpack the round, call Floe's installed code, pack the reply.

The SuperNode is started by `floe sync start` with node config `floe-home` (where this
user's Floe keeps its files), `rank` (from the device tier) and `federation` (the address,
for the ledger). Everything a device decides is in client.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
    take_part,
)
from floe_app.paths import Paths, private_umask, resolve_paths
from floe_app.store.db import Store

DECLINED = 1  # Error code of a reply that carries no update, with the reason

app = ClientApp()


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


@app.train()
def train(message: Message, context: Context) -> Message:
    paths, rank, federation = _node(context)
    try:
        plan = RoundPlan.from_record(message.content["config"], federation, context.run_id)
        upload = take_part(paths, _model_path(paths), plan,
                           _arrays(message.content["shared"]), rank)
    except FloeError as exc:
        return Message(Error(DECLINED, str(exc)), reply_to=message)
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
        plan = RoundPlan.from_record(message.content["config"], federation, context.run_id)
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
