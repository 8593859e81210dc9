"""What the chat and the training job tell each other, through small files in the data dir.

- `replying/<pid>`: a reply is being generated; the job waits between steps while one is.
- `training.json`: the job's state (step, loss, message), for the TUI and `floe train --status`.
- `training.lock`: one job at a time (an OS lock, released when the process dies).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from floe_app.errors import FloeError
from floe_app.store.db import pid_alive

RUNNING = ("starting", "loading", "training", "paused", "evaluating")


@dataclass
class TrainingStatus:
    state: str  # starting | loading | training | paused | evaluating | done | failed | skipped
    pid: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    message: str = ""
    updated_at: float = 0.0
    fingerprint: str = ""  # of the examples this job learns (personalize.data.Dataset)

    @property
    def running(self) -> bool:
        return self.state in RUNNING and pid_alive(self.pid)

    def line(self) -> str:
        if self.state in RUNNING and not self.running:
            return "Training stopped before it finished; it resumes from its checkpoint."
        if self.state == "training":
            loss = "" if self.loss is None else f", loss {self.loss:.3f}"
            return f"Training: step {self.step} of {self.steps}{loss}"
        if self.state == "paused":
            return f"Training paused while you chat (step {self.step} of {self.steps})"
        return self.message or self.state.capitalize()


def write_status(data_dir: Path, status: TrainingStatus) -> None:
    status.updated_at = time.time()
    path = data_dir / "training.json"
    tmp = path.with_name(f"training.json.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(status)), encoding="utf-8")
    os.replace(tmp, path)


def read_status(data_dir: Path) -> TrainingStatus | None:
    try:
        return TrainingStatus(**json.loads((data_dir / "training.json").read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def replying(data_dir: Path) -> Iterator[None]:
    """Mark this process as generating a reply for as long as the block runs."""
    folder = data_dir / "replying"
    marker = folder / str(os.getpid())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only data dir must not stop the chat
        yield
        return
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def someone_replying(data_dir: Path) -> bool:
    """True while a live Floe process is generating (markers of dead ones are ignored)."""
    try:
        names = os.listdir(data_dir / "replying")
    except OSError:
        return False
    return any(name.isdigit() and pid_alive(int(name)) for name in names)


def wait_for_the_user(data_dir: Path, waiting: Callable[[bool], None] | None = None) -> None:
    """Block while a reply is being generated (training waits between its steps);
    `waiting(True)` is called before a wait, `waiting(False)` after it."""
    if not someone_replying(data_dir):
        return
    if waiting is not None:
        waiting(True)
    while someone_replying(data_dir):
        time.sleep(0.2)
    if waiting is not None:
        waiting(False)


@contextlib.contextmanager
def training_lock(data_dir: Path) -> Iterator[None]:
    """Hold the one-job-at-a-time lock; FloeError if another job holds it."""
    import fcntl

    path = data_dir / "training.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FloeError("training is already running (see floe train --status)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_background(data_dir: Path, model_override: str | None = None) -> subprocess.Popen:
    """Start `floe train --background` in its own session; the caller polls the process
    it returns (a finished child stays a zombie, "alive", until polled).

    It outlives the chat (a closed terminal does not lose the work) and runs at low
    priority; its output goes to training.log in the data dir.
    """
    command = [sys.executable, "-m", "floe_app"]
    if model_override:
        command += ["--model", model_override]
    command += ["train", "--background"]
    with open(data_dir / "training.log", "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
