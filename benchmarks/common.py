"""Shared set-up for the fusion benchmarks: the stand-in cloud, a proxy, sessions.

Two stand-in clouds: gemma-3-270m behind llama-cpp-python's server (`cloud_and_proxy`), and
Qwen2.5-Coder-Instruct (stronger than the device model) behind that server, behind the replay
server of tests/support/replay.py that records its streams once and replays them at a hosted
cloud's pace, behind the FaultProxy (`replayed_cloud`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from floe_app.config import Config
from floe_app.session import ChatSession, Finished, Notice, percentile
from floe_app.store import Store
from tests.support.cloud_server import CloudServer, gemma_path, qwen_server
from tests.support.proxy import FaultProxy
from tests.support.replay import ReplayProcess

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


@contextmanager
def replayed_cloud(cache: Path, recording: Path, *, size: str = "1.5b", ttft_ms: float = 400,
                   tokens_per_s: float = 80, record: bool = True, prefill_chat: bool = True,
                   threads: int = 1) -> Iterator[tuple[CloudServer, ReplayProcess, FaultProxy]]:
    """Qwen behind llama-cpp-python's server (`threads`), behind a replay process (recorded
    requests at `ttft_ms` / `tokens_per_s`, others forwarded and recorded into `recording`),
    behind a FaultProxy. Its server logs go next to the recording."""
    server = qwen_server(cache, size, threads=threads,
                         log=recording.with_suffix(".server.log"))
    replay = None
    try:
        replay = ReplayProcess(recording, server.base_url, ttft_ms=ttft_ms,
                               tokens_per_s=tokens_per_s, record=record,
                               prefill_chat=prefill_chat,
                               log=recording.with_suffix(".replay.log"))
        proxy = FaultProxy("127.0.0.1", replay.port)
        try:
            yield server, replay, proxy
        finally:
            proxy.close()
    finally:
        if replay is not None:
            replay.close()
        server.stop()


def make_session(proxy: FaultProxy, max_tokens: int, *, model: str = "gemma-3-270m",
                 cloud: dict[str, object] | None = None, **fusion: object) -> ChatSession:
    """A greedy session on one thread whose cloud is `proxy`; `cloud` and `fusion` override
    config.cloud.* and config.fusion.* settings."""
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = max_tokens
    config.model.threads = 1  # the stand-in cloud has the other core
    config.cloud.base_url = proxy.base_url
    config.cloud.model = model
    for key, value in (cloud or {}).items():
        if not hasattr(config.cloud, key):
            raise KeyError(f"no setting cloud.{key}")
        setattr(config.cloud, key, value)
    for key, value in fusion.items():
        if not hasattr(config.fusion, key):
            raise KeyError(f"no setting fusion.{key}")
        setattr(config.fusion, key, value)
    folder = Path(tempfile.mkdtemp(prefix="floe-bench-"))
    session = ChatSession(Store(folder / "bench.db"), config, env={})
    session.warm_cloud()
    return session


def fresh_reply(session: ChatSession, question: str, mode: str,
                system_prompt: str | None = None) -> tuple[Finished, list[str]]:
    """One reply from a cold local cache. Without `system_prompt`, a unique first line also
    defeats the cloud's prefix cache; with one, the request is the same on every run (as a
    recorded cloud needs)."""
    session.config.chat.system_prompt = system_prompt or (
        f"Session {next(_nonce)}. You are a concise and helpful assistant.")
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


def add_fusion_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fusion", action="append", default=[], metavar="KEY=VALUE",
                        help="a fusion setting for every fused reply, e.g. lambda_min=0.6")


def fusion_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """--fusion KEY=NUMBER options as make_session's keyword arguments."""
    overrides: dict[str, float] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            parser.error(f"--fusion {item}: expected KEY=NUMBER")
    return overrides
