"""Adapter versions: files in data/adapters, rows (checksum, status, metadata) in the store.

A file enters the registry only complete: it is written elsewhere, checksummed, then moved
in with one rename. The active version is the last entry of a history, so rollback is
"pop". No torch here: the chat reads the registry before every reply.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from floe_app.errors import FloeError
from floe_app.store.db import AdapterRow, SharedAdapter, Store


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scores(row: AdapterRow) -> tuple[str, str]:
    """A version's held-out recall and general-text perplexity change, as shown to users."""
    meta = row.meta
    recall = "-" if meta.get("recall") is None else f"{meta['recall']:.0%}"
    rise = (f"{meta['perplexity'] / meta['perplexity_base'] - 1:+.1%}"
            if meta.get("perplexity_base") else "-")
    return recall, rise


def file_problem(path: Path, size: int, sha256: str) -> str | None:
    """Why an adapter file cannot be used (missing, truncated, corrupt), or None."""
    try:
        found = path.stat().st_size
    except OSError:
        return f"its file {path.name} is missing"
    if found != size:
        return f"its file is truncated ({found:,} of {size:,} bytes)"
    if sha256_of(path) != sha256:
        return "its file is corrupt (checksum mismatch)"
    return None


class Registry:
    def __init__(self, store: Store, folder: Path) -> None:
        self.store = store
        self.folder = Path(folder)

    def versions(self) -> list[AdapterRow]:
        return self.store.adapters()

    def register(self, staged: Path, *, base_model: str, status: str, reason: str = "",
                 meta: dict[str, Any] | None = None) -> AdapterRow:
        """Move a finished adapter file in and record it. Raises FloeError (disk full...)."""
        digest = sha256_of(staged)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"adapter-{digest[:16]}.gguf"
        try:
            if staged.stat().st_dev == self.folder.stat().st_dev:
                os.replace(staged, target)
            else:  # another file system: copy next to the target, then rename
                partial = target.with_name(target.name + ".partial")
                try:
                    shutil.copyfile(staged, partial)
                    os.replace(partial, target)
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            raise FloeError(f"cannot store the new adapter in {self.folder}:"
                            f" {exc.strerror or exc}; the active version stays") from exc
        version = self.store.add_adapter(path=str(target), sha256=digest,
                                         size=target.stat().st_size, base_model=base_model,
                                         status=status, reason=reason, meta=meta)
        if status == "promoted":
            self.store.activate_adapter(version)
        return self.store.adapter(version)  # type: ignore[return-value]

    def problem(self, row: AdapterRow) -> str | None:
        """Why this version's file cannot be used, or None when it is intact."""
        return file_problem(Path(row.path), row.size, row.sha256)

    # Shared adapters (from federated rounds): composed with the personal version

    def latest_shared(self, exclude: Collection[int] = ()) -> SharedAdapter | None:
        rows = [r for r in self.store.shared_adapters() if r.id not in exclude]
        return rows[-1] if rows else None

    def composed(self, personal: AdapterRow | None, shared: SharedAdapter) -> Path:
        """One adapter file applying both (ranks stacked: exact), built once and kept.

        Raises FloeError if the shared file is damaged or made for another base."""
        shared_path = Path(shared.path)
        why = file_problem(shared_path, shared.size, shared.sha256)
        if why is not None:
            raise FloeError(why)
        if personal is None:
            return shared_path
        target = self.folder / f"composed-{personal.sha256[:12]}-{shared.sha256[:12]}.gguf"
        if target.exists():
            return target
        from floe_app.personalize.export import (
            BaseModel,
            compose,
            read_gguf_adapter,
            write_gguf_tensors,
        )

        try:
            mine, ours = read_gguf_adapter(Path(personal.path)), read_gguf_adapter(shared_path)
        except (OSError, ValueError) as exc:
            raise FloeError(f"cannot read it ({exc})") from None
        if mine.base_identity != ours.base_identity:
            raise FloeError(f"it was made for another base model ({ours.base_identity})")
        try:
            tensors = compose([mine, ours])
        except ValueError as exc:  # factors whose shapes do not stack
            raise FloeError(f"it does not fit the personal adapter ({exc})") from None
        try:
            return write_gguf_tensors(target, tensors, alpha=0.0,
                                      base=BaseModel(mine.base_identity, mine.arch, 0, 0))
        except OSError as exc:
            raise FloeError(f"cannot write the composed adapter: {exc.strerror or exc}"
                            ) from None

    def active_version(self) -> int:
        history = self.store.adapter_history()
        return history[-1] if history else 0

    def active(self) -> AdapterRow | None:
        version = self.active_version()
        return self.store.adapter(version) if version else None

    def mark_broken(self, row: AdapterRow, why: str) -> None:
        self.store.set_adapter_status(row.version, "broken", why)

    def use(self, version: int) -> AdapterRow | None:
        """Switch the chat to `version` (0: the base model alone)."""
        if version == 0:
            self.store.activate_adapter(0)
            return None
        row = self.store.adapter(version)
        if row is None:
            raise FloeError(f"no adapter version {version} (see floe adapters list)")
        why = self.problem(row)
        if why is not None:
            self.mark_broken(row, why)
            raise FloeError(f"adapter v{version} cannot be used: {why}")
        if row.status == "broken":
            raise FloeError(f"adapter v{version} cannot be used: {row.reason}")
        self.store.activate_adapter(version)
        return row

    def rollback(self) -> int:
        """Go back to the version used before the active one; returns it (0: none)."""
        if not self.store.adapter_history():
            raise FloeError("nothing to roll back: no adapter has been used yet")
        self.store.pop_adapter_history()
        return self.active_version()
