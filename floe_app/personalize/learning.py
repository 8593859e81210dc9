"""What the local model learns from the user, and the background job that learns it.

The chat, the Learning screen and the CLI teach through `Learning`: ratings, corrections
and forgetting go to the store; `due` decides whether a background job would learn
something new (the same rule the job itself applies, `nothing_new`); `start` runs one.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import replace

from floe_app.config import Config
from floe_app.errors import FloeError
from floe_app.paths import Paths
from floe_app.personalize.data import Dataset, build_dataset
from floe_app.personalize.registry import Registry
from floe_app.personalize.status import TrainingStatus, read_status, start_background
from floe_app.store.db import AdapterRow, Store


def nothing_new(dataset: Dataset, versions: list[AdapterRow]) -> bool:
    """The newest adapter version was trained on exactly these examples."""
    return bool(versions) and versions[-1].meta.get("fingerprint") == dataset.fingerprint


class Learning:
    """Teaching the local model: examples, the pause switch and training jobs."""

    def __init__(self, store: Store, registry: Registry, paths: Paths,
                 settings: Callable[[], Config], save_settings: Callable[[Config], list[str]],
                 model_override: str | None = None) -> None:
        """`settings` gives the settings in use; `save_settings` replaces them and returns
        the errors saving them met (the session owns them: see ChatSession.apply_settings)."""
        self.store = store
        self.registry = registry
        self.paths = paths
        self.settings = settings
        self.save_settings = save_settings
        self.model_override = model_override
        self._job: subprocess.Popen | None = None  # the background job this process started

    # What it learns from

    def rate(self, message_id: int, rating: int | None) -> None:
        """Thumbs up (1: learn from it), down (-1: never learn it) or none on a reply."""
        self._taught_reply(message_id)
        self.store.rate_message(message_id, rating)

    def correct(self, message_id: int, text: str) -> None:
        """What a reply should have said (empty: the correction is removed)."""
        self._taught_reply(message_id)
        self.store.correct_message(message_id, text.strip() or None)

    def _taught_reply(self, message_id: int) -> None:
        message = self.store.message(message_id)
        if message is None or message.role != "assistant":
            raise FloeError(f"no reply with id {message_id}")

    def forget(self, source: str, source_id: int) -> None:
        """Stop learning from an example: a memory note is forgotten, a reply is kept in
        its conversation but no longer learned from. The next version leaves it out."""
        if source == "memory":
            self.store.delete_memory(source_id)
        else:
            self.store.set_learn(source_id, False)

    def dataset(self) -> Dataset:
        return build_dataset(self.store.memories(), self.store.taught_replies())

    # The pause switch

    @property
    def paused(self) -> bool:
        return self.settings().learning.paused

    def set_paused(self, paused: bool) -> None:
        """Pause or resume learning, saved in the config file. Pausing also stops a running
        job; it continues from its checkpoint once learning resumes."""
        config = self.settings()
        errors = self.save_settings(replace(config,
                                            learning=replace(config.learning, paused=paused)))
        status = self.status()
        if paused and status is not None and status.running:
            os.kill(status.pid, signal.SIGTERM)
        if errors:
            raise FloeError("; ".join(errors))

    # Training jobs

    def due(self) -> bool:
        """Automatic training would learn something new now."""
        learning = self.settings().learning
        if learning.paused or not learning.auto:
            return False
        status = self.status()
        if self._job is not None or (status is not None and status.running):
            return False  # ours may not have written its status yet
        dataset = self.dataset()
        if status is not None and status.state == "failed" and \
                status.fingerprint == dataset.fingerprint:
            return False  # it failed on these very examples; floe train retries by hand
        return bool(dataset.examples) and not nothing_new(dataset, self.store.adapters())

    def start(self) -> None:
        """Train in a background process."""
        self._job = start_background(self.paths.data_dir, self.model_override)

    def train_now(self) -> str:
        """Start a job at the user's request; says what happened."""
        if self.paused:
            return "Learning is paused: switch it on first."
        status = self.status()
        if status is not None and status.running:
            return "Training is already running."
        self.start()
        return "Training started in the background."

    def status(self) -> TrainingStatus | None:
        """The running or last job's state."""
        if self._job is not None and self._job.poll() is not None:
            self._job = None  # reaped: its pid no longer looks alive
        return read_status(self.paths.data_dir)

    def line(self) -> str:
        """One line: the last job and the adapter in use."""
        status = self.status()
        active = self.registry.active_version()
        using = f"adapter v{active}" if active else "no adapter yet"
        if self.paused:
            return f"Learning paused; using {using}."
        return f"{status.line() if status else 'Not trained yet.'} Using {using}."
