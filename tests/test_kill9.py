"""kill -9 at random moments: `floe ask` many times in one data folder (benchmarks/kill9.py
does 100), and a device writing a shared adapter from a federated round."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.kill9 import kill_asks
from floe_app.personalize.export import read_gguf_adapter
from floe_app.personalize.registry import Registry, file_problem
from floe_app.store import Store
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_floe_ask_killed_at_random_moments_loses_nothing(tmp_path):
    report = kill_asks(tmp_path / "home", kills=6, seed=7)
    assert report.problems == [], report.lines()
    assert report.kills == 6 and report.interrupted >= 1, report.lines()


# What `floe sync` does when a round's shared adapter arrives: write it (gguf, then one
# rename), record it in the store. Killed anywhere in between, the chat must only ever see
# a whole adapter: a row is written after its file is complete, and the file is checked.
WRITER = """
import sys, numpy as np
from pathlib import Path
from floe_app.personalize.export import BaseModel, write_gguf_tensors
from floe_app.personalize.registry import sha256_of
from floe_app.store import Store
home = Path(sys.argv[1])
store = Store(home / "floe.db")
base = BaseModel("base", "llama", 9, 3)
rng = np.random.default_rng(int(sys.argv[2]))
for n in range(1000):
    tensors = {f"blk.{i}.attn_q.weight.lora_{f}": rng.standard_normal(shape).astype(np.float32)
               for i in range(30) for f, shape in (("a", (16, 576)), ("b", (576, 16)))}
    staged = write_gguf_tensors(home / "shared" / "incoming.gguf", tensors, alpha=16, base=base)
    digest = sha256_of(staged)
    target = home / "shared" / f"shared-{digest[:16]}.gguf"
    staged.replace(target)
    store.add_shared_adapter(federation="f", run_id="1", round_number=n, path=str(target),
                             sha256=digest, size=target.stat().st_size, rank=16,
                             base_model="base")
    print(n, flush=True)
"""


def test_a_shared_adapter_killed_while_written_is_never_used_half_written(tmp_path):
    rng = random.Random(3)
    home = tmp_path / "device"
    home.mkdir()
    used = 0
    for kill in range(12):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(home), str(kill)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.5, 4.0))
        if child.poll() is not None:
            raise AssertionError(child.stderr.read().decode())
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        store = Store(home / "floe.db")
        try:
            registry = Registry(store, home / "adapters")
            for row in store.shared_adapters():  # every recorded adapter is whole
                assert file_problem(Path(row.path), row.size, row.sha256) is None
            latest = registry.latest_shared()
            if latest is not None:
                adapter = read_gguf_adapter(registry.composed(None, latest))
                assert len(adapter.tensors) == 60 and adapter.base_identity == "base"
                used += 1
        finally:
            store.close()
    assert used >= 1  # some kills came after at least one adapter was complete
    # Files a kill left behind (incoming.gguf.partial, a renamed file not yet recorded)
    # are never recorded, so never used; the next round's write replaces them.
    store = Store(home / "floe.db")
    recorded = {row.path for row in store.shared_adapters()}
    store.close()
    for path in (home / "shared").iterdir():
        assert str(path) in recorded or path.name in ("incoming.gguf", "incoming.gguf.partial") \
            or path.name.startswith("shared-"), path
