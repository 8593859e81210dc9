"""One thread for all of llama.cpp's number crunching in the process.

llama.cpp runs its threads through OpenMP (libgomp), which keeps a team of worker threads
for every thread that has ever evaluated tokens, for as long as that thread lives. Once the
process holds more such threads than there are cores, libgomp stops letting any of them
spin between evaluations: each token then waits for sleeping threads to be woken. The chat
window evaluated on whichever of asyncio's pool threads ran the reply, and `floe ask` on the
main thread; measured on 2 cores, a reply evaluated on a second thread after the first
decoded at 28 tokens/s against 80. Handing every evaluation to one long-lived thread keeps
a single team (the hand-over costs tens of microseconds per token).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_local = threading.local()
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _mark() -> None:
    _local.compute = True


def _forget_in_child() -> None:
    # A forked child has no copy of the thread: it starts its own when it first needs one.
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_in_child)


def on_compute_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args), run on the process's llama.cpp thread; the caller waits for it."""
    global _executor
    if getattr(_local, "compute", False):
        return fn(*args)
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(1, thread_name_prefix="floe-llama",
                                               initializer=_mark)
    return _executor.submit(fn, *args).result()
