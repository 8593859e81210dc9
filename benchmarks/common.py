"""Shared set-up for the fusion benchmarks: the stand-in cloud, a proxy, sessions."""

from __future__ import annotations

import itertools
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from floe_app.config import Config
from floe_app.session import ChatSession, Finished, Notice, percentile
from floe_app.store import Store
from tests.support.cloud_server import CloudServer, gemma_path
from tests.support.proxy import FaultProxy

_nonce = itertools.count()


@contextmanager
def cloud_and_proxy(cache: Path, threads: int = 1) -> Iterator[tuple[CloudServer, FaultProxy]]:
    server = CloudServer(gemma_path(cache), threads=threads)
    proxy = FaultProxy("127.0.0.1", server.port)
    try:
        yield server, proxy
    finally:
        proxy.close()
        server.stop()


def make_session(proxy: FaultProxy, max_tokens: int, **fusion: object) -> ChatSession:
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = max_tokens
    config.model.threads = 1  # the stand-in cloud has the other core
    config.cloud.base_url = proxy.base_url
    config.cloud.model = "gemma-3-270m"
    for key, value in fusion.items():
        setattr(config.fusion, key, value)
    folder = Path(tempfile.mkdtemp(prefix="floe-bench-"))
    session = ChatSession(Store(folder / "bench.db"), config, env={})
    session.warm_cloud()
    return session


def fresh_reply(session: ChatSession, question: str, mode: str) -> tuple[Finished, list[str]]:
    """One reply from cold caches: a unique first line defeats both prefix caches."""
    session.config.chat.system_prompt = (f"Session {next(_nonce)}. You are a concise and"
                                         " helpful assistant.")
    session.engine().clear_cache()
    cid = session.new_conversation()
    notices, done = [], None
    for event in session.reply(cid, question, mode=mode):
        if isinstance(event, Notice):
            notices.append(event.text)
        elif isinstance(event, Finished):
            done = event
    assert done is not None
    return done, notices


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p95(values: list[float]) -> float:
    return percentile(values, 95) if values else float("nan")
