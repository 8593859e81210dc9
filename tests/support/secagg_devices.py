"""Devices that run Flower's own SecAgg+ mod in this process, around a handler that returns
a fixed vector: the device half of secure aggregation without SuperNodes (the loopback
test runs the real thing), for secagg.py's tests and the federation benchmark."""

from __future__ import annotations

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
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage


def as_server_process() -> None:
    """What a ServerApp process has: its run's identity (Flower stamps new messages)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class Devices:
    """`vectors`: node -> its list of arrays; `ranks`: node -> the rank it reports.
    `silent`: node -> the stage at which it stops answering; `declining`: nodes that answer
    the first stage with an error. `masked` keeps what the server received from each."""

    def __init__(self, vectors: dict[int, list[np.ndarray]], ranks: dict[int, int] | None = None,
                 silent: dict[int, str] | None = None, declining: set[int] | None = None
                 ) -> None:
        self.vectors, self.silent, self.declining = vectors, silent or {}, declining or set()
        self.ranks = ranks or {n: 4 for n in vectors}
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in vectors}
        self.masked: dict[int, list[np.ndarray]] = {}
        self.apps = {n: self._app(n) for n in vectors}

    def _app(self, node: int) -> ClientApp:
        app = ClientApp(mods=[secaggplus_mod])

        @app.train()
        def train(message: Message, context: Context) -> Message:
            assert "shared" in message.content  # the round's payload came with the request
            return Message(RecordDict({
                "fitres.parameters": ArrayRecord({str(i): Array(v) for i, v in
                                                  enumerate(self.vectors[node])}),
                "fitres.num_examples": MetricRecord({"num_examples": 1}),
                "fitres.metrics": ConfigRecord({"rank": self.ranks[node]}),
                "fitres.status": ConfigRecord({"code": 0, "message": ""}),
            }), reply_to=message)

        return app

    def send(self, messages: list[Message]) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if self.silent.get(node) == stage:
                continue
            if node in self.declining and stage == Stage.SETUP:
                replies.append(Message(Error(1, "nothing to learn from"), reply_to=message))
                continue
            reply = self.apps[node](message, self.contexts[node])
            if stage == Stage.COLLECT_MASKED_VECTORS:
                assert not reply.content.array_records["fitres.parameters"]  # cleared
                self.masked[node] = [bytes_to_ndarray(b) for b in reply.content.config_records[
                    RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            replies.append(reply)
        return replies

    # The part of Flower's Grid that Floe's server uses.

    def send_and_receive(self, messages: list[Message], timeout: float | None = None
                         ) -> list[Message]:
        return self.send(messages)

    def get_node_ids(self) -> list[int]:
        return list(self.vectors)
