"""One thread for all of the process's OpenMP number crunching: llama.cpp and torch.

llama.cpp runs its threads through OpenMP (libgomp), which keeps a team of worker threads
for every thread that has ever run parallel work, for as long as that thread lives. Once the
process holds more such threads than there are cores, libgomp stops letting any of them
spin at their barriers: every step then waits for sleeping threads to be woken. The chat
window evaluated on whichever of asyncio's pool threads ran the reply, and `floe ask` on the
main thread; measured on 2 cores, a reply evaluated on a second thread after the first
decoded at 28 tokens/s against 80. torch's wheel brings its own libgomp.so.1, but the
dynamic loader keeps one library per name, so training shares the same counts: a training
job that trained on its main thread and then checked recall with llama.cpp elsewhere took
113 s against 80. Handing all of it to one long-lived thread keeps a single team (the
hand-over costs tens of microseconds per call).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
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


def on_compute_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs), run on the process's compute thread; the caller waits for it."""
    global _executor
    if getattr(_local, "compute", False):
        return fn(*args, **kwargs)
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(1, thread_name_prefix="floe-compute",
                                               initializer=_mark)
    return _executor.submit(fn, *args, **kwargs).result()


@contextmanager
def own_team() -> Iterator[None]:
    """This thread's evaluations run in place, in an OpenMP team of its own, instead of on
    the compute thread. Only for a short job whose threads, with the compute thread's,
    fit the cores (a second prompt read beside a reply that leaves a core free); the
    team goes when the thread ends."""
    _local.compute = True
    try:
        yield
    finally:
        _local.compute = False


def runs_on_compute_thread(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorator: every call of `fn` runs on the compute thread (see on_compute_thread)."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return on_compute_thread(fn, *args, **kwargs)
    return wrapper
