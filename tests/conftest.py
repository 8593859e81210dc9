"""Shared fixtures: every test gets its own FLOE_HOME; the real bundled model is loaded once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from floe_app.config import Config
from floe_app.engine.local import LocalEngine, bundled_model_path
from floe_app.paths import Paths, resolve_paths
from floe_app.session import ChatSession
from floe_app.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def floe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "floe-home"
    monkeypatch.setenv("FLOE_HOME", str(home))
    return home


@pytest.fixture
def paths(floe_home: Path) -> Paths:
    return resolve_paths().ensure()


@pytest.fixture
def config() -> Config:
    """Greedy and short, so replies are repeatable and tests quick."""
    config = Config()
    config.chat.temperature = 0.0
    config.chat.max_tokens = 24
    config.learning.auto = False  # no background training unless a test asks for it
    return config


@pytest.fixture(scope="session")
def engine() -> LocalEngine:
    return LocalEngine.load(bundled_model_path(), context_tokens=2048)


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory) -> Path:
    """Where training caches the dequantized base model, shared by the whole test run."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "base").mkdir()
    return cache


@pytest.fixture
def store(paths: Paths) -> Store:
    store = Store(paths.database)
    yield store
    store.close()


@pytest.fixture
def session(store: Store, config: Config, engine: LocalEngine, paths: Paths) -> ChatSession:
    """A session that shares the already loaded model (same model path and settings)."""
    config.model.context_tokens = engine.n_ctx
    return ChatSession(store, config, paths=paths, engine=engine)


@pytest.fixture
def make_session(store, engine, paths):
    """Sessions for a given config (env: only what is passed) sharing the loaded model."""
    def make(config, env=None):
        config.model.context_tokens = engine.n_ctx
        return ChatSession(store, config, env=env if env is not None else {}, paths=paths,
                           engine=engine)
    return make


@contextlib.contextmanager
def prompts_seen(engine: LocalEngine):
    """Record the text of every prompt the local model is asked to continue."""
    seen: list[str] = []
    original = engine.generate

    def spy(tokens, *args, **kwargs):
        seen.append(engine.detokenize(tokens))
        return original(tokens, *args, **kwargs)

    engine.generate = spy
    try:
        yield seen
    finally:
        del engine.generate


def run_floe(*args: str, env_home: Path, input: str | None = None, timeout: float = 120,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `floe` command in a subprocess, with its own FLOE_HOME."""
    env = {**os.environ, "FLOE_HOME": str(env_home), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "floe_app", *args], input=input,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def patient_cloud_config(config, base_url: str, model: str, max_tokens: int):
    """Greedy, probed on first use, pointed at a real server that may be slow (one thread
    on a busy machine): the reply waits for it wherever it is not there yet."""
    config.cloud.base_url = base_url
    config.cloud.model = model
    config.cloud.provider = "auto"
    config.chat.max_tokens = max_tokens
    config.fusion.deadline_ms = 3000
    config.fusion.wait_budget_ms = 60_000
    config.fusion.first_token_ms = 60_000
    config.fusion.sure_prob = 1.0
    return config


@pytest.fixture(scope="session")
def cloud_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server with gemma-3-270m, on 127.0.0.1."""
    from tests.support.cloud_server import CloudServer, gemma_path

    server = CloudServer(gemma_path(tmp_path_factory.mktemp("gemma")))
    yield server
    server.stop()


@pytest.fixture
def proxy(cloud_server):
    """A fault-injecting TCP proxy in front of the cloud server (no faults until set)."""
    from tests.support.proxy import FaultProxy

    proxy = FaultProxy("127.0.0.1", cloud_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def cloud_config(config, proxy):
    """Greedy settings pointing at the cloud through the proxy."""
    config.cloud.base_url = proxy.base_url
    config.cloud.model = "gemma-3-270m"
    # Its documented behaviour, so replies need no probe first (tests/test_probe.py probes).
    config.cloud.provider = "llama-cpp-python"
    config.chat.max_tokens = 24
    return config
